"""GPTQ's per-expert Hessians: H_e = X_e^T X_e from exactly the rows routed to expert e, the
same under every experts implementation, built here by hand from the recorded routing."""

from __future__ import annotations

import pytest
import torch

import moeq

from .helpers import fresh, record_calls, routed_rows, spy_hessians, tm, unfused


@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
def test_hessian_is_routed_rows_gram(pristine, monkeypatch, impl):
    mt = "qwen3_5_moe"
    m = fresh(pristine(mt), impl)
    name, mod = tm.experts_modules(m)[0]
    w1, _ = unfused(mod)
    seen = spy_hessians(monkeypatch)
    calls, h = record_calls(mod)
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
