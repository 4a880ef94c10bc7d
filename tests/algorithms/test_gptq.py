"""GPTQ on fused experts against a plain, loop-based reference on one expert's unfused
weight, the fixed-scale round trip (the written-back weights fake-quantize and export to
exactly the GPTQ values) and the round-to-nearest fallback for experts without rows."""

from __future__ import annotations

import pytest
import torch

import moeq
from moeq.algorithms import gptq
from moeq.quantizer import fake_quant_weight, unit_amax

from schemes.helpers import assert_bits_equal, edge_case_weights

from .helpers import HessianSpy, fresh, record_calls, routed_rows, tm, unfused


EXPERTS_ONLY = ["*.self_attn.*", "*.linear_attn.*", "*.shared_expert.*"]  # faster: GPTQ on the experts alone


def reference_gptq(recipe, w: torch.Tensor, H: torch.Tensor, amax, group_amax) -> torch.Tensor:
    """Textbook GPTQ on one [N, K] weight, one column at a time (no blocks, no lazy updates),
    scales fixed from group_amax [N, K/g] (or amax for per-tensor schemes)."""
    W, H = w.double().clone(), H.double().clone()
    N, K = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += gptq.PERCDAMP * torch.mean(torch.diag(H)) * torch.eye(K, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    g = None if group_amax is None else K // group_amax.shape[-1]
    Q = torch.zeros_like(W)
    for j in range(K):
        col = W[:, j].to(w.dtype).unsqueeze(-1)
        ga = None if group_amax is None else group_amax[:, j // g:j // g + 1]
        q = fake_quant_weight(recipe, col, amax, ga).double().squeeze(-1)
        Q[:, j] = q
        err = (W[:, j] - q) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
    return Q


def checked_column_quantizer(recipe, dtype, amax, group_amax, k):
    """The column quantizer before the scales were computed once: each column [E, N] through the
    whole checked fake quant (checks, scale arithmetic, rounding), its unit's amax gathered."""
    g = None if group_amax is None else k // group_amax.shape[-1]

    def quant_col(col, j):
        x = col.to(dtype).unsqueeze(-1)
        if group_amax is None:
            return fake_quant_weight(recipe, x, amax).float().squeeze(-1)
        idx = (j // g)[:, None, None].expand(col.shape[0], col.shape[1], 1)
        return fake_quant_weight(recipe, x, amax, group_amax.gather(2, idx)).float().squeeze(-1)

    return quant_col


@pytest.mark.parametrize("preset", ["nvfp4", "w4a16-int4", "fp8", "fp8-dynamic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_column_quantizer_is_the_checked_fake_quant_bit_for_bit(preset, dtype):
    """Every column (a different one per expert, as act-order picks them; ties, saturation, zero
    units: tests/schemes/helpers.py), and the whole solve, plain and act-order, are bit for bit
    what the checked per-column fake quant gives."""
    recipe = moeq.get_recipe(preset)
    w, amax, ga = edge_case_weights(recipe.weight, dtype, recipe.group_size)
    E, N, K = w.shape
    fast, checked = (q(recipe, dtype, amax, ga, K) for q in (gptq.column_quantizer, checked_column_quantizer))
    g = torch.Generator().manual_seed(1)
    perm = torch.stack([torch.randperm(K, generator=g) for _ in range(E)])
    for i in range(K):
        j = perm[:, i]
        col = w.gather(2, j[:, None, None].expand(E, N, 1)).squeeze(-1).float()
        assert_bits_equal(fast(col, j), checked(col, j), f"column {i}")
    x = torch.randn(E, 96, K, generator=g) * torch.rand(K, generator=g) * 3
    x[1, :, 5] = 0  # a dead input channel
    H = x.transpose(1, 2) @ x
    for act_order in (False, True):
        want = gptq.solve(w.float(), H, checked, block=64, act_order=act_order)
        assert_bits_equal(gptq.solve(w.float(), H, fast, block=64, act_order=act_order), want, f"act_order={act_order}")


@pytest.mark.parametrize("preset", ["nvfp4", "w4a16-int4"])
def test_linears_solved_as_stacks_equal_one_solve_each(pristine, monkeypatch, preset):
    """solve_linears stacks the Linears of one shape into one solve; every weight is bit for bit
    what a solve of its own gives (one Linear per call, as before the stacking)."""
    sizes, solve, stacked = [], gptq.solve, gptq.solve_linears
    monkeypatch.setattr(gptq, "solve", lambda w, *a, **k: sizes.append(w.shape[0]) or solve(w, *a, **k))
    weights = {}
    for one_each in (False, True):
        if one_each:
            monkeypatch.setattr(gptq, "solve_linears", lambda r, lins, rep, ao=False: [stacked(r, [x], rep, ao) for x in lins])
        sizes.clear()
        m = fresh(pristine("qwen3_5_moe"))
        moeq.quantize(m, preset, [tm.random_input_ids(m, 2, 16, seed=1)], progress=False, algorithm="gptq")
        n_linears = len(m.moeq_session.linears)
        weights[one_each] = ({k: v.clone() for k, v in m.state_dict().items()}, list(sizes))
    (got, stacked_sizes), (want, single_sizes) = weights[False], weights[True]
    assert n_linears and len(stacked_sizes) < len(single_sizes)  # stacks did form
    for k in want:
        assert_bits_equal(got[k], want[k], k)


def test_solve_refuses_non_finite_columns():
    recipe = moeq.get_recipe("nvfp4")
    w = torch.randn(2, 8, 64)
    amax, ga = w.abs().amax((1, 2)), unit_amax(recipe, w)
    w[1, 3, 40] = float("inf")  # after the scales: only the solve sees it
    with pytest.raises(ValueError, match="NaN or Inf"):
        gptq.solve(w, torch.eye(64).expand(2, 64, 64), gptq.column_quantizer(recipe, w.dtype, amax, ga, 64))


@pytest.mark.parametrize("preset", ["w4a16-int4", "nvfp4", "fp8"])
def test_solve_matches_reference(preset):
    recipe = moeq.get_recipe(preset)
    torch.manual_seed(0)
    E, N, K = 3, 16, 256
    w = torch.randn(E, N, K)
    x = torch.randn(E, 512, K) * torch.rand(K) * 3  # uneven channel scales: GPTQ has work to do
    x[1, :, 5] = 0  # a dead input channel
    H = x.transpose(1, 2) @ x
    amax = w.abs().amax((1, 2))
    ga = unit_amax(recipe, w)
    got = gptq.solve(w, H, gptq.column_quantizer(recipe, w.dtype, amax, ga, K), block=64)
    rtn = fake_quant_weight(recipe, w, amax, ga)
    for e in range(E):
        ref = reference_gptq(recipe, w[e], H[e], amax[e], None if ga is None else ga[e]).float()
        assert (got[e] == ref).float().mean() > 0.99  # float64 vs float32 may flip a rare rounding
        loss = lambda q: float(torch.einsum("nk,kl,nl->", q - w[e], H[e], q - w[e]))  # noqa: E731
        assert abs(loss(got[e]) - loss(ref)) <= 1e-3 * loss(ref)
        assert loss(got[e]) < 0.9 * loss(rtn[e])  # and it is better than round-to-nearest


def test_act_order_is_a_permutation_of_the_problem():
    recipe = moeq.get_recipe("fp8")
    torch.manual_seed(1)
    w = torch.randn(2, 8, 64)
    x = torch.randn(2, 200, 64) * torch.rand(64)
    H = x.transpose(1, 2) @ x
    amax = w.abs().amax((1, 2))
    qc = gptq.column_quantizer(recipe, w.dtype, amax, None, 64)
    plain, ordered = gptq.solve(w, H, qc), gptq.solve(w, H, qc, act_order=True)
    loss = lambda q: torch.einsum("enk,ekl,enl->e", q - w, H, q - w)  # noqa: E731
    assert not torch.equal(plain, ordered)
    assert bool((loss(ordered) < 1.2 * loss(plain)).all())


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
def test_one_expert_equals_reference_from_routed_rows(pristine, monkeypatch, impl):
    """moeq's GPTQ on a fused stack == the reference on expert e's own weight and the rows
    routed to it (Hessian built here by hand)."""
    mt = "qwen3_5_moe"
    recipe = moeq.get_recipe("w4a16-int4").with_exclude(add=EXPERTS_ONLY)
    m = fresh(pristine(mt), impl)
    name, mod = tm.experts_modules(m)[0]
    w1, w2 = unfused(mod)
    calls, h = record_calls(mod, name, HessianSpy(monkeypatch))
    try:
        rep = moeq.quantize(m, recipe, [tm.random_input_ids(m, 2, 16, seed=s) for s in (1, 2)],
                            progress=False, algorithm="gptq")
    finally:
        h.remove()
    new1, new2 = unfused(mod)
    checked = 0
    for e in range(w1.shape[0]):
        if checked == 3:
            break
        x, act = routed_rows(mod, mt, w1, calls, e)
        if x.shape[0] == 0:
            assert torch.equal(new1[e], w1[e]) and e in rep.rtn_fallback.get(name, [])
            continue
        checked += 1
        for w, new, rows in ((w1[e], new1[e], x), (w2[e], new2[e], act)):
            ref = reference_gptq(recipe, w, rows.T @ rows, None, unit_amax(recipe, w)).to(w.dtype)
            assert (new == ref).float().mean() > 0.99
    assert checked


@pytest.mark.parametrize("preset,layout,algorithm,dtype", [
    ("w4a16-int4", "compressed-tensors", "gptq", torch.float32),
    ("nvfp4", "modelopt", "mse+gptq", torch.bfloat16),
    ("fp8", "compressed-tensors", "mse", torch.float32),
    ("w4a16-int4", "compressed-tensors", "mse+gptq", torch.bfloat16),
])
def test_export_loads_back_bit_exact(pristine, tmp_path, preset, layout, algorithm, dtype):
    """fp32: moeq.load(export) logits == in-memory logits. bf16 (where rounding the GPTQ
    values to the parameter dtype could break the round trip): loaded weights == in-memory
    fake-quant weights (a bf16 tiny model's logits differ after load even for max, outside
    the quantized weights)."""
    m = fresh(pristine("qwen3_5_moe")).to(dtype)
    moeq.quantize(m, preset, [tm.random_input_ids(m, 2, 16, seed=1)], progress=False, algorithm=algorithm)
    s = m.moeq_session
    if "gptq" in algorithm:  # the written-back weights are their own fake quant
        for st in [*s.experts, *s.linears.values()]:
            for p, fq in st.fq_weight.items():
                assert torch.equal(fq, getattr(st.target.module, p))
    ids = tm.random_input_ids(m, 1, 12, seed=3)
    with torch.no_grad():
        want = m(input_ids=ids, use_cache=False).logits
    moeq.export(m, tmp_path / "out", layout, progress=False)
    back = moeq.load(tmp_path / "out")
    sd = back.state_dict()
    for st in s.experts:
        for p, fq in st.fq_weight.items():
            assert torch.equal(sd[f"{st.target.name}.{p}"].to(dtype), fq), (st.target.name, p)
    for n, st in s.linears.items():
        assert torch.equal(sd[f"{n}.weight"].to(dtype), st.fq_weight["weight"]), n
    if dtype == torch.float32:
        with torch.no_grad():
            got = back(input_ids=ids, use_cache=False).logits
        assert torch.equal(got, want)


def test_experts_without_rows_fall_back_to_rtn(pristine):
    m = fresh(pristine("qwen3_5_moe"))
    name, mod = tm.experts_modules(m)[0]
    w1, _ = unfused(mod)
    rep = moeq.quantize(m, "w4a16-int4", [tm.random_input_ids(m, 1, 1, seed=1)], progress=False, algorithm="gptq")
    unseen = rep.never_routed[name]
    assert unseen and rep.rtn_fallback[name] == unseen
    new1, _ = unfused(mod)
    assert all(torch.equal(new1[e], w1[e]) for e in unseen)
    assert any("round-to-nearest" in w for w in rep.warnings)
