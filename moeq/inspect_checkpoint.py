"""`moeq inspect DIR`: what a quantized checkpoint holds, checked the way a loader would.

Reads only tensor headers for weights (shapes, dtypes) and the small scale tensors.
Problems (non-zero exit in the CLI): missing tensors, wrong dtypes/shapes, non-finite or
non-positive scales, gate/up pairs with different global scales, routers or lm_head not
in the exclude list. Warnings: input scales that differ across the experts of a layer.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open

from .checkpoint.layouts import NATIVE, kv_cache_names, recipe_from_config
from .schemes.table import INPUT, WEIGHT

_SCALE_NAMES = ("weight_scale_2", "weight_global_scale", "input_scale", "input_global_scale")
_QUANT_SUFFIXES = ("weight", "weight_packed", "weight_scale", "weight_shape", "weight_zero_point") + _SCALE_NAMES
_PAIRS = (("gate_proj", "up_proj"), ("w1", "w3"))
# A quantized module's tensors are stem + name: '...q_proj.' + 'weight_scale', or, for experts kept fused in the
# original checkpoint (gpt-oss), vLLM's per-expert names '...experts.3.w13_' + 'weight_scale'.
_STEM = re.compile(r"^(.*\.experts\.\d+\.(?:w13|w2)_|.*\.)weight_scale$")
_DTYPES = {"U8": torch.uint8, "F8_E4M3": torch.float8_e4m3fn, "F32": torch.float32, "I32": torch.int32,
           "I64": torch.int64, "BF16": torch.bfloat16, "F16": torch.float16}


@dataclass
class InspectResult:
    path: str
    layout: str
    recipe: str
    quantized_modules: int
    experts_modules: dict[str, int]  # experts prefix -> number of experts
    per_layer: dict[str, dict[str, int]]
    ignore: list[str]
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"{self.path}: {self.layout} layout, recipe {self.recipe}",
                 f"quantized modules: {self.quantized_modules} ({len(self.experts_modules)} experts blocks); "
                 f"excluded: {len(self.ignore)}"]
        for layer, c in sorted(self.per_layer.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else -1):
            lines.append(f"  layer {layer}: {c.get('expert', 0)} expert projections, {c.get('dense', 0)} dense")
        lines += [f"PROBLEM: {p}" for p in self.problems] + [f"warning: {w}" for w in self.warnings]
        lines.append("OK" if not self.problems else f"{len(self.problems)} problems")
        return "\n".join(lines)


class _Headers:
    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (path / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{path} has no model.safetensors or model.safetensors.index.json")
        self.handles = {f: safe_open(str(path / f), "pt") for f in files}
        self.where = {k: f for f, h in self.handles.items() for k in h.keys()}

    def shape(self, k):
        return tuple(self.handles[self.where[k]].get_slice(k).get_shape())

    def dtype(self, k):
        return _DTYPES.get(self.handles[self.where[k]].get_slice(k).get_dtype())

    def tensor(self, k):
        return self.handles[self.where[k]].get_tensor(k)


def _ignored(name: str, ignore: list[str]) -> bool:
    for pat in ignore:
        p = pat[3:] if pat.startswith("re:") else None
        if (p is not None and re.fullmatch(p, name)) or (p is None and (fnmatchcase(name, pat) or pat in name)):
            return True
    return False


def inspect_checkpoint(path) -> InspectResult:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    qc = json.loads((path / "config.json").read_text()).get("quantization_config")
    if qc is None and (path / "hf_quant_config.json").exists():
        qc = json.loads((path / "hf_quant_config.json").read_text())
    if qc is None:
        raise ValueError(f"{path} holds no quantization_config: it is not a quantized checkpoint")
    layout, recipe = recipe_from_config(qc)
    ignore = list(qc.get("ignore") or qc.get("exclude_modules") or qc.get("quantization", {}).get("exclude_modules") or [])
    ignore += list(qc.get("modules_to_not_convert") or [])  # gpt-oss's own MXFP4 format
    h = _Headers(path)
    if layout == NATIVE:
        return _inspect_native(path, h, recipe, ignore)
    ct = layout == "compressed-tensors"
    stems = sorted({m[1] for k in h.where if (m := _STEM.match(k))})
    res = InspectResult(str(path), layout, recipe.name, len(stems), {}, defaultdict(lambda: defaultdict(int)), ignore)
    P = res.problems.append
    ws2 = {}
    in_scales = defaultdict(list)
    for stem in stems:
        m = stem.rstrip("._")
        _check_module(h, stem, recipe, ct, P)
        g = f"{stem}weight_global_scale" if ct else f"{stem}weight_scale_2"
        if g in h.where:
            ws2[m] = h.tensor(g).float().reshape(-1)[0].item()
        for s in ("input_scale", "input_global_scale"):
            if f"{stem}{s}" in h.where:
                em = re.match(r"(.*\.experts)\.(\d+)\.(\w+)$", m)
                if em:
                    in_scales[(em.group(1), em.group(3))].append(h.tensor(f"{stem}{s}").float().reshape(-1)[0].item())
        em = re.match(r"(.*\.experts)\.(\d+)\.", m + ".")
        if em:
            res.experts_modules[em.group(1)] = max(res.experts_modules.get(em.group(1), 0), int(em.group(2)) + 1)
        layer = re.search(r"layers\.(\d+)\.", m)
        res.per_layer[layer.group(1) if layer else "-"]["expert" if em else "dense"] += 1
    for m, v in ws2.items():
        for a, b in _PAIRS:
            if m.endswith("." + a):
                other = m[: -len(a)] + b
                if other in ws2 and ws2[other] != v:
                    P(f"{m} and {other} have different global scales ({v} vs {ws2[other]}); vLLM uses the gate's for both")
    for (blk, proj), vals in in_scales.items():
        if len(set(vals)) > 1 and proj not in ("up_proj", "w3"):
            res.warnings.append(f"{blk} {proj}: input scales differ across experts (engines take the max)")
    modules = {stem.rstrip(".") for stem in stems}
    for k in h.where:
        mod = k.rsplit(".", 1)[0]
        if k.endswith(".weight") and mod not in modules and len(h.shape(k)) == 2:
            leaf = mod.rsplit(".", 1)[-1]
            if leaf in ("gate", "router", "lm_head") and not _ignored(mod, ignore):
                P(f"{mod} is not quantized but missing from the exclude list; vLLM would try to load it as quantized")
    _check_kv_cache(h, layout, recipe, P)
    res.per_layer = {k: dict(v) for k, v in res.per_layer.items()}
    return res


def _inspect_native(path: Path, h: _Headers, recipe, ignore: list[str]) -> InspectResult:
    """gpt-oss's own MXFP4 format: each fused stack `<p>_blocks` uint8 [E, N, K/32, 16] with `<p>_scales`
    uint8 [E, N, K/32]; E8M0 byte 255 is NaN."""
    stacks = sorted(k[: -len("_blocks")] for k in h.where if k.endswith("_blocks"))
    res = InspectResult(str(path), NATIVE, recipe.name, len(stacks), {}, defaultdict(lambda: defaultdict(int)), ignore)
    for p in stacks:
        b, s = h.shape(f"{p}_blocks"), h.shape(f"{p}_scales") if f"{p}_scales" in h.where else None
        if h.dtype(f"{p}_blocks") != torch.uint8 or len(b) != 4 or b[-1] != 16:
            res.problems.append(f"{p}_blocks has dtype {h.dtype(f'{p}_blocks')} shape {b}, expected uint8 [E, N, K/32, 16]")
        if s is None:
            res.problems.append(f"{p}_scales is missing")
        elif h.dtype(f"{p}_scales") != torch.uint8 or s != b[:-1]:
            res.problems.append(f"{p}_scales has dtype {h.dtype(f'{p}_scales')} shape {s}, expected uint8 {b[:-1]}")
        elif bool((h.tensor(f"{p}_scales") == 255).any()):
            res.problems.append(f"{p}_scales holds E8M0 byte 255 (NaN)")
        res.experts_modules[p.rsplit(".", 1)[0]] = b[0]
        layer = re.search(r"layers\.(\d+)\.", p)
        res.per_layer[layer.group(1) if layer else "-"]["expert"] += 1
    if not stacks:
        res.problems.append("no <param>_blocks tensors: nothing quantized in this mxfp4 checkpoint")
    res.per_layer = {k: dict(v) for k, v in res.per_layer.items()}
    return res
def _check_kv_cache(h: _Headers, layout: str, recipe, P) -> None:
    """With kv_cache: every attention (a module with k_proj and v_proj weights) has positive finite fp32
    scalar k/v scales under the layout's names; without: no k/v scale is present (vLLM would ignore it)."""
    scales = sorted(k for k in h.where if k.endswith((".k_scale", ".v_scale")))
    if recipe.kv_cache is None:
        if scales:
            P(f"{scales[0]} is present, but the config declares no KV cache quantization (vLLM would ignore it)")
        return
    proj = {p: {m[1] for k in h.where if (m := re.match(rf"(.*)\.{p}\.weight(?:_packed)?$", k))} for p in ("k_proj", "v_proj")}
    attention = sorted(proj["k_proj"] & proj["v_proj"])
    if not attention:
        P("the config declares an FP8 KV cache, but no attention module (k_proj and v_proj) is in the checkpoint")
    shape = () if layout == "modelopt" else (1,)
    for attn in attention:
        for key in kv_cache_names(layout, attn).values():
            if key not in h.where:
                P(f"{key} is missing (the config declares an FP8 KV cache)")
                continue
            if h.dtype(key) != torch.float32 or h.shape(key) != shape:
                P(f"{key} has dtype {h.dtype(key)} and shape {h.shape(key)}, expected torch.float32 {shape}")
            t = h.tensor(key).float()
            if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
                P(f"{key} has non-finite or non-positive values")


def _check_module(h: _Headers, stem: str, recipe, ct: bool, P) -> None:
    """One quantized module's tensors (stem + name). Experts under vLLM's fused names ('...w13_') carry no
    int4 weight_shape: vLLM has no loader path for one."""
    def need(name, dtype=None, shape=None):
        k = f"{stem}{name}"
        if k not in h.where:
            P(f"{k} is missing")
            return None
        if dtype is not None and h.dtype(k) != dtype:
            P(f"{k} has dtype {h.dtype(k)}, expected {dtype}")
        if shape is not None and h.shape(k) != shape:
            P(f"{k} has shape {h.shape(k)}, expected {shape}")
        return h.shape(k)

    def positive(name):
        k = f"{stem}{name}"
        if k in h.where:
            t = h.tensor(k).float()
            if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
                P(f"{k} has non-finite or non-positive values")

    def absent(name):
        if f"{stem}{name}" in h.where:
            P(f"{stem}{name} is present, but recipe {recipe.name} writes none")

    c = SimpleNamespace(need=need, positive=positive, absent=absent, tensor=lambda name: h.tensor(f"{stem}{name}"),
                        problem=lambda msg: P(f"{stem}{msg}"), vllm_fused=stem.endswith("_"))
    layout = "compressed-tensors" if ct else "modelopt"
    WEIGHT[recipe.weight].check(c, layout, recipe.group_size)
    if recipe.input is not None:
        INPUT[recipe.input].check(c, layout, recipe.group_size)


def as_json(res: InspectResult) -> str:
    return json.dumps(asdict(res), indent=2)
