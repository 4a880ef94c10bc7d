"""FP8 E4M3 (`torch.float8_e4m3fn`, max 448) with a float32 scale = amax / 448.

Per-tensor, per-expert and per-channel scales are all the same call: amax covers a
prefix of x's dims (scalar, [E], [..., N]). Activations use the same function with a
static per-tensor amax from calibration. Matches compressed-tensors' float-quantized
arithmetic (x / scale, clamp, cast), validated bit-exact in tests/formats/test_crosscheck.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..fused import Fused, const, per_row, rows
from ._checks import check_input, expand_amax

E4M3_MAX = 448.0


class FP8Tensor(NamedTuple):
    codes: torch.Tensor  # float8_e4m3fn, x's shape
    scale: torch.Tensor  # float32, the shape of amax


def scale_from_amax(amax) -> torch.Tensor:
    """amax / 448, or 1 where amax == 0 (an all-zero tensor keeps a usable scale); floored at
    the smallest normal float32 so a denormal amax never gives a zero scale."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return _scale(amax, const(E4M3_MAX, amax.device))


def _quantize_with_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize(x: torch.Tensor, amax) -> FP8Tensor:
    check_input(x, 1)
    amax = torch.as_tensor(amax, dtype=torch.float32, device=x.device)
    s = scale_from_amax(expand_amax(amax, x))
    return FP8Tensor(_quantize_with_scale(x, s), s.reshape(amax.shape))


def dequantize(codes: torch.Tensor, scale, dtype=torch.float32) -> torch.Tensor:
    s = torch.as_tensor(scale, dtype=torch.float32, device=codes.device)
    s = s.reshape(tuple(s.shape) + (1,) * (codes.dim() - s.dim()))
    return (codes.float() * s).to(dtype)


def _fq_rows(x2: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fused kernel: x2 [R, K] (x's dtype), scale [R, 1] float32 -> fake quant."""
    return (_quantize_with_scale(x2, scale).float() * scale).to(x2.dtype)


_FQ = Fused(_fq_rows, "fp8 fake quant")


def fake_quant_with_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Hot-path fake quant (no input checks); scale already broadcastable against x[..., :1].
    One fused pass over x where compiled (`moeq.fused`), bit-identical to eager."""
    return _FQ(rows(x), per_row(scale, x)).reshape(x.shape)


def fake_quant_scaled(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (any shape) fake-quantized elementwise with a float32 scale (`scale_from_amax`) broadcast
    against it, without checks: `fake_quant`'s arithmetic, so a column or any slice gives bit for
    bit the values it has in the whole tensor. One scale per row: the fused kernel, as `fake_quant`."""
    if scale.shape[-1:] == (1,) and scale.dim() <= x.dim():
        return fake_quant_with_scale(x, scale)
    return _fq_rows(x, scale)


def _scale(amax: torch.Tensor, e4m3_max: torch.Tensor) -> torch.Tensor:
    return torch.where(amax > 0, (amax / e4m3_max).clamp(min=2.0**-126), torch.ones_like(amax))


def _fq_rows_dynamic(x2: torch.Tensor, e4m3_max: torch.Tensor) -> torch.Tensor:
    """The fused kernel of per-row (per-token) scales: each row of x2 [R, K] gets
    scale_from_amax(max |row|); e4m3_max the 0-d float32 448."""
    amax = torch.maximum(x2.amax(dim=-1), -x2.amin(dim=-1)).float()
    return _fq_rows(x2, _scale(amax, e4m3_max).unsqueeze(-1))


_FQ_DYNAMIC = Fused(_fq_rows_dynamic, "fp8 per-token fake quant")


def fake_quant_per_row(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] fake-quantized with a scale per row from the row's own amax (one pass
    where compiled)."""
    return _FQ_DYNAMIC(rows(x), const(E4M3_MAX, x.device)).reshape(x.shape)


def fake_quant(x: torch.Tensor, amax) -> torch.Tensor:
    check_input(x, 1)
    return fake_quant_with_scale(x, scale_from_amax(expand_amax(amax, x)))


def pack(codes: torch.Tensor) -> torch.Tensor:
    """FP8 is stored as-is (one byte per element); identity, for a uniform format API."""
    return codes


def unpack(packed: torch.Tensor) -> torch.Tensor:
    return packed
