"""INT4 symmetric group-wise weights, compressed-tensors `pack-quantized`.

scale = group_amax / 7.5 (compressed-tensors' symmetric range: (7 - (-8)) / 2), codes
q = clamp(round(x / scale), -8, 7); dequant q * scale. Scales are stored in `scale_dtype`
(default: x's dtype, as compressed-tensors stores them); an all-zero group gets scale 1.
The division is done in float32 (compressed-tensors divides in x's dtype, so for bf16
inputs a quotient within one bf16 ulp of .5 may round the other way; float32 inputs are
bit-exact, see tests/formats/test_crosscheck.py).
Packing: 8 codes per int32, code i at bits 4*i (LSB first), stored offset-binary q + 8.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._checks import check_input, div

GROUP_SIZE = 128
QMIN, QMAX = -8, 7
_HALF_RANGE = (QMAX - QMIN) / 2  # 7.5


class Int4Tensor(NamedTuple):
    codes: torch.Tensor  # int8 in [-8, 7], x's shape
    scale: torch.Tensor  # scale_dtype [..., N, K / group_size]


def fixed_scales(group_amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """group_amax [..., N, K/g] -> the groups' scales in `dtype` (group_amax / 7.5; 1 for an all-zero group)."""
    scale = div(group_amax.float(), _HALF_RANGE).to(dtype)
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def _group_scale(x: torch.Tensor, group_size: int, scale_dtype, group_amax=None) -> torch.Tensor:
    if group_amax is None:
        group_amax = x.unflatten(-1, (x.shape[-1] // group_size, group_size)).abs().amax(dim=-1)
    return fixed_scales(group_amax, scale_dtype or x.dtype)


def _round(xf: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 x / scale (broadcast) -> int8 codes, elementwise."""
    return torch.round(xf / scale.float()).clamp(QMIN, QMAX).to(torch.int8)


def _codes(x: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    xg = x.float().unflatten(-1, (x.shape[-1] // group_size, group_size))
    return _round(xg, scale.unsqueeze(-1)).flatten(-2)


def quantize(x: torch.Tensor, group_size: int = GROUP_SIZE, scale_dtype=None, group_amax=None) -> Int4Tensor:
    """x [..., N, K] -> codes int8 [..., N, K], scale [..., N, K/group_size].
    group_amax: float32 [..., N, K/group_size], the amax each scale is computed from instead
    of the group's own (a clipped amax from a calibration algorithm; codes saturate)."""
    check_input(x, group_size)
    scale = _group_scale(x, group_size, scale_dtype, group_amax)
    return Int4Tensor(_codes(x, scale, group_size), scale)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    group_size = codes.shape[-1] // scale.shape[-1]
    q = codes.to(scale.dtype).unflatten(-1, (scale.shape[-1], group_size))
    return (q * scale.unsqueeze(-1)).flatten(-2).to(dtype)


def fake_quant(x: torch.Tensor, group_size: int = GROUP_SIZE, scale_dtype=None, group_amax=None) -> torch.Tensor:
    q = quantize(x, group_size, scale_dtype, group_amax)
    return dequantize(q.codes, q.scale, x.dtype)


def fake_quant_scaled(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (any shape) fake-quantized elementwise with `fixed_scales` broadcast against it, in x's
    dtype, no checks: the arithmetic of `fake_quant` (codes through int8, so -0.0 comes back +0.0),
    so a column or any slice gives bit for bit the values it has in the whole tensor."""
    return (_round(x.float(), scale).to(scale.dtype) * scale).to(x.dtype)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [..., K] -> int32 [..., K/8]; code i of each 8 at bits 4*i, as q + 8."""
    if codes.dtype != torch.int8:
        raise TypeError(f"INT4 codes must be int8, got {codes.dtype}")
    if codes.shape[-1] % 8:
        raise ValueError(f"cannot pack {codes.shape[-1]} INT4 codes along the last dim; need a multiple of 8")
    u = (codes.to(torch.int64) + 8).unflatten(-1, (codes.shape[-1] // 8, 8))
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=codes.device)
    word = (u << shifts).sum(dim=-1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., K/8] -> int8 codes [..., K]."""
    if packed.dtype != torch.int32:
        raise TypeError(f"packed INT4 must be int32, got {packed.dtype}")
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=packed.device)
    u = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF
    return (u - 8).flatten(-2).to(torch.int8)
