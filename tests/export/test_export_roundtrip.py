"""quantize -> export -> moeq.load reproduces the in-memory fake-quant model bit for bit,
for every preset x layout x tiny model."""

from __future__ import annotations

import pytest
import torch

import moeq

from .helpers import LAYOUTS, PRESETS, UNWRITABLE, logits, tm

CASES = [(p, lay) for p in PRESETS for lay in LAYOUTS if (p, lay) not in UNWRITABLE]


@pytest.mark.parametrize("model_type", tm.CORE_MODELS)
@pytest.mark.parametrize("preset,layout", CASES)
def test_load_reproduces_quantized_logits(zoo, model_type, preset, layout):
    model, _ = zoo.quantized(model_type, preset)
    ids = zoo.eval_ids(model)
    want = zoo.quantized_logits(model_type, preset)
    # the model is really quantized: a round trip of an unquantized copy would also be exact
    assert not torch.equal(want, zoo.quantized_logits(model_type, None))
    exp = zoo.exported(model_type, preset, layout)
    assert exp.report.layout == layout and exp.report.recipe == preset
    loaded = moeq.load(exp.path)
    assert next(loaded.parameters()).dtype == torch.float32
    got = logits(loaded, ids)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want), f"max abs diff {(got - want).abs().max().item():.3g}"


@pytest.mark.parametrize("model_type", ["qwen3_moe", "nemotron_h"])
def test_int4_in_modelopt_layout_is_refused(zoo, model_type, tmp_path):
    model, _ = zoo.quantized(model_type, "w4a16-int4")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"w4a16-int4 cannot be written in the modelopt layout") as err:
        moeq.export(model, out, "modelopt", progress=False)
    assert "no INT4 scheme" in str(err.value) and "layout='compressed-tensors'" in str(err.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unknown_layout_is_refused(zoo, tmp_path):
    model, _ = zoo.quantized("qwen3_moe", "fp8")
    with pytest.raises(ValueError, match=r"unknown layout 'vllm'.*modelopt.*compressed-tensors"):
        moeq.export(model, tmp_path / "out", "vllm", progress=False)
    assert list(tmp_path.iterdir()) == []
