"""Issue 7: experts the router never picks, with and without calib_all_experts.

One expert of the first experts module is made unreachable through the model's own router
(gpt-oss: router bias; nemotron_h: the score-correction bias that only affects selection).
Without calib_all_experts it sees no tokens, its input amax stays 0, the report lists it
in never_routed and a warning is logged; with calib_all_experts its input amax comes from
every calibration token, while the routed computation (and so the model's output during
calibration) is unchanged.
"""

from __future__ import annotations

import logging

import pytest
import torch

import moeq
from moeq.formats import nvfp4
from moeq.recipes import Recipe

from .helpers import fresh, gate_ref, tm

NEVER = 5
PER_EXPERT = Recipe("nvfp4-per-expert", weight="nvfp4", input="nvfp4", per_expert_input_scales=True)


def _forbid(model, e: int) -> str:
    name, mod = tm.experts_modules(model)[0]
    parent = model.get_submodule(name.rpartition(".")[0])
    router = getattr(parent, "router", None) or parent.gate
    with torch.no_grad():
        if hasattr(router, "e_score_correction_bias"):
            router.e_score_correction_bias[e] = -1e4  # selection only; routing weights keep the raw scores
        else:
            router.bias[e] = -1e4
    return name


def _calib(model):
    return [tm.random_input_ids(model, 2, 32, seed=s) for s in (1, 2)]


def _run(base, recipe, all_experts: bool, calib):
    """Quantize a copy; return (model, report, logits of each calibration forward, experts inputs)."""
    m = fresh(base)
    name = tm.experts_modules(m)[0][0]
    seen_logits, seen_x = [], []
    h1 = m.register_forward_hook(lambda _m, _a, out: seen_logits.append(out.logits.detach().clone()))
    h2 = m.get_submodule(name).register_forward_pre_hook(lambda _m, a: seen_x.append(a[0].detach().clone()))
    try:
        report = moeq.quantize(m, recipe, calib, calib_all_experts=all_experts, progress=False)
    finally:
        h1.remove()
        h2.remove()
    return m, report, seen_logits, seen_x


@pytest.fixture(scope="module", params=["gpt_oss", "nemotron_h"])
def forbidden(request, pristine):
    base = fresh(pristine(request.param))
    name = _forbid(base, NEVER)
    return request.param, base, name


def test_never_routed_expert(forbidden, caplog):
    mt, base, name = forbidden
    calib = _calib(base)
    with caplog.at_level(logging.WARNING, logger="moeq"):
        m, report, calib_logits, _ = _run(base, PER_EXPERT, False, calib)
    st = m.moeq_session.experts[0]
    assert st.target.name == name
    first, down = st.target.projs
    assert int(st.tokens[NEVER]) == 0
    assert float(st.in_amax[first][NEVER]) == 0.0
    assert float(st.in_amax[down][NEVER]) == 0.0
    assert NEVER in report.never_routed[name]
    assert report.never_routed[name] == [e for e, c in enumerate(st.tokens.tolist()) if c == 0]
    assert report.tokens_per_expert[name][NEVER] == 0
    warnings = [r for r in caplog.records if r.name == "moeq" and r.levelno == logging.WARNING]
    assert any("saw no calibration tokens" in r.getMessage() for r in warnings), [r.getMessage() for r in warnings]
    # Per-expert input scales: the unseen expert falls back to the layer max, never a zero scale.
    for p in (first, down):
        layer = st.in_amax[p].max()
        assert layer > 0
        assert torch.equal(st.input_amax(p)[NEVER], layer)
        torch.testing.assert_close(st.in_param[p][NEVER], nvfp4.global_scale(layer), rtol=0, atol=0)
        assert bool(torch.isfinite(st.in_param[p]).all())


def test_all_experts_statistics_without_changing_the_forward(forbidden):
    mt, base, name = forbidden
    calib = _calib(base)
    m0, _, logits0, _ = _run(base, PER_EXPERT, False, calib)
    m1, report, logits1, xs = _run(base, PER_EXPERT, True, calib)
    st0, st1 = m0.moeq_session.experts[0], m1.moeq_session.experts[0]
    first, down = st1.target.projs

    assert report.calib_all_experts
    assert int(st1.tokens[NEVER]) == 0 and torch.equal(st1.tokens, st0.tokens)  # routed counts are real routing
    assert float(st1.in_amax[first][NEVER]) > 0 and float(st1.in_amax[down][NEVER]) > 0

    # Known answer from the test's own unfused computation over every calibration token.
    mod = m1.get_submodule(name)
    w1 = (mod.gate_up_proj if mod.has_gate else mod.up_proj).detach()
    w1 = w1[NEVER].T if mod.is_transposed else w1[NEVER]
    b1 = getattr(mod, f"{first}_bias")[NEVER].detach() if mod.has_bias else 0
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs])
    with torch.no_grad():
        expected_down = gate_ref(mod, mt, x @ w1.T + b1).abs().max()
    torch.testing.assert_close(st1.in_amax[first][NEVER], x.abs().max(), rtol=0, atol=0)
    torch.testing.assert_close(st1.in_amax[down][NEVER], expected_down, rtol=1e-5, atol=0)
    # Every expert saw at least what real routing showed it.
    for p in (first, down):
        assert bool((st1.in_amax[p] >= st0.in_amax[p]).all())

    # The routed computation is untouched: calibration-time logits are bit-identical, and
    # identical to the unquantized model's.
    assert len(logits0) == len(logits1) == len(calib)
    with torch.no_grad():
        plain = [base(input_ids=ids, use_cache=False).logits for ids in calib]
    for a, b, c in zip(logits0, logits1, plain):
        assert torch.equal(a, b)
        assert torch.equal(a, c)


def test_weight_only_final_logits_unchanged_by_all_experts(forbidden):
    """Weight-only: input statistics do not enter the fake-quant forward, so the final
    logits must not depend on calib_all_experts."""
    _, base, _ = forbidden
    calib = _calib(base)
    ids = tm.random_input_ids(base, 2, 16, seed=99)
    out = []
    for flag in (False, True):
        m, *_ = _run(base, "w4a16-nvfp4", flag, calib)
        with torch.no_grad():
            out.append(m(input_ids=ids, use_cache=False).logits)
    assert torch.equal(out[0], out[1])


def test_expert_parallel_sentinels_do_not_count(pristine):
    """Under expert parallelism transformers routes tokens of remote experts to sentinel id E;
    batched_mm clamps them to E - 1 for its gather. They must not reach expert E - 1's stats."""
    from moeq.quantization import Session
    from moeq.targets import find_targets

    m = fresh(pristine("qwen3_moe"))
    m.set_experts_implementation("batched_mm")
    name, mod = tm.experts_modules(m)[0]
    mod._is_expert_parallel = True
    E = mod.num_experts
    rec = moeq.get_recipe("nvfp4")
    s = Session(m, rec, find_targets(m, rec))
    s.attach(calib_all_experts=False)
    try:
        st = next(x for x in s.experts if x.target.module is mod)
        h = torch.randn(6, m.config.hidden_size)
        idx = torch.tensor([[0, E], [1, E], [E, E], [2, 0], [E, 1], [0, 2]])
        w = torch.full(idx.shape, 0.5)
        with torch.no_grad():
            mod(h, idx, w)
        assert st.tokens.tolist() == [3, 2, 2] + [0] * (E - 3)
        assert st.in_amax[st.target.projs[1]][E - 1] == 0
        assert (st.in_amax[st.target.projs[1]][:3] > 0).all()
    finally:
        s.detach()
