"""The shape of a scheme: what a weight format and an input format must provide.

Layouts are "modelopt" and "compressed-tensors" (`moeq.checkpoint.layouts`). Readers and
checkers get small accessors rather than file handles, so a scheme never opens a file:

    read(r, layout, stem, dtype, n_k)  r[stem + name] -> tensor (moeq.checkpoint.load.CheckpointReader)
    check(c, layout, group_size)     c.need(name, dtype, shape) / c.positive(name) /
                                     c.absent(name) / c.tensor(name) / c.problem(msg)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def group_abs_amax(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """max |w| per group of `group_size` along K: float32 [..., N, K/group_size]."""
    g = w.unflatten(-1, (w.shape[-1] // group_size, group_size))
    return torch.maximum(g.amax(dim=-1), -g.amin(dim=-1)).float()

CT = "compressed-tensors"


@dataclass(frozen=True)
class WeightScheme:
    """A weight format of [..., N, K] matrices (a stacked expert tensor [E, N, K] is one call).

    granularity (compressed-tensors' strategy names), scale shape of one [N, K] weight:
        "tensor"        ()            one scale per tensor (per expert in a stack: amax [E])
        "channel"       [N, 1]        one scale per output row, from the weight itself
        "group"         [N, K/g]      one scale per g elements along K (recipe.group_size)
        "tensor_group"  [N, K/16] + () block scales under a per-tensor global scale
        "block"         [N/128, K/128] one scale per 2-D block, from the weight itself
    quantize(w, amax, group_size) -> NamedTuple of on-disk pieces (stacked like w)
    fake_quant(w, amax, group_size) -> dequantize(quantize(w)) in w's dtype, bit-exactly
    tensors(layout, q, amax, (n, k)) -> {suffix: tensor} of one [N, K] module (q sliced to it)
    unit_amax(w, group_size) -> float32 [..., N, K/g]: the amax each sub-tensor scale (block,
        group, row) is computed from; schemes that have it accept `group_amax=` of that shape
        in quantize / fake_quant (g = K / group_amax.shape[-1]) instead of the weight's own:
        how calibration algorithms (moeq.algorithms) fix or clip those scales. None for
        "tensor" granularity, where `amax` is the only scale parameter.
    scales(amax, group_amax, dtype) -> s [..., N, U]: the fixed scale of every unit, computed once
        (group_amax [..., N, U] from unit_amax or an algorithm; "tensor": group_amax None, amax [...]
        covering all of w's dims but N, K -> s [..., 1, 1]). A unit is K/U consecutive elements.
    fake_quant_scaled(x, s) -> x fake-quantized elementwise with s broadcast against it, x's dtype,
        no checks. For w [..., N, K] with U | K:
            fake_quant(w, amax, g, group_amax) == fake_quant_scaled(w.unflatten(-1, (U, -1)),
                scales(amax, group_amax, w.dtype).unsqueeze(-1)).flatten(-2)   bit for bit,
        so one column (GPTQ) or one candidate clipping (MSE) costs no checks or scale arithmetic.
        Both None where algorithms are refused (`algorithms.check_supported`).
    """

    name: str
    granularity: str
    block: Callable[[int], int]  # group_size -> the divisibility K must satisfy
    quantize: Callable
    fake_quant: Callable[..., torch.Tensor]
    tensors: Callable[..., dict]
    read: Callable[..., torch.Tensor]
    check: Callable[..., None]
    ct_format: str  # compressed-tensors' compression format name
    rows: int = 1  # row alignment: checkpoint modules split from one weight, and modules an engine
    # fuses (all but the last), must have N divisible by this (block scales span rows)
    unit_amax: Callable | None = None
    scales: Callable | None = None
    fake_quant_scaled: Callable[..., torch.Tensor] | None = None


@dataclass(frozen=True)
class InputScheme:
    """An input (activation) format, x [..., K] with K last.

    granularity: "tensor" = one static scale per layer/projection, fixed by calibration
    (static=True, `param(amax)` gives it); "token" = dynamic, a scale per row computed at
    run time from the row's own amax (static=False, nothing to calibrate, nothing written);
    "group" = dynamic, a scale per `block` consecutive elements along K of each row at run time
    (static=False; MX: 32, fp8-block inputs: 128).
    fake_quant(x, param) -> x's dtype; param is None for dynamic schemes.
    tensors(layout, amax) -> {suffix: tensor}; read(r, layout, stem) -> param or None.
    """

    name: str
    granularity: str
    static: bool
    block: int  # K divisibility the inputs need
    param: Callable | None
    fake_quant: Callable[..., torch.Tensor]
    tensors: Callable[..., dict]
    read: Callable
    check: Callable[..., None]


def no_tensors(layout: str, amax) -> dict:
    return {}


def read_nothing(r, layout: str, stem: str):
    return None
