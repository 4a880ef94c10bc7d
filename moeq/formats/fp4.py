"""FP4 E2M1 element codes: rounding, decoding and nibble packing.

Code index 0..7 = 0, 0.5, 1, 1.5, 2, 3, 4, 6; bit 3 is the sign (8 = -0.0).
Rounding is to nearest with ties to the even code, saturating at +-6, the same
thresholds as compressed-tensors' `cast_to_fp4` (validated bit-exact in
tests/formats/test_crosscheck.py). Packing: element 2j in the low nibble, 2j+1 in the
high nibble (ModelOpt, vLLM and compressed-tensors agree).
"""

from __future__ import annotations

import torch

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_MAX = 6.0

# (threshold, inclusive): a magnitude passes a threshold when > it (or >= if inclusive).
# Inclusive where the upper neighbour has the even code, so ties go to even codes.
_THRESHOLDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def round_to_codes(x: torch.Tensor) -> torch.Tensor:
    """Round already-scaled values to E2M1 codes (uint8 in 0..15), saturating at +-6."""
    a = x.abs()
    mag = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for t, inclusive in _THRESHOLDS:
        mag += (a >= t) if inclusive else (a > t)
    # x < 0 (not signbit): -0.0 inputs give +0, small negatives give code 8 (-0.0), as in compressed-tensors.
    return mag | ((x < 0).to(torch.uint8) << 3)


def round_to_values(x: torch.Tensor) -> torch.Tensor:
    """Round already-scaled float values to the nearest E2M1 value (same ties and saturation
    as round_to_codes, without going through codes): the fake-quant hot path. The grid has
    step 0.5 below 2, 1 below 4 and 2 up to 6, and torch.round rounds half to even, which
    is the even code at every tie."""
    a = x.abs().clamp_(max=FP4_MAX)
    step = (a >= 2).to(a.dtype).mul_(0.5).add_(0.5).add_(a >= 4)  # 0.5 / 1 / 2, cheaper than nested where
    v = torch.round(a / step).mul_(step)
    # same signed zeros as the code path (-0.0 for a negative x that rounds to 0). Not where(x < 0, -v, v):
    # inductor lowers -v to 0 - v on CUDA, which gives +0.0 there (found on an H200, tests/formats/test_cuda.py)
    return v.mul_(torch.where(x < 0, -1.0, 1.0))


def decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """E2M1 codes (uint8 0..15) -> values; code 8 decodes to -0.0."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"FP4 codes must be uint8, got {codes.dtype}")
    lut = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=dtype, device=codes.device)
    return lut[codes.long()]


def pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] -> packed uint8 [..., K/2] (element 2j low nibble)."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"FP4 codes must be uint8, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number ({codes.shape[-1]}) of FP4 codes along the last dim")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Packed uint8 [..., K/2] -> uint8 codes [..., K]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed FP4 must be uint8, got {packed.dtype}")
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)
