"""Issue 3: per-expert granularity. Scaling expert 3's weights (gate_up/up and down) by ~100
changes expert 3's weight amax and fake-quant weights and leaves every other expert
bit-identical. The factor is 128, a power of two, so expert 3's fake-quant weight must be
exactly 128x the unscaled one in every format (same codes, scales x128)."""

from __future__ import annotations

import pytest
import torch

import moeq

from .helpers import CORE_MODELS, fresh, tm

SCALED = 3
FACTOR = 128.0


@pytest.mark.parametrize("recipe", ["w4a16-nvfp4", "w4a16-int4", "fp8"])
@pytest.mark.parametrize("model_type", CORE_MODELS)
def test_only_the_scaled_expert_changes(pristine, model_type, recipe):
    base = pristine(model_type)
    calib = [tm.random_input_ids(base, 1, 16, seed=1)] if moeq.get_recipe(recipe).input else None
    plain, scaled = fresh(base), fresh(base)
    for _, mod in tm.experts_modules(scaled):
        with torch.no_grad():
            for p in (mod.gate_up_proj if mod.has_gate else mod.up_proj, mod.down_proj):
                p[SCALED] *= FACTOR  # [E, ...] in both storage layouts
    moeq.quantize(plain, recipe, calib, progress=False)
    moeq.quantize(scaled, recipe, calib, progress=False)

    for a, b in zip(plain.moeq_session.experts, scaled.moeq_session.experts):
        E = a.target.num_experts
        others = torch.tensor([e for e in range(E) if e != SCALED])
        for p in a.target.projs:
            assert torch.equal(a.w_amax[p][others], b.w_amax[p][others]), f"{a.target.name}.{p}: other experts' amax changed"
            torch.testing.assert_close(b.w_amax[p][SCALED], a.w_amax[p][SCALED] * FACTOR, rtol=1e-6, atol=0)
            assert torch.equal(a.fq_weight[p][others], b.fq_weight[p][others]), f"{a.target.name}.{p}: other experts' weights changed"
            # Expert 3's quantized weight is exactly 128x the unscaled one (same codes, scales x128).
            torch.testing.assert_close(b.fq_weight[p][SCALED], a.fq_weight[p][SCALED] * FACTOR, rtol=0, atol=0)
            assert not torch.equal(a.fq_weight[p][SCALED], b.fq_weight[p][SCALED])
        if a.gate_amax is not None:
            for key in ("gate_amax", "up_amax"):
                va, vb = getattr(a, key), getattr(b, key)
                assert torch.equal(va[others], vb[others])
                torch.testing.assert_close(vb[SCALED], va[SCALED] * FACTOR, rtol=1e-6, atol=0)
    # Dense layers are untouched by the experts' weights.
    for name, st in plain.moeq_session.linears.items():
        assert torch.equal(st.w_amax, scaled.moeq_session.linears[name].w_amax)
