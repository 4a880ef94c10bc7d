"""GPTQ's per-expert Hessians: H_e = X_e^T X_e from exactly the rows routed to expert e, the
same under every experts implementation, built here by hand from the routing recorded while
the module collects them (layer-sequential: after calibration, on the outputs of the
quantized layers before it)."""

from __future__ import annotations

import pytest
import torch

import moeq
from moeq.formats import nvfp4

from .helpers import HessianSpy, fresh, record_calls, routed_rows, tm, unfused


@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
def test_hessian_is_routed_rows_gram(pristine, monkeypatch, impl):
    mt = "qwen3_5_moe"
    m = fresh(pristine(mt), impl)
    name, mod = tm.experts_modules(m)[0]
    w1, _ = unfused(mod)
    spy = HessianSpy(monkeypatch)
    seen = spy.seen
    calls, h = record_calls(mod, name, spy)
    try:
        moeq.quantize(m, "w4a16-int4", [tm.random_input_ids(m, 2, 16, seed=s) for s in (1, 2)],
                      progress=False, algorithm="gptq")
    finally:
        h.remove()
    H, rows = seen[name]
    first, down = ("gate_up_proj", "down_proj")
    E = w1.shape[0]
    for e in range(E):
        x, act = routed_rows(mod, mt, w1, calls, e)
        assert int(rows[first][e]) == x.shape[0] == int(rows[down][e])
        torch.testing.assert_close(H[first][e], x.T @ x, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(H[down][e], act.T @ act, rtol=1e-5, atol=1e-4)
    # a Linear's Hessian covers every token once
    lin = [n for n in seen if n.endswith("shared_expert.down_proj")]
    assert lin and all(int(seen[n][1]["weight"][0]) == 2 * 2 * 16 for n in lin)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _gptq_recording(monkeypatch, m, recipe, name, mod):
    """GPTQ on two batches, recording the experts module's calls: (spy, calls of the calibration
    pass, calls while it collects its Hessians, batches)."""
    spy = HessianSpy(monkeypatch)
    every, h_all = record_calls(mod)
    hess, h_hess = record_calls(mod, name, spy)
    batches = [tm.random_input_ids(m, 2, 16, seed=s) for s in (1, 2)]
    try:
        moeq.quantize(m, recipe, batches, progress=False, algorithm="gptq")
    finally:
        h_all.remove()
        h_hess.remove()
    return spy, every[:len(batches)], hess, batches  # the calibration pass comes first


EXPERTS_ONLY = ["*.self_attn.*", "*.linear_attn.*", "*.shared_expert.*", "*.shared_expert_gate"]


def test_w4a4_hessians_are_grams_of_fake_quant_inputs(pristine, monkeypatch):
    """nvfp4 (W4A4): each expert's Hessians come from the rows its quantized matmuls multiply,
    the fake-quant hidden states and the fake-quant activated intermediate (of the still
    unquantized gate/up weights), with amax computed here from the calibration rows."""
    mt = "qwen3_5_moe"
    recipe = moeq.get_recipe("nvfp4").with_exclude(add=EXPERTS_ONLY)
    m = fresh(pristine(mt))
    name, mod = tm.experts_modules(m)[0]
    w1, _ = unfused(mod)
    spy, calib, hess, _ = _gptq_recording(monkeypatch, m, recipe, name, mod)
    amax_x = max(x.abs().max() for x, _ in calib).float()
    amax_act = max(routed_rows(mod, mt, w1, calib, e)[1].abs().amax() if calib else 0 for e in range(w1.shape[0]))
    H, rows = spy.seen[name]
    q_calls = [(nvfp4.fake_quant(x.float(), amax_x), idx) for x, idx in hess]
    checked = 0
    for e in range(w1.shape[0]):
        x, act = routed_rows(mod, mt, w1, q_calls, e)
        if x.shape[0] == 0:
            continue
        xq_act = nvfp4.fake_quant(act, amax_act)
        plain_x, plain_act = routed_rows(mod, mt, w1, hess, e)  # what a Hessian of unquantized inputs would be
        for got, want, plain in ((H["gate_up_proj"][e], x.T @ x, plain_x.T @ plain_x),
                                 (H["down_proj"][e], xq_act.T @ xq_act, plain_act.T @ plain_act)):
            # a rare E2M1 rounding flip (matmuls accumulated in another order) moves an entry a little;
            # unquantized inputs move them all (NVFP4's relative error is ~10%)
            assert _rel(got, want) < 1e-3 < 2e-2 < _rel(got, plain), (e, _rel(got, want), _rel(got, plain))
        checked += 1
    assert checked


def test_later_layers_see_the_quantized_earlier_layers(pristine, monkeypatch):
    """Layer-sequential: the second experts module collects its Hessian on the outputs of the
    first layer AFTER GPTQ (what the final quantized model feeds it), not on the calibration
    pass's unquantized activations."""
    recipe = moeq.get_recipe("w4a16-int4").with_exclude(add=EXPERTS_ONLY)
    m = fresh(pristine("qwen3_5_moe"))
    mods = tm.experts_modules(m)
    assert len(mods) >= 2
    name, mod = mods[1]
    _, calib, hess, batches = _gptq_recording(monkeypatch, m, recipe, name, mod)
    final, h_final = record_calls(mod)
    try:
        with torch.no_grad():
            for ids in batches:
                m(input_ids=ids, use_cache=False)
    finally:
        h_final.remove()
    assert len(hess) == len(final) == len(batches)
    for (xh, ih), (xf, if_), (xc, _) in zip(hess, final, calib):
        torch.testing.assert_close(xh, xf, rtol=1e-5, atol=1e-6)
        assert torch.equal(ih, if_)
        assert not torch.allclose(xh, xc, rtol=1e-4, atol=1e-5)
