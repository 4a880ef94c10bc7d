"""Issue 8: dense nn.Linear layers.

Every nn.Linear not excluded is quantized and fake-quantized in the forward; the default
exclusions (lm_head, routers `*.gate` / `*.router`, `*shared_expert_gate`, Qwen3.5's
`in_proj_a/b`) are reported and untouched; sibling projections that engines fuse (q/k/v,
gate/up, in_proj_qkv/in_proj_z) share one weight amax and one input amax.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moeq
from moeq.formats import nvfp4

from .helpers import CORE_MODELS, fresh, tm

# Written out here rather than read from moeq, so the test checks moeq's table.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("in_proj_qkv", "in_proj_z"),
            ("q_a_proj", "kv_a_proj_with_mqa"))


def _expect_excluded(name: str) -> bool:
    leaf = name.rpartition(".")[2]
    return name == "lm_head" or leaf in ("gate", "router", "shared_expert_gate", "in_proj_a", "in_proj_b")


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _groups(linears: dict) -> dict[str, tuple[str, ...]]:
    out = {}
    for n in linears:
        parent, _, leaf = n.rpartition(".")
        group = (n,)
        for sibs in SIBLINGS:
            if leaf in sibs:
                group = tuple(f"{parent}.{s}" for s in sibs if f"{parent}.{s}" in linears)
        out[n] = group
    return out


@pytest.mark.parametrize("model_type", CORE_MODELS)
def test_every_linear_quantized_or_excluded(pristine, model_type):
    m = fresh(pristine(model_type))
    report = moeq.quantize(m, "w4a16-nvfp4", None, progress=False)
    lin = _linears(m)
    excluded = {n for n in lin if _expect_excluded(n)}
    routers = {f"{e.rpartition('.')[0]}.{r}" for e, _ in tm.experts_modules(m) for r in ("gate", "router")
               if _has(m, f"{e.rpartition('.')[0]}.{r}")}
    experts = {n for n, _ in tm.experts_modules(m)}
    assert "lm_head" in excluded and routers
    if model_type == "qwen3_5_moe":
        assert {n.rpartition(".")[2] for n in excluded} >= {"shared_expert_gate", "in_proj_a", "in_proj_b"}

    assert set(report.quantized) == (set(lin) - excluded) | experts
    assert set(report.excluded) >= excluded | routers
    assert not set(report.quantized) & set(report.excluded)

    groups = _groups(lin)
    states = m.moeq_session.linears
    assert set(states) == set(lin) - excluded
    for n in set(lin) - excluded:
        w = lin[n].weight.detach()
        fq = states[n].fq_weight["weight"]
        assert not torch.equal(fq, w), f"{n}: fake-quant weight equals the weight"
        group_amax = torch.stack([lin[g].weight.detach().abs().amax() for g in groups[n]]).max()
        assert torch.equal(nvfp4.fake_quant(w, group_amax), fq), f"{n}: fake-quant weight is not nvfp4(W, group amax)"

    # In the forward: quantized linears compute with the fake-quant weight, excluded ones with
    # their own weight.
    seen = {}
    hooks = [mod.register_forward_hook(lambda mod, a, o, n=n: seen.__setitem__(n, (a[0].detach(), o.detach())))
             for n, mod in lin.items()]
    with torch.no_grad():
        m(input_ids=tm.random_input_ids(m, 2, 16, seed=99), use_cache=False)
    for h in hooks:
        h.remove()
    assert set(seen) == set(lin), f"linears not run: {set(lin) - set(seen)}"
    for n, (x, y) in seen.items():
        w = states[n].fq_weight["weight"] if n in states else lin[n].weight.detach()
        torch.testing.assert_close(y, F.linear(x, w, lin[n].bias), rtol=1e-6, atol=1e-7, msg=lambda s: f"{n}: {s}")
        if n in excluded:
            assert not (m.get_submodule(n)._forward_pre_hooks or m.get_submodule(n)._forward_hooks)


def _has(model, name):
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


@pytest.mark.parametrize("model_type", ["qwen3_5_moe", "deepseek_v3", "nemotron_h"])
def test_siblings_share_scales_and_forward_matches_reference(pristine, model_type):
    m = fresh(pristine(model_type))
    recipe = moeq.get_recipe("nvfp4")
    lin = _linears(m)
    groups = _groups(lin)
    seen_in: dict[str, torch.Tensor] = {}

    def rec(n):
        def hook(_m, a):
            seen_in[n] = torch.maximum(seen_in.get(n, torch.tensor(0.0)), a[0].detach().abs().amax())
        return hook

    hooks = [mod.register_forward_pre_hook(rec(n)) for n, mod in lin.items()]
    moeq.quantize(m, recipe, [tm.random_input_ids(m, 2, 16, seed=s) for s in (1, 2)], progress=False)
    for h in hooks:
        h.remove()
    states = m.moeq_session.linears
    multi = [g for g in set(groups.values()) if len(g) > 1]
    assert multi, "no sibling group in this model"
    if model_type == "qwen3_5_moe":
        leaves = {tuple(n.rpartition(".")[2] for n in g) for g in multi}
        assert leaves >= set(SIBLINGS[:3])
    for n, st in states.items():
        g = groups[n]
        w_amax = torch.stack([lin[s].weight.detach().abs().amax() for s in g]).max()
        in_amax = torch.stack([seen_in[s] for s in g]).max()
        assert torch.equal(st.w_amax, w_amax), f"{n}: weight amax is not the group max over {g}"
        torch.testing.assert_close(st.shared_in_amax, in_amax, rtol=0, atol=0, msg=lambda s: f"{n}: {s}")
        for s in g:
            assert torch.equal(states[s].w_amax, st.w_amax) and torch.equal(states[s].in_param, st.in_param)

    # Forward of every quantized linear == F.linear(fq_in(x, group in amax), fq_w(W, group w amax)).
    seen = {}
    hooks = [lin[n].register_forward_hook(lambda mod, a, o, n=n: seen.__setitem__(n, (a[0].detach(), o.detach())))
             for n in states]
    with torch.no_grad():
        m(input_ids=tm.random_input_ids(m, 2, 16, seed=99), use_cache=False)
    for h in hooks:
        h.remove()
    for n, (x, y) in seen.items():
        g = groups[n]
        w_amax = torch.stack([lin[s].weight.detach().abs().amax() for s in g]).max()
        in_amax = torch.stack([seen_in[s] for s in g]).max()
        expected = F.linear(nvfp4.fake_quant(x, in_amax), nvfp4.fake_quant(lin[n].weight.detach(), w_amax), lin[n].bias)
        torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-7, msg=lambda s: f"{n}: {s}")
