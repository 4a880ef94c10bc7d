"""OCP MX formats: one E8M0 scale (a power of two, uint8 exponent with bias 127) per 32
elements along K; elements E2M1 (MXFP4, codes and packing from `fp4`) or E4M3 (MXFP8).

Scale exponent (compressed-tensors' `generate_mx_scales`, not the OCP spec's floor):
the block amax is first rounded to a power of two, UP when its mantissa is >= 0.75
(amax >= 1.75 * 2**e gives 2**(e+1)), then the element's emax is subtracted
(floor(log2(max)): 2 for E2M1, 8 for E4M3): e8m0 = clamp(127 + e - emax, 0, 254).
So an E2M1 block's largest element lands in [3.5, 7) before saturating at 6 (the OCP
floor puts it in [4, 8)), an E4M3 block's in [224, 448) and never saturates.
An all-zero block (or a denormal amax) gets byte 0 = 2**-127 and codes 0, as in
compressed-tensors. Byte 255 (NaN) is never written.
Arithmetic: x / 2**(e8m0 - 127) in float32 (exact: a power of two), then round to the
element grid (E2M1 ties to even, saturating at 6; E4M3 by the float8 cast after clamping
to +-448). Bit-exact with compressed-tensors' MXFP4 / MXFP8 presets for float32 and
bfloat16 inputs (tests/formats/test_mx.py); compressed-tensors computes fp16 scales in
fp16, which underflow for blocks with amax below ~2**-13.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import fp4
from ._checks import check_input

BLOCK_SIZE = 32
E8M0_BIAS = 127
E4M3_MAX = 448.0
# element name -> floor(log2(largest element value)), what the scale exponent subtracts
EMAX = {"e2m1": 2, "e4m3": 8}


class MXTensor(NamedTuple):
    codes: torch.Tensor  # uint8 E2M1 codes (unpacked) or float8_e4m3fn, x's shape [..., K]
    scale: torch.Tensor  # uint8 E8M0 exponents [..., K / 32]


def _element(element: str) -> int:
    if element not in EMAX:
        raise ValueError(f"unknown MX element type {element!r}; choose one of {tuple(EMAX)}")
    return EMAX[element]


def scale_exponent(block_amax: torch.Tensor, element: str) -> torch.Tensor:
    """Block amax (>= 0, any float dtype) -> uint8 E8M0 scale byte (see the module docstring).
    The power-of-two rounding adds a quarter of the exponent's step to the float32 bits
    and drops the mantissa: the same bit trick as compressed-tensors' round_to_power_2."""
    emax = _element(element)
    bits = block_amax.float().view(torch.int32)
    biased = ((bits + (1 << 21)) >> 23) & 0xFF  # float32 biased exponent of the rounded amax
    return (biased - emax).clamp_(0, 254).to(torch.uint8)


def scale_value(e8m0: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 -> float32 2**(e8m0 - 127), exactly (byte 0 = 2**-127, a float32 denormal)."""
    if e8m0.dtype != torch.uint8:
        raise TypeError(f"E8M0 scales must be uint8, got {e8m0.dtype}")
    e = e8m0.to(torch.int32)
    return torch.where(e == 0, torch.full_like(e, 1 << 22), e << 23).view(torch.float32)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    return x.float().unflatten(-1, (x.shape[-1] // BLOCK_SIZE, BLOCK_SIZE))


def _block_amax(xb: torch.Tensor) -> torch.Tensor:
    return torch.maximum(xb.amax(dim=-1), -xb.amin(dim=-1))


def quantize(x: torch.Tensor, element: str = "e2m1") -> MXTensor:
    """x [..., K] (K % 32 == 0) -> MXTensor(codes [..., K], scale uint8 [..., K/32])."""
    check_input(x, BLOCK_SIZE)
    xb = _blocks(x)
    e8m0 = scale_exponent(_block_amax(xb), element)
    y = xb / scale_value(e8m0).unsqueeze(-1)
    if element == "e2m1":
        codes = fp4.round_to_codes(y.clamp(-fp4.FP4_MAX, fp4.FP4_MAX))
    else:
        codes = y.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return MXTensor(codes.flatten(-2), e8m0)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """codes (uint8 E2M1 codes or float8_e4m3fn) [..., K], scale uint8 [..., K/32] -> [..., K]."""
    vals = fp4.decode(codes) if codes.dtype == torch.uint8 else codes.float()
    vals = vals.unflatten(-1, (scale.shape[-1], codes.shape[-1] // scale.shape[-1]))
    return (vals * scale_value(scale).unsqueeze(-1)).flatten(-2).to(dtype)


def fake_quant_unchecked(x: torch.Tensor, element: str = "e2m1") -> torch.Tensor:
    """Hot path (no input checks): dequantize(quantize(x)) in x's dtype, bit-exactly."""
    xb = _blocks(x)
    s = scale_value(scale_exponent(_block_amax(xb), element)).unsqueeze(-1)
    y = xb / s
    if element == "e2m1":
        q = fp4.round_to_values(y)
    else:
        q = y.clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
    return (q * s).flatten(-2).to(x.dtype)


def fake_quant(x: torch.Tensor, element: str = "e2m1") -> torch.Tensor:
    check_input(x, BLOCK_SIZE)
    _element(element)
    return fake_quant_unchecked(x, element)


pack = fp4.pack  # MXFP4 codes: 2 per byte, element 2j in the low nibble
unpack = fp4.unpack
