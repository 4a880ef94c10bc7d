"""FP8 E4M3 with 128 x 128 block weight scales and dynamic per-group inputs (compressed-tensors FP8_BLOCK).

Weights: one float32 scale per 128 x 128 block of each [N, K] matrix (per expert in a stack),
amax / 448 of the block itself (no calibration); on disk `weight` (e4m3 [N, K]) and
`weight_scale` (fp32 [ceil(N/128), ceil(K/128)]), the parameter vLLM 0.33's compressed-tensors
block-FP8 linear and MoE methods create. Inputs: a scale per 128 consecutive elements of each
token at run time (vLLM's per_token_group_quant_fp8), nothing calibrated or written.

Checkpoint modules that are rows of one in-memory weight (the gate and up halves of a fused
expert stack) must start on a block boundary: quantize keeps a copy of each block's scale per
row (`scale_rows`) so that slicing rows slices the scales alike, and `tensors` takes one row
per block. `WEIGHT.rows` = 128 makes `quantization._check_shapes` refuse the shapes where a
boundary would fall inside a block (vLLM refuses them too).

ModelOpt layout: not written. vLLM 0.33 reads ModelOpt FP8_PB_WO for Linear layers, but its
plain FP8_PB_WO config gives experts ModelOptFp8MoEMethod (per-tensor scales); block-FP8
experts only load under quant_algo MIXED_PRECISION.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..formats import fp8_block
from ..formats.fp8_block import BLOCK
from .spec import InputScheme, WeightScheme, no_tensors, read_nothing


class FP8BlockRows(NamedTuple):
    codes: torch.Tensor  # e4m3 [..., N, K]
    scale_rows: torch.Tensor  # fp32 [..., N, ceil(K/128)]: each row's block scales (rows of a block share them)


def _quantize(w, amax, group_size):
    q = fp8_block.quantize(w)
    return FP8BlockRows(q.codes, q.scale.repeat_interleave(BLOCK, dim=-2)[..., : w.shape[-2], :])


def _fake_quant(w, amax, group_size):
    return fp8_block.fake_quant(w)


def _tensors(layout, q, amax, n_k):
    return {"weight": q.codes, "weight_scale": q.scale_rows[..., ::BLOCK, :].contiguous()}


def _read(r, layout, stem, dtype, n_k=None):
    return fp8_block.dequantize(r[f"{stem}weight"], r[f"{stem}weight_scale"], dtype)


def _blocks(n: int) -> int:
    return -(-n // BLOCK)


def _check(c, layout, group_size):
    ws = c.need("weight", torch.float8_e4m3fn)
    if ws:
        c.need("weight_scale", torch.float32, (_blocks(ws[0]), _blocks(ws[1])))
    c.positive("weight_scale")


WEIGHT = WeightScheme("fp8-block", "block", lambda g: BLOCK, _quantize, _fake_quant, _tensors, _read, _check,
                      ct_format="float-quantized", rows=BLOCK)


def fake_quant_per_group(x: torch.Tensor, param=None) -> torch.Tensor:
    """Hot path: x [..., K], a scale per 128 elements of each row from their own amax."""
    return fp8_block.fake_quant_groups(x, BLOCK)


def _input_check(c, layout, group_size):
    c.absent("input_scale")  # dynamic: a static scale here means a mixed-up export


INPUT = InputScheme("fp8-group", "group", False, BLOCK, None, fake_quant_per_group, no_tensors, read_nothing,
                    _input_check)
