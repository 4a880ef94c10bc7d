"""MSE scale search: never a larger reconstruction error than max, per unit and in total,
and a strictly smaller one on weights with outliers; the chosen scales reach the forward."""

from __future__ import annotations

import pytest
import torch

import moeq
from moeq.algorithms import mse
from moeq.quantizer import fake_quant_weight, unit_amax

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
