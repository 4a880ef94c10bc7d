"""FP8 E4M3 with a float32 scale per 2-D block of a weight, and per group of an activation row.

Weights [..., N, K]: one scale per (128 x 128) block, shape [..., ceil(N/128), ceil(K/128)];
a partial block at the end of N or K has its own scale from its real elements (the padding
compressed-tensors adds for it is zeros, which never raise an amax). Activations [..., K]: a
scale per 128 consecutive elements of each row, computed at run time (K % 128 == 0, as
vLLM's per_token_group_quant_fp8 asserts). Scale = amax / 448 as in `fp8` (amax 0 -> 1).
Validated bit-exact against compressed-tensors' block strategy (`_process_block`) and its
dynamic group activations (`compute_dynamic_scales_and_zp` + `fake_quantize`), float32
inputs: tests/formats/test_fp8_block.py.
"""

from __future__ import annotations

import torch

from ._checks import check_input
from .fp8 import FP8Tensor, _quantize_with_scale, fake_quant_with_scale, scale_from_amax

BLOCK = 128


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[..., N, K] zero-padded to block multiples and viewed as [..., N/b, b, K/b, b]."""
    n, k = x.shape[-2:]
    pn, pk = (-n) % block, (-k) % block
    if pn or pk:
        x = torch.nn.functional.pad(x, (0, pk, 0, pn))
    return x.unflatten(-1, (x.shape[-1] // block, block)).unflatten(-3, (x.shape[-2] // block, block))


def block_amax(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """max |x| per block, float32 [..., ceil(N/b), ceil(K/b)]."""
    b = _blocks(x, block)
    return torch.maximum(b.amax(dim=(-3, -1)), -b.amin(dim=(-3, -1))).float()


def expand(scale: torch.Tensor, n: int, k: int, block: int = BLOCK) -> torch.Tensor:
    """Block scales [..., N/b, K/b] -> one per element [..., N, K] (cropped to n, k)."""
    s = scale.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)
    return s[..., :n, :k]


def quantize(x: torch.Tensor, block: int = BLOCK) -> FP8Tensor:
    """-> codes e4m3 [..., N, K], scale fp32 [..., ceil(N/b), ceil(K/b)] (from x itself)."""
    check_input(x, 1)
    if x.dim() < 2:
        raise ValueError(f"block FP8 quantizes matrices [..., N, K]; got shape {tuple(x.shape)}")
    scale = scale_from_amax(block_amax(x, block))
    return FP8Tensor(_quantize_with_scale(x, expand(scale, *x.shape[-2:], block)), scale)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype=torch.float32, block: int = BLOCK) -> torch.Tensor:
    return (codes.float() * expand(scale.float(), *codes.shape[-2:], block)).to(dtype)


def fake_quant(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    q = quantize(x, block)
    return dequantize(q.codes, q.scale, x.dtype, block)


def fake_quant_groups(x: torch.Tensor, group: int = BLOCK) -> torch.Tensor:
    """Hot path (dynamic activations): x [..., K] with a scale per `group` elements of each row,
    from their own amax; K % group == 0."""
    g = x.unflatten(-1, (x.shape[-1] // group, group))
    amax = torch.maximum(g.amax(dim=-1), -g.amin(dim=-1)).float()
    return fake_quant_with_scale(g, scale_from_amax(amax).unsqueeze(-1)).flatten(-2)
