"""Weights that put every rounding edge of a weight scheme in one stack, and a bit-level equality.

`edge_case_weights` mixes, per row (per expert for per-tensor schemes):
- lattice rows: values m/16 * 2**k (|m| <= 200, exact in bf16) with fixed unit amaxes whose
  scale is exactly 2**k, so x / scale lands on the ties of every grid (FP4 0.25, 0.75, ..., 5;
  INT4 half-integers; E4M3 midpoints) and beyond the largest code (saturation);
- rows clipped as MSE clips them (unit amax * a random ratio in [0.5, 1]), and rows at their own
  max (max calibration);
- a row of zeros, -0.0, denormals and one large value, with a zero unit amax in some units
  (the "all-zero unit gets scale 1" branch applied to nonzero values too);
- near-tie rows: clipped unit amaxes (scales that are not powers of two) and values within 2 ulps
  (of w's dtype) of tie * scale, where a different order of the same arithmetic (x * (1/s) for
  x / s, a scale rounded differently) rounds the other way.
"""

from __future__ import annotations

import torch

from moeq.schemes.table import WEIGHT

# the unit amax whose scale is 1 (NVFP4: with the global scale 1, i.e. tensor amax 6 * 448)
UNIT_ONE = {"nvfp4": 6.0, "int4": 7.5, "fp8": 448.0, "fp8-channel": 448.0}
NVFP4_GS_ONE = 6.0 * 448.0
# |x| / scale where rounding turns: FP4 thresholds, INT4 half-integers, E4M3 midpoints (subnormal to saturation)
TIES = {"nvfp4": (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0),
        "int4": (0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5),
        "fp8": (2.0**-10, 3 * 2.0**-10, 2.0**-6 * 1.0625, 1.0625, 1.1875, 8.5, 9.5, 136.0, 248.0, 464.0)}
TIES["fp8-channel"] = TIES["fp8"]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits (torch.equal on floats calls -0.0 == 0.0 and NaN != NaN)."""
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()])


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape, want.shape)
    same = bits(got) == bits(want)
    assert bool(same.all()), f"{what}: {int((~same).sum())} elements differ, e.g. {got[~same][:4]} vs {want[~same][:4]}"


def edge_case_weights(name: str, dtype: torch.dtype, group_size: int, E: int = 3, N: int = 16, K: int = 256,
                      seed: int = 0):
    """-> (w [E, N, K] in dtype, amax [E] float32, group_amax [E, N, U] float32 or None (per tensor))."""
    g = torch.Generator().manual_seed(seed)
    pow2 = 2.0 ** torch.randint(-6, 4, (E, N, 1), generator=g).float()
    lattice = torch.randint(-200, 201, (E, N, K), generator=g).float() / 16 * pow2
    w = torch.randn(E, N, K, generator=g) * pow2
    kind = torch.arange(N) % 5  # 0 lattice, 1 clipped, 2 own max, 3 special, 4 near-tie
    w = torch.where((kind == 0)[None, :, None], lattice, w)
    special = w[:, kind == 3]
    special[..., 0::5] = 0.0
    special[..., 1::5] = -0.0
    special[..., 2::5] = 1e-39  # a float32 / bf16 denormal
    special[..., 3::5] = -3e-40
    special[..., 4] = 300.0
    w[:, kind == 3] = special
    w = w.to(dtype)
    wf = w.float()
    amax = wf.abs().amax((1, 2))
    s = WEIGHT[name]
    if s.unit_amax is None:  # per tensor: expert 0 on the lattice grid, expert 1 clipped, expert 2 amax 0
        k = pow2[0, 0, 0]
        w[0] = (lattice[0] / pow2[0] * k).to(dtype)
        amax = torch.stack([UNIT_ONE[name] * k, amax[1] * 0.7, torch.zeros(())] + list(amax[3:]))
        return _near_ties(w, kind, s.scales(amax, None, dtype), TIES[name], g), amax, None
    ga = s.unit_amax(w, group_size)
    U = ga.shape[-1]
    ratio = 0.5 + 0.5 * torch.rand(ga.shape, generator=g)
    ga = torch.where(((kind == 1) | (kind == 4))[None, :, None], ga * ratio, ga)
    ga = torch.where((kind == 0)[None, :, None], UNIT_ONE[name] * pow2.expand(E, N, U), ga)
    zero_unit = (kind == 3)[None, :, None] & (torch.arange(U) % 3 == 0)
    ga = torch.where(zero_unit, torch.zeros(()), ga)
    if name == "nvfp4":
        amax[:2] = NVFP4_GS_ONE  # global scale 1: lattice rows of experts 0 and 1 get block scales exactly 2**k
    return _near_ties(w, kind, s.scales(amax, ga, dtype), TIES[name], g), amax, ga


def _near_ties(w, kind, scales, ties, g):
    """Rows of kind 4 set to +-tie * (their unit's scale), moved 0..2 ulps of w's dtype either way."""
    E, N, K = w.shape
    sc = scales.float().repeat_interleave(K // scales.shape[-1], -1).expand(E, N, K)
    t = torch.tensor(ties)[torch.randint(len(ties), (E, N, K), generator=g)]
    mag = (t * sc).to(w.dtype)
    ulps = torch.randint(-2, 3, (E, N, K), generator=g).to(bits(mag).dtype)
    mag = (bits(mag) + torch.where(mag > 0, ulps, 0)).view(w.dtype)
    sign = torch.where(torch.rand(E, N, K, generator=g) < 0.5, -1.0, 1.0).to(w.dtype)
    return torch.where((kind == 4)[None, :, None], mag * sign, w)
