"""vLLM 0.33's own loader accepts every export moeq writes (and moeq refuses, before calibration, what it cannot).

Each core tiny model (bf16) x preset x layout is quantized, exported and run through the shared check
(`../shared/tools/vllm-load-check/`, one process per checkpoint, see `vllm_check.py`). Skipped unless
MOEQ_VLLM_PYTHON points at the python of a vLLM 0.33 environment (the tool's setup.sh builds it):

    MOEQ_VLLM_PYTHON=$(../shared/tools/vllm-load-check/setup.sh) python -m pytest tests/engines -v

About 45 s per checkpoint on 2 cores (~25 min for the whole module).
"""

from __future__ import annotations

import pytest
import torch

import moeq
from moeq.checkpoint.layouts import UnsupportedExport

from . import vllm_check as vc
from .vllm_check import tm

_reason = vc.skip_reason()
if _reason is not None:
    pytest.skip(_reason, allow_module_level=True)


@pytest.fixture(scope="module")
def cache():
    return {}


def _has_expert_bias(model_type: str) -> bool:
    return any(getattr(m, "has_bias", False) for _, m in tm.experts_modules(tm.tiny_model(model_type)))


@pytest.mark.parametrize("preset,layout", vc.COMBOS)
@pytest.mark.parametrize("model_type", tm.CORE_MODELS)
def test_vllm_loads_export(model_type, preset, layout, cache, tmp_path):
    out = tmp_path / f"{model_type}-{preset}-{layout}"
    refused = vc.export_tiny(model_type, preset, layout, out, cache)
    if refused is not None:
        # refused by design only where vLLM 0.33 has no path: expert biases outside w4a16-int4 compressed-tensors
        assert _has_expert_bias(model_type) and (preset, layout) != ("w4a16-int4", "compressed-tensors"), refused
        assert "\n" not in refused and preset in refused and layout in refused
        model = tm.tiny_model(model_type)
        with pytest.raises(UnsupportedExport):  # before calibration: the data is never iterated
            moeq.quantize(model, preset, iter(_never()), progress=False, layout=layout)
        return
    verdict, res = vc.run_check(out)
    print(f"{model_type} {preset} {layout}: {verdict}")
    assert verdict.startswith("pass"), f"{model_type} {preset} {layout}: {verdict}"


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_vllm_loads_fp8_block(model_type, tmp_path):
    """fp8-block (compressed-tensors only). qwen3_moe with head_dim 64: its tiny k/v projections (64 rows) would
    split a 128-row block of vLLM's fused qkv, which moeq refuses (tests/export/test_export_fp8_block.py)."""
    model = vc.tiny_for_vllm(model_type, **({"head_dim": 64} if model_type == "qwen3_moe" else {}))
    moeq.quantize(model, "fp8-block", progress=False, layout="compressed-tensors")
    moeq.export(model, tmp_path / "out", "compressed-tensors", progress=False)
    verdict, _ = vc.run_check(tmp_path / "out")
    print(f"{model_type} fp8-block compressed-tensors: {verdict}")
    assert verdict.startswith("pass"), verdict


@pytest.mark.parametrize("layout", vc.LAYOUTS)
@pytest.mark.parametrize("preset", ["fp8", "nvfp4"])
@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_vllm_loads_kv_cache_scales(model_type, preset, layout, tmp_path):
    """kv_cache='fp8': vLLM maps every k/v scale onto its attention layer (`attn.k_scale`), none left over."""
    import dataclasses

    model = vc.tiny_for_vllm(model_type)
    recipe = dataclasses.replace(moeq.get_recipe(preset), kv_cache="fp8")
    moeq.quantize(model, recipe, [tm.random_input_ids(model, batch=2, seq=16, seed=s) for s in range(2)],
                  progress=False, layout=layout)
    moeq.export(model, tmp_path / "out", layout, progress=False)
    verdict, _ = vc.run_check(tmp_path / "out")
    print(f"{model_type} {preset}+kv-fp8 {layout}: {verdict}")
    assert verdict.startswith("pass"), verdict


def _never():
    raise AssertionError("calibration data was read before the refusal")
    yield torch.zeros(1, 1, dtype=torch.long)  # pragma: no cover
