"""NVFP4: FP4 E2M1 elements, one E4M3 scale per 16 elements along K, one FP32 global scale.

Both on-disk conventions come from this one implementation:
- ModelOpt: `weight_scale_2` / `input_scale` = `scale_2(amax)` = amax / (6 * 448)
- compressed-tensors: `weight_global_scale` / `input_global_scale` = `global_scale(amax)`
  = 1 / scale_2(amax), exactly what compressed-tensors' ModelOpt converter computes, so
  the two exports carry identical codes and block scales.
Arithmetic follows compressed-tensors (block scale = gs * (block_amax / 6), effective
scale = block_scale / gs), validated bit-exact against that package in
tests/formats/test_crosscheck.py. Edge cases follow ModelOpt: block scales are floored at
2**-9 (the smallest E4M3 denormal) and an all-zero block gets scale 1 (codes 0).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import fp4
from ..fused import Fused, const, per_row, rows
from ._checks import check_input, div, expand_amax

BLOCK_SIZE = 16
E4M3_MAX = 448.0
SCALE_FLOOR = 2.0**-9


class NVFP4Tensor(NamedTuple):
    codes: torch.Tensor  # uint8 [..., N, K], E2M1 codes (unpacked)
    block_scale: torch.Tensor  # float8_e4m3fn [..., N, K / 16]
    global_scale: torch.Tensor  # float32, the shape of amax


# Smallest normal float32: keeps 1 / scale_2 finite for amax down to the denormal range.
_MIN_SCALE = 2.0**-126


def scale_2(amax: torch.Tensor) -> torch.Tensor:
    """ModelOpt per-tensor scale: amax / 2688 (1 where amax == 0, floored so 1/scale_2 stays finite)."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return torch.where(amax > 0, div(amax, fp4.FP4_MAX * E4M3_MAX).clamp(min=_MIN_SCALE), torch.ones_like(amax))


def global_scale(amax: torch.Tensor) -> torch.Tensor:
    """compressed-tensors global scale: 1 / scale_2(amax)."""
    return 1.0 / scale_2(amax)


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    return x.float().unflatten(-1, (x.shape[-1] // block_size, block_size))


def _quantize(x: torch.Tensor, gs: torch.Tensor, block_size: int, block_amax=None) -> NVFP4Tensor:
    xb = _blocks(x, block_size)  # [..., N, K/B, B]
    if block_amax is None:
        block_amax = xb.abs().amax(dim=-1)  # [..., N, K/B]
    bs = (gs * div(block_amax, fp4.FP4_MAX)).clamp(SCALE_FLOOR, E4M3_MAX).to(torch.float8_e4m3fn)
    bs = torch.where(block_amax == 0, torch.ones_like(bs), bs)
    eff = bs.float() / gs
    codes = fp4.round_to_codes((xb / eff.unsqueeze(-1)).clamp(-fp4.FP4_MAX, fp4.FP4_MAX))
    return NVFP4Tensor(codes.flatten(-2), bs, gs)


def quantize(x: torch.Tensor, amax, block_size: int = BLOCK_SIZE, block_amax=None) -> NVFP4Tensor:
    """Quantize x [..., N, K] with per-tensor amax covering a prefix of x's dims.
    block_amax: float32 [..., N, K/B], the amax each block scale is computed from instead of
    the block's own (a clipped amax from a calibration algorithm; elements beyond saturate)."""
    check_input(x, block_size)
    amax = torch.as_tensor(amax, dtype=torch.float32, device=x.device)
    q = _quantize(x, global_scale(expand_amax(amax, x)), block_size, block_amax)
    return q._replace(global_scale=q.global_scale.reshape(amax.shape))


def dequantize(codes, block_scale, global_scale, dtype=torch.float32, block_size: int = BLOCK_SIZE):
    """codes [..., N, K] uint8, block_scale [..., N, K/B], global_scale (prefix shape) -> [..., N, K]."""
    vals = fp4.decode(codes).unflatten(-1, (codes.shape[-1] // block_size, block_size))
    gs = torch.as_tensor(global_scale, dtype=torch.float32, device=codes.device)
    gs = gs.reshape(tuple(gs.shape) + (1,) * (block_scale.dim() - gs.dim()))
    eff = block_scale.float() / gs
    return (vals * eff.unsqueeze(-1)).flatten(-2).to(dtype)


def _eff_scale(gs: torch.Tensor, block_amax: torch.Tensor, fp4_max: torch.Tensor) -> torch.Tensor:
    """Each block's effective scale, E4M3 block scale / gs (1 / gs for an all-zero block), float32."""
    bs = (gs * (block_amax / fp4_max)).clamp(SCALE_FLOOR, E4M3_MAX).to(torch.float8_e4m3fn)
    return torch.where(block_amax == 0, 1.0, bs.float()) / gs


def _fq_with_eff(xf: torch.Tensor, eff: torch.Tensor) -> torch.Tensor:
    return fp4.round_to_values(xf / eff) * eff


def _fq_with_amax(xf: torch.Tensor, gs: torch.Tensor, block_amax: torch.Tensor, fp4_max: torch.Tensor) -> torch.Tensor:
    """xf [R, K/B, B] float32, block_amax [R, K/B, 1] -> fake quant in float32."""
    return _fq_with_eff(xf, _eff_scale(gs, block_amax, fp4_max))


def _fq_blocks(xb: torch.Tensor, gs: torch.Tensor, fp4_max: torch.Tensor) -> torch.Tensor:
    """The fused kernel: xb [R, K/B, B] (x's dtype), gs [R, 1, 1] float32, fp4_max the 0-d
    float32 6.0 (a tensor: a compiler keeps x / 6 a division) -> fake quant, xb's shape/dtype."""
    xf = xb.float()
    return _fq_with_amax(xf, gs, xf.abs().amax(dim=-1, keepdim=True), fp4_max).to(xb.dtype)


_FQ = Fused(_fq_blocks, "nvfp4 fake quant", static_last=True)


def fake_quant_with_global_scale(x: torch.Tensor, gs: torch.Tensor, block_size: int = BLOCK_SIZE,
                                 block_amax=None) -> torch.Tensor:
    """Hot-path fake quant (no input checks); gs already shaped to broadcast against x.
    One fused pass over x where compiled (`moeq.fused`), bit-identical to eager.
    block_amax as in `quantize` (fixed per-block amax, from a calibration algorithm: eager)."""
    xb = rows(x).unflatten(-1, (x.shape[-1] // block_size, block_size))
    fp4_max, g = const(fp4.FP4_MAX, x.device), per_row(gs, x, extra=1)
    if block_amax is None:
        return _FQ(xb, g, fp4_max).reshape(x.shape)
    ba = block_amax.float().reshape(xb.shape[0], xb.shape[1], 1)
    return _fq_with_amax(xb.float(), g, ba, fp4_max).to(x.dtype).reshape(x.shape)


def fake_quant(x: torch.Tensor, amax, block_size: int = BLOCK_SIZE, block_amax=None) -> torch.Tensor:
    """dequantize(quantize(x)), bit-exactly, in x's dtype."""
    check_input(x, block_size)
    return fake_quant_with_global_scale(x, global_scale(expand_amax(amax, x)), block_size, block_amax)


def fixed_scales(amax, block_amax: torch.Tensor) -> torch.Tensor:
    """The effective scale (block scale / global scale) of every block, float32 [..., N, K/B], from
    the per-tensor amax (covering a prefix of block_amax's dims) and a fixed block_amax
    [..., N, K/B]: what `fake_quant(x, amax, block_amax=block_amax)` scales each block by."""
    block_amax = block_amax.float()
    gs = global_scale(expand_amax(amax, block_amax))
    return _eff_scale(gs, block_amax, const(fp4.FP4_MAX, block_amax.device))


def fake_quant_scaled(x: torch.Tensor, eff: torch.Tensor) -> torch.Tensor:
    """x (any shape) fake-quantized elementwise with `fixed_scales` broadcast against it, in x's
    dtype, no checks: the arithmetic of `fake_quant` with block_amax, so a column or any slice
    gives bit for bit the values it has in the whole tensor (tests/schemes/test_scaled_fake_quant.py)."""
    return _fq_with_eff(x.float(), eff).to(x.dtype)


pack = fp4.pack
unpack = fp4.unpack
