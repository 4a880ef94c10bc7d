"""The fixed-scale fake quant (WeightScheme.scales + fake_quant_scaled) that GPTQ's column loop
and MSE's search run on gives, for the whole tensor, any slice across unit boundaries and every
single column, bit for bit the values the checked whole-tensor fake quant gives them."""

from __future__ import annotations

import pytest
import torch

from moeq.algorithms import check_supported
from moeq.recipes import PRESETS
from moeq.schemes.table import WEIGHT

from .helpers import UNIT_ONE, assert_bits_equal, edge_case_weights

CASES = [("nvfp4", 16), ("int4", 128), ("int4", 32), ("fp8", 1), ("fp8-channel", 1)]


def _supported(recipe) -> bool:
    try:
        check_supported(("gptq",), recipe)
    except ValueError:
        return False
    return True


def test_the_schemes_algorithms_accept_are_the_ones_tested_here():
    assert {r.weight for r in PRESETS.values()} == set(WEIGHT)
    supported = {r.weight for r in PRESETS.values() if _supported(r)}
    assert sorted(supported) == sorted({n for n, _ in CASES}) == sorted(UNIT_ONE)


@pytest.mark.parametrize("name,group_size", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_fake_quant_is_the_checked_one_bit_for_bit(name, group_size, dtype):
    s = WEIGHT[name]
    w, amax, ga = edge_case_weights(name, dtype, group_size)
    E, N, K = w.shape
    want = s.fake_quant(w, amax, group_size) if ga is None else s.fake_quant(w, amax, group_size, group_amax=ga)
    sc = s.scales(amax, ga, dtype)
    U = sc.shape[-1]
    assert sc.shape == ((E, 1, 1) if ga is None else (E, N, U))
    got = s.fake_quant_scaled(w.unflatten(-1, (U, -1)), sc.unsqueeze(-1)).flatten(-2)
    assert_bits_equal(got, want, "whole tensor")

    per_elem = sc.repeat_interleave(K // U, -1).expand(E, N, K)  # each element's unit scale
    a = K // U // 2
    b = min(K, a + K // U + 3)  # crosses a unit boundary (a plain slice for a per-tensor scale)
    assert_bits_equal(s.fake_quant_scaled(w[..., a:b], per_elem[..., a:b]), want[..., a:b], "slice")
    for j in range(K):  # every column alone, as GPTQ quantizes it
        assert_bits_equal(s.fake_quant_scaled(w[..., j], per_elem[..., j]), want[..., j], f"column {j}")


@pytest.mark.parametrize("name,group_size", CASES)
def test_edge_case_weights_reach_ties_saturation_and_zero_units(name, group_size):
    """The weights above are worth testing on: exact rounding ties, saturation, signed zeros."""
    s = WEIGHT[name]
    w, amax, ga = edge_case_weights(name, torch.float32, group_size)
    sc = s.scales(amax, ga, torch.float32)
    U = sc.shape[-1]
    v = (w.unflatten(-1, (U, -1)) / sc.unsqueeze(-1)).abs()
    if name == "nvfp4":
        ties = sum(int((v == t).sum()) for t in (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0))
        top = 6.0
    elif name == "int4":
        ties, top = int(((v * 2) % 2 == 1).sum()), 7.5
    else:  # E4M3 midpoints: 2**e * (1 + odd / 16) in the normal range
        e = torch.floor(torch.log2(v.clamp(min=2.0**-6)))
        r = v / 2.0**e * 16
        ties, top = int(((v >= 2.0**-6) & (v <= 448) & (r == r.round()) & (r % 2 == 1)).sum()), 448.0
    assert ties > 20, ties
    assert bool((v > top).any())  # saturating (clipped) elements
    assert bool(torch.signbit(w[w == 0]).any()) and bool((w == 0).any())
    if ga is not None:
        assert bool((ga == 0).any()) and bool((w.unflatten(-1, (U, -1))[ga == 0] != 0).any())
