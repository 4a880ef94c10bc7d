"""Input validation and amax broadcasting shared by the number formats.

Every format takes `amax` that covers a *prefix* of `x`'s dims: a scalar (per-tensor),
`[E]` for a stacked expert tensor `[E, N, K]` (per-expert), `[E, N]` (per-channel) or
`[S]` for activations `[S, K]` (per-row). This one rule is what lets a stacked expert
tensor be quantized in one vectorized call, bit-identical to E separate calls.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def div(x: torch.Tensor, c: float) -> torch.Tensor:
    """x / c, correctly rounded on every device. (On CUDA, dividing by a Python number is
    computed as x * (1 / c), which differs from x / c in the last bit: CPU and CUDA scales
    and codes then disagree; found by tests/formats/test_cuda.py on an H100.)"""
    return x / torch.full((), c, dtype=x.dtype, device=x.device)


def check_input(x: torch.Tensor, block: int, what: str = "x", finite: bool = True) -> None:
    """Raise a clear error for inputs no format can quantize."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{what} has dtype {x.dtype}; quantization needs float32, bfloat16 or float16 "
            f"(cast with .float() first)"
        )
    if x.dim() < 1:
        raise ValueError(f"{what} is a 0-d scalar; quantization needs at least one dim (K, the last)")
    if x.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(x.shape)}); nothing to quantize")
    k = x.shape[-1]
    if k % block != 0:
        raise ValueError(
            f"{what} has {k} elements in its last (K) dim, which is not divisible by the "
            f"block/group size {block}; pick a group size that divides {k} or exclude this module"
        )
    if finite and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} contains NaN or Inf; refusing to quantize non-finite values")


def expand_amax(amax: torch.Tensor | float, x: torch.Tensor, extra: int = 0) -> torch.Tensor:
    """Return amax as float32 shaped `amax.shape + (1,) * (x.dim() - amax.dim() + extra)`.

    `extra` adds trailing unit dims for tensors that were reshaped into blocks
    (x[..., K] -> x[..., K/B, B] has one more dim than x).
    """
    a = torch.as_tensor(amax, dtype=torch.float32, device=x.device)
    if a.dim() > x.dim() - 1 or tuple(a.shape) != tuple(x.shape[: a.dim()]):
        raise ValueError(
            f"amax of shape {tuple(a.shape)} must cover a prefix of the leading dims of x "
            f"{tuple(x.shape)} (scalar = per tensor, [E] = per expert, [E, N] = per channel)"
        )
    if not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
        raise ValueError("amax must be finite and >= 0")
    return a.reshape(tuple(a.shape) + (1,) * (x.dim() - a.dim() + extra))
