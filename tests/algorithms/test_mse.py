"""MSE scale search: never a larger reconstruction error than max, per unit and in total,
and a strictly smaller one on weights with outliers; the chosen scales reach the forward."""

from __future__ import annotations

import pytest
import torch

import moeq
from moeq.algorithms import mse
from moeq.quantizer import fake_quant_weight, unit_amax

from schemes.helpers import assert_bits_equal, edge_case_weights

from .helpers import fresh, tm

SCHEMES = ["nvfp4", "w4a16-int4", "fp8", "fp8-dynamic"]


def _weights(dtype):
    torch.manual_seed(0)
    w = torch.randn(4, 32, 256)
    w[:, :, 7] *= 8  # outliers: clipping them is worth it for the others in their unit
    return w.to(dtype)


@pytest.mark.parametrize("preset", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_search_never_worse_than_max(preset, dtype):
    recipe = moeq.get_recipe(preset)
    w = _weights(dtype)
    amax = w.float().abs().amax((1, 2))
    err = lambda q: (q.float() - w.float()).square()  # noqa: E731
    base = err(fake_quant_weight(recipe, w, amax))
    if unit_amax(recipe, w) is None:  # per-tensor: the per-expert amax is searched
        r = mse._pick(mse.tensor_errors(recipe, w, amax))
        got = err(fake_quant_weight(recipe, w, amax * r))
        assert bool((got.sum((1, 2)) <= base.sum((1, 2))).all())
    else:
        ga = mse.search_units(recipe, w, amax)
        assert bool((ga <= unit_amax(recipe, w)).all())
        got = err(fake_quant_weight(recipe, w, amax, ga))
        units = ga.shape[-1]
        per_unit = lambda e: e.unflatten(-1, (units, -1)).sum(-1)  # noqa: E731
        assert bool((per_unit(got) <= per_unit(base)).all())
    assert got.sum() < base.sum()


def checked_search(recipe, w, amax, ratios=mse.RATIOS):
    """The search before the scaled path: the checked whole-tensor fake quant for every ratio."""
    wf = w.float()
    if unit_amax(recipe, w) is None:
        return torch.stack([(fake_quant_weight(recipe, w, amax * r).float() - wf).square().sum((-2, -1))
                            for r in ratios])
    base = unit_amax(recipe, w)
    best, best_err = base, None
    for r in ratios:
        ga = base if r == 1.0 else base * r
        err = (fake_quant_weight(recipe, w, amax, ga).float() - wf).square().unflatten(-1, (base.shape[-1], -1)).sum(-1)
        if best_err is not None:
            better = err < best_err
            best, err = torch.where(better, ga, best), torch.where(better, err, best_err)
        best_err = err
    return best


@pytest.mark.parametrize("preset", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_search_is_the_checked_search_bit_for_bit(preset, dtype):
    recipe = moeq.get_recipe(preset)
    for w, amax in ((_weights(dtype), None), edge_case_weights(recipe.weight, dtype, recipe.group_size)[:2]):
        amax = w.float().abs().amax((1, 2)) if amax is None else amax
        got = mse.tensor_errors(recipe, w, amax) if unit_amax(recipe, w) is None else mse.search_units(recipe, w, amax)
        assert_bits_equal(got, checked_search(recipe, w, amax))
    w2 = _weights(dtype)[0]  # a Linear: [N, K] with a scalar amax
    a2 = w2.float().abs().amax()
    got = mse.tensor_errors(recipe, w2, a2) if unit_amax(recipe, w2) is None else mse.search_units(recipe, w2, a2)
    assert_bits_equal(got, checked_search(recipe, w2, a2))


@pytest.mark.parametrize("preset", ["nvfp4", "w4a16-int4", "fp8"])
def test_quantize_mse_reconstruction(pristine, preset):
    calib = None if preset == "w4a16-int4" else [tm.random_input_ids(pristine("qwen3_5_moe"), 2, 16, seed=1)]
    q = {}
    for alg in ("max", "mse"):
        m = fresh(pristine("qwen3_5_moe"))
        moeq.quantize(m, preset, calib, progress=False, algorithm=alg)
        s = m.moeq_session
        q[alg] = {f"{st.target.name}.{p}": (fq.float() - st.target.param(p).float()).square().sum()
                  for st in s.experts for p, fq in st.fq_weight.items()}
        for n, st in s.linears.items():  # per sibling group: a shared per-tensor scale gets one ratio
            key = str(st.target.group)
            q[alg][key] = q[alg].get(key, 0) + (st.fq_weight["weight"].float() - st.target.module.weight.float()).square().sum()
    assert q["max"].keys() == q["mse"].keys()
    assert all(q["mse"][k] <= q["max"][k] for k in q["max"])
    assert sum(q["mse"].values()) < sum(q["max"].values())
