"""Shared pieces of the export tests: a cache of tiny models quantized once per preset and
exported once per layout, checkpoint readers, and the key conventions of the two layouts.

Everything is keyed by (model_type, preset[, layout]) so the whole suite quantizes each tiny
model once per preset; tests must not mutate what they get from the cache.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import moeq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
import tiny_models as tm  # noqa: E402

PRESETS = ("fp8", "nvfp4", "w4a16-nvfp4", "w4a16-int4", "fp8-dynamic")
LAYOUTS = ("modelopt", "compressed-tensors")
# (preset, layout) pairs moeq refuses to write: vLLM's modelopt loader has no scheme for them
UNWRITABLE = (("w4a16-int4", "modelopt"), ("fp8-dynamic", "modelopt"))
NVFP4_PRESETS = ("nvfp4", "w4a16-nvfp4")

# Per-module tensors that carry quantization parameters rather than the module's weight.
QPARAMS = ("weight_scale", "weight_scale_2", "input_scale", "weight_global_scale", "input_global_scale",
           "weight_shape", "weight_zero_point")

# vLLM's packed_modules_mapping: checkpoint siblings it loads into one GEMM. Their NVFP4
# weight_scale_2 / input_scale must be equal (vLLM takes the max without requantizing).
VLLM_FUSED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "fused_qkv_a_proj": ("q_a_proj", "kv_a_proj_with_mqa"),  # DeepSeek V2/V3 MLA
    "in_proj_qkvz": ("in_proj_qkv", "in_proj_z"),  # Qwen3.5 / Qwen3-Next linear attention
    "in_proj_ba": ("in_proj_b", "in_proj_a"),
}

_EXPERT_KEY = re.compile(r"^(?P<mod>.*\.experts)\.(?P<e>\d+)\.(?P<leaf>gate_proj|up_proj|down_proj|w1|w2|w3|w13_|w2_)$")
# The (gate, up, down) leaf names of per-expert checkpoint modules; "gate_up" for vLLM's fused-experts names
# ('...experts.3.w13_weight_packed': the experts of models whose original checkpoint keeps them fused, gpt-oss).
_LEAVES = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down",
           "w13_": "gate_up", "w2_": "down"}


def expert_leaf(prefix: str):
    """'...experts.3.w1' -> ('...experts', 3, 'gate'); '...experts.3.w13_' -> (..., 'gate_up'); None otherwise."""
    m = _EXPERT_KEY.match(prefix)
    return None if m is None else (m["mod"], int(m["e"]), _LEAVES[m["leaf"]])


def stem(module: str) -> str:
    """Tensor-name stem of a quantized module: 'a.q_proj' -> 'a.q_proj.'; vLLM fused names stay '...w13_'."""
    return module if module.endswith("_") else module + "."


def refused(model_type: str, preset: str, layout: str) -> bool:
    """moeq refuses this combination by design (vLLM 0.33 has no loader path for it): int4 in the modelopt
    layout, and experts with biases (gpt-oss) outside w4a16-int4 compressed-tensors."""
    if (preset, layout) == ("w4a16-int4", "modelopt"):
        return True
    return model_type in BIASED_EXPERTS and (preset, layout) != ("w4a16-int4", "compressed-tensors")


#: core models whose experts carry biases (structural: the experts module's has_bias flag)
BIASED_EXPERTS = {m for m in tm.CORE_MODELS if tm.find_case(m).flags.get("has_bias")}


def read_checkpoint(path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint directory (single file or sharded)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    assert files, f"no safetensors files in {path}"
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as g:
            for k in g.keys():
                assert k not in out, f"key {k} appears in two shards"
                out[k] = g.get_tensor(k)
    return out


_STEM = re.compile(r"^(.*\.experts\.\d+\.(?:w13|w2)_|.*\.)weight_scale$")


def quantized_modules(sd: dict[str, torch.Tensor]) -> set[str]:
    """Module prefixes that carry a quantized weight (they all have a weight_scale); vLLM fused-experts names
    as their stem ('...experts.3.w13_')."""
    return {m[1].removesuffix(".") for k in sd if (m := _STEM.match(k))}


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return tm.forward_output(model, ids)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def input_fake_quants(model) -> tuple:
    """The input fake quant of a quantized model's first Linear and of its first experts module's
    first projection (as expert 0 sees it): x [..., K] -> fake-quantized x."""
    from moeq.quantization import SESSION_ATTR

    session = getattr(model, SESSION_ATTR)
    lin, exp = next(iter(session.linears.values())), session.experts[0]
    proj = exp.target.projs[0]
    return lin.fake_quant_input, lambda x: exp.fake_quant_input(proj, x, ("one", 0))


def quant_config(path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())["quantization_config"]


def vllm_modelopt_excluded(prefix: str, exclude: list[str]) -> bool:
    """vLLM ModelOptQuantConfigBase.is_layer_excluded, without the fused-module expansion."""
    if prefix in exclude:
        return True
    if any(ex != prefix and ex in prefix for ex in exclude):
        return True
    return any(fnmatch(prefix, ex) for ex in exclude)


def ct_ignored(prefix: str, ignore: list[str]) -> bool:
    from compressed_tensors.utils.match import match_name

    return any(match_name(prefix, ig) for ig in ignore)


def ignored_but_quantized(path, layout: str) -> list[str]:
    """Quantized modules of an export that its own ignore list covers, matched the way vLLM
    matches that layout (vLLM would build them unquantized and fail on their tensors)."""
    ignore = quant_config(path)["ignore"]
    match = vllm_modelopt_excluded if layout == "modelopt" else ct_ignored
    return sorted(m for m in quantized_modules(read_checkpoint(path)) if match(m, ignore))


@dataclass
class Export:
    path: Path
    report: "moeq.ExportReport"


class Zoo:
    """Tiny models, quantized once per preset and exported once per layout (cached)."""

    def __init__(self, root: Path):
        self.root = root
        self._base: dict[str, nn.Module] = {}
        self._quant: dict[tuple, tuple] = {}
        self._exports: dict[tuple, Export] = {}
        self._logits: dict[tuple, torch.Tensor] = {}
        self._plain: dict[str, dict[str, torch.Tensor]] = {}

    def base(self, model_type: str) -> nn.Module:
        """The unquantized tiny model (fp32); skips the test if its plain forward fails."""
        if model_type not in self._base:
            try:
                m = tm.tiny_model(model_type)
                logits(m, self.calib_ids(m))
            except Exception as e:  # a broken tiny config is the factory's problem, not export's
                self._base[model_type] = e
            else:
                self._base[model_type] = m
        m = self._base[model_type]
        if isinstance(m, Exception):
            pytest.skip(f"tiny {model_type} does not run a plain forward: {type(m).__name__}: {m}")
        return m

    @staticmethod
    def calib_ids(model) -> torch.Tensor:
        return tm.random_input_ids(model, batch=2, seq=16, seed=0)

    @staticmethod
    def eval_ids(model) -> torch.Tensor:
        return tm.random_input_ids(model, batch=1, seq=8, seed=1)

    def quantized(self, model_type: str, preset: str):
        """-> (fake-quantized model, QuantReport)."""
        key = (model_type, preset)
        if key not in self._quant:
            m = copy.deepcopy(self.base(model_type))
            report = moeq.quantize(m, preset, [self.calib_ids(m)], progress=False)
            self._quant[key] = (m, report)
        return self._quant[key]

    def quantized_logits(self, model_type: str, preset: str | None) -> torch.Tensor:
        """Logits on eval_ids of the fake-quant model (preset None: of the unquantized one)."""
        key = (model_type, preset)
        if key not in self._logits:
            m = self.base(model_type) if preset is None else self.quantized(model_type, preset)[0]
            self._logits[key] = logits(m, self.eval_ids(m))
        return self._logits[key]

    def exported(self, model_type: str, preset: str, layout: str) -> Export:
        if refused(model_type, preset, layout):
            pytest.skip(f"{model_type} {preset} {layout} is refused by design (test_export_refusals.py checks the refusal)")
        key = (model_type, preset, layout)
        if key not in self._exports:
            m, _ = self.quantized(model_type, preset)
            out = self.root / f"{model_type}-{preset}-{layout}"
            self._exports[key] = Export(out, moeq.export(m, out, layout, progress=False))
        return self._exports[key]

    def plain(self, model_type: str) -> dict[str, torch.Tensor]:
        """What `save_pretrained` writes for the unquantized model: the original checkpoint's keys."""
        if model_type not in self._plain:
            out = self.root / f"{model_type}-plain"
            self.base(model_type).save_pretrained(out)
            self._plain[model_type] = read_checkpoint(out)
        return self._plain[model_type]

    def routers(self, model_type: str) -> list[str]:
        """Checkpoint module names of the MoE routers (`mlp.gate`, `mlp.router`, `block_sparse_moe.gate`, ...)."""
        return [self.checkpoint_name(model_type, r) for r in find_routers(self.base(model_type))]

    def checkpoint_name(self, model_type: str, module: str) -> str:
        """The original checkpoint's name of an in-memory module (Mixtral's `mlp` is `block_sparse_moe` on
        disk), found by value: the key of the unquantized checkpoint that holds exactly its weight."""
        w = self.base(model_type).get_submodule(module).weight.detach()
        hits = [k for k, t in self.plain(model_type).items()
                if k.endswith(".weight") and t.shape == w.shape and torch.equal(t, w)]
        assert len(hits) == 1, f"{module}: {hits}"
        return hits[0][: -len(".weight")]


def find_routers(model: nn.Module) -> list[str]:
    out = []
    for name, experts in tm.experts_modules(model):
        parent, _, own = name.rpartition(".")
        n_experts = experts.down_proj.shape[0]
        for child, mod in model.get_submodule(parent).named_children():
            w = getattr(mod, "weight", None)
            if child != own and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == n_experts:
                out.append(f"{parent}.{child}")
    assert out, f"no router found in {type(model).__name__}"
    return out
