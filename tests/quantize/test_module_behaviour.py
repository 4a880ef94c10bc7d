"""Issue 13: after moeq.quantize the model behaves like any nn.Module: it can be cast and
moved, wrapped and compiled, its fake-quant forward keeps no second copy of the weights,
and coverage is checked with or without calibration data."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import moeq
from moeq.interception import ExpertsIntercept

from .helpers import fresh, logits, tm


@pytest.fixture
def calib(pristine):
    return [tm.random_input_ids(pristine("qwen3_moe"), 2, 16, seed=1)]


@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
def test_cast_after_quantize(pristine, calib, impl):
    """model.to(bfloat16) used to fail in the next forward (cached fp32 fake-quant weights);
    a lossless float64 round trip must give back the very same logits."""
    m = fresh(pristine("qwen3_moe"), impl)
    moeq.quantize(m, "nvfp4", calib, progress=False)
    ids = tm.random_input_ids(m, 2, 16, seed=5)
    before = logits(m, ids)
    m.to(torch.bfloat16)
    low = logits(m, ids)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), before, atol=0.15, rtol=0.1)
    m.to(torch.float32)  # weights are bf16-rounded now: the forward follows them, not a stale copy
    torch.testing.assert_close(logits(m, ids), before, atol=0.15, rtol=0.1)


def test_float64_round_trip_is_exact(pristine, calib):
    m = fresh(pristine("mixtral"))
    moeq.quantize(m, "fp8", calib, progress=False)
    ids = tm.random_input_ids(m, 2, 16, seed=5)
    before = logits(m, ids)
    m.to(torch.float64).to(torch.float32)
    assert torch.equal(logits(m, ids), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_move_to_cuda_after_quantize(pristine, calib):
    m = fresh(pristine("qwen3_moe"))
    moeq.quantize(m, "nvfp4", calib, progress=False)
    ids = tm.random_input_ids(m, 2, 16, seed=5)
    cpu = logits(m, ids)
    m.cuda()
    torch.testing.assert_close(logits(m, ids.cuda()).cpu(), cpu, atol=1e-4, rtol=1e-4)


class Parent(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.head = nn.Linear(4, 4)  # a user's own layer beside the model: not moeq's business

    def forward(self, **kw):
        return self.lm(**kw)


@pytest.mark.parametrize("wrap", ["parent", "compile"])
def test_excludes_relative_to_the_model_inside_wrappers(pristine, calib, wrap, tmp_path):
    """Through a wrapper, patterns like lm_head used to miss (lm_head got quantized)."""
    direct = fresh(pristine("qwen3_moe"))
    rep_d = moeq.quantize(direct, "nvfp4", calib, progress=False)
    inner = fresh(pristine("qwen3_moe"))
    wrapper = Parent(inner) if wrap == "parent" else torch.compile(inner)
    rep_w = moeq.quantize(wrapper, "nvfp4", calib, progress=False)
    assert rep_w.quantized == rep_d.quantized and "lm_head" in rep_w.excluded
    ids = tm.random_input_ids(inner, 2, 16, seed=5)
    assert torch.equal(logits(inner, ids), logits(direct, ids))
    moeq.export(wrapper, tmp_path / "w", progress=False)
    moeq.export(direct, tmp_path / "d", progress=False)
    assert (tmp_path / "w" / "model.safetensors").read_bytes() == (tmp_path / "d" / "model.safetensors").read_bytes()


def test_compiled_forward_after_quantize(pristine, calib):
    """torch.compile of the quantized model traces through moeq's interception (aot_eager:
    the graph capture inductor would get, without the minutes of C++ compilation here)."""
    m = fresh(pristine("qwen3_moe"))
    moeq.quantize(m, "nvfp4", calib, progress=False)
    ids = tm.random_input_ids(m, 2, 16, seed=5)
    eager = logits(m, ids)
    with torch.no_grad():
        out = torch.compile(m, backend="aot_eager")(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)


def test_no_second_copy_of_the_weights(pristine, calib):
    """Nothing the size of a weight outlives a forward: the session holds only scales."""
    m = fresh(pristine("qwen3_moe"))
    moeq.quantize(m, "nvfp4", calib, cache_weights=False, progress=False)
    logits(m, calib[0])
    s = m.moeq_session
    held = [t for st in [*s.experts, *s.linears.values()] for t in _tensors(vars(st))]
    params = sum(p.numel() for p in m.parameters())
    assert sum(t.numel() for t in held) < 0.01 * params


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_cache_weights_option_gives_identical_logits(pristine, calib):
    a, b = fresh(pristine("qwen3_moe")), fresh(pristine("qwen3_moe"))
    moeq.quantize(a, "nvfp4", calib, cache_weights=False, progress=False)
    moeq.quantize(b, "nvfp4", calib, cache_weights=True, progress=False)
    ids = tm.random_input_ids(a, 2, 16, seed=5)
    assert torch.equal(logits(a, ids), logits(b, ids))
    assert torch.equal(logits(b, ids), logits(a, ids))  # second call from the cache


def test_gathered_weights_die_with_their_op(pristine, calib, monkeypatch):
    """Under batched_mm the gate_up gather must be freed before the down projection runs
    (the intercept used to keep every gathered view alive until the forward ended)."""
    m = fresh(pristine("qwen3_moe"), "batched_mm")
    moeq.quantize(m, "nvfp4", calib, progress=False)
    seen = {}
    orig = ExpertsIntercept._matmul

    def spy(self, func, args, kwargs, tagged):
        proj = tagged[0][2].proj
        if proj == "gate_up_proj":
            seen["gather"] = weakref.ref(tagged[0][1])
        elif "gather" in seen:
            gc.collect()
            seen["alive_at_down"] = seen["gather"]() is not None
        return orig(self, func, args, kwargs, tagged)

    monkeypatch.setattr(ExpertsIntercept, "_matmul", spy)
    logits(m, calib[0])
    assert seen.get("alive_at_down") is False


def test_weight_only_without_data_checks_coverage(pristine):
    """Jamba's dt_proj multiplies its weight outside its own forward: without calibration data
    it used to be exported quantized while the in-memory model never fake-quantized it."""
    m = fresh(pristine("jamba"))
    rep = moeq.quantize(m, "w4a16-nvfp4", None, progress=False)
    dt = [n for n, _ in m.named_modules() if n.endswith("dt_proj")]
    assert dt and set(dt) <= set(rep.excluded)
    assert not set(dt) & set(rep.quantized)
    assert any("dt_proj" in w for w in rep.warnings)


@pytest.mark.parametrize("free,cached", [(10**12, True), (10**5, False)])
def test_cache_decided_by_free_memory(pristine, calib, monkeypatch, free, cached):
    """Default: the fake-quant weights are cached only when a copy fits easily."""
    import importlib

    q = importlib.import_module("moeq.quantization")

    monkeypatch.setattr(q, "free_bytes", lambda device: free)
    m = fresh(pristine("qwen3_moe"))
    moeq.quantize(m, "nvfp4", calib, progress=False)
    assert all((st.cache is not None) == cached for st in m.moeq_session.experts)
