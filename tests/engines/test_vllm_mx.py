"""vLLM 0.33's own loader accepts the MX exports (see test_vllm_loader.py for the check; skipped unless
MOEQ_VLLM_PYTHON points at a vLLM 0.33 python). About 45 s per checkpoint on 2 cores.

Measured (2026-11, vllm-load-check, fake B200): qwen3_moe and mixtral mxfp4 / w4a16-mxfp4 / mxfp8 in
compressed-tensors PASS (CompressedTensorsW4A4Mxfp4MoEMethod<MARLIN> / CompressedTensorsW8A8Mxfp8MoEMethod;
vLLM has one MXFP4 MoE method for W4A4 and W4A16: the kernel decides the activations), mxfp8 in ModelOpt PASS
(ModelOptMxFp8FusedMoE), gpt-oss in its own MXFP4 format PASS (GptOssMxfp4MoEMethod)."""

from __future__ import annotations

import pytest
import torch

import moeq
from moeq.checkpoint.layouts import NATIVE
from moeq.recipes import PRESETS

from . import vllm_check as vc
from .vllm_check import tm

_reason = vc.skip_reason()
if _reason is not None:
    pytest.skip(_reason, allow_module_level=True)

COMBOS = [(m, p, "compressed-tensors") for m in ("qwen3_moe", "mixtral") for p in ("mxfp4", "w4a16-mxfp4", "mxfp8")]
COMBOS += [("qwen3_moe", "mxfp8", "modelopt")]


@pytest.mark.parametrize("model_type,preset,layout", COMBOS)
def test_vllm_loads_mx_export(model_type, preset, layout, tmp_path):
    out = tmp_path / f"{model_type}-{preset}-{layout}"
    assert vc.export_tiny(model_type, preset, layout, out) is None
    verdict, _ = vc.run_check(out)
    assert verdict.startswith("pass"), f"{model_type} {preset} {layout}: {verdict}"


@pytest.mark.parametrize("preset", ["w4a16-mxfp4", "mxfp4"])
def test_vllm_loads_gpt_oss_native_mxfp4(tmp_path, preset):
    """hidden_size 256: vLLM's MXFP4 MoE backends pad the hidden size to a multiple of 256 (TRTLLM, Marlin:
    oracle/mxfp4.py mxfp4_round_up_hidden_size_and_intermediate_size) and leave the padding unwritten, which
    the check reports for the stock tiny gpt-oss (hidden 128); gpt-oss-20b's 2880 is padded to 3072 the same way."""
    model = tm.tiny_model("gpt_oss", dtype=torch.bfloat16, hidden_size=256)
    recipe = PRESETS[preset].with_exclude(add=["*q_proj", "*k_proj", "*v_proj", "*o_proj"])
    moeq.quantize(model, recipe, progress=False, layout=NATIVE)
    out = tmp_path / f"gpt_oss-{preset}-native"
    moeq.export(model, out, NATIVE, progress=False)
    verdict, res = vc.run_check(out)
    assert verdict.startswith("pass"), verdict
