"""FP8 E4M3 with per-channel weights and dynamic per-token inputs (compressed-tensors FP8_DYNAMIC).

Weights: one float32 scale per output row, amax / 448 of that row of the weight itself (no
calibration); on disk `weight` (e4m3 [N, K]) and `weight_scale` (fp32 [N, 1], the shape
compressed-tensors and vLLM's channel-strategy parameters have).
Inputs: each row (token) of x [..., K] gets scale = its own amax / 448 at run time, so
nothing is calibrated and no input scale is written. Arithmetic is compressed-tensors'
(x / scale in float32, clamp to +-448, cast), bit-exact for float32 inputs
(tests/formats/test_fp8_dynamic.py); compressed-tensors divides bf16 inputs in bf16.
ModelOpt layout: not written. vLLM 0.33's ModelOpt `FP8_PER_CHANNEL_PER_TOKEN` covers
Linear layers only; its ModelOpt FP8 MoE method reads per-tensor static scales.
"""

from __future__ import annotations

import torch

from ..formats import fp8
from .spec import InputScheme, WeightScheme, no_tensors, read_nothing


def row_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| over the last dim, float32 [...] (without materializing |x|)."""
    return torch.maximum(x.amax(dim=-1), -x.amin(dim=-1)).float()


def _rows(w, group_amax):
    return row_amax(w) if group_amax is None else group_amax.squeeze(-1)


def _quantize(w, amax, group_size, group_amax=None):
    q = fp8.quantize(w, _rows(w, group_amax))
    return q._replace(scale=q.scale.unsqueeze(-1))  # [..., N, 1]


def _fake_quant(w, amax, group_size, group_amax=None):
    return fp8.fake_quant(w, _rows(w, group_amax))


def _unit_amax(w, group_size):
    return row_amax(w).unsqueeze(-1)  # [..., N, 1]: one unit = one row


def _scales(amax, group_amax, dtype):
    return fp8.scale_from_amax(group_amax)  # [..., N, 1]


def _tensors(layout, q, amax, n_k):
    return {"weight": q.codes, "weight_scale": q.scale}


def _read(r, layout, stem, dtype, n_k=None):
    return fp8.dequantize(r[f"{stem}weight"], r[f"{stem}weight_scale"].reshape(-1), dtype)


def _check(c, layout, group_size):
    ws = c.need("weight", torch.float8_e4m3fn)
    if ws:
        c.need("weight_scale", torch.float32, (ws[0], 1))
    c.positive("weight_scale")


WEIGHT = WeightScheme("fp8-channel", "channel", lambda g: 1, _quantize, _fake_quant, _tensors, _read, _check,
                      ct_format="float-quantized", unit_amax=_unit_amax, scales=_scales,
                      fake_quant_scaled=fp8.fake_quant_scaled)


def fake_quant_per_token(x: torch.Tensor, param=None) -> torch.Tensor:
    """Hot path: x [..., K] fake-quantized with a scale per row from the row's own amax."""
    return fp8.fake_quant_per_row(x)


def _input_check(c, layout, group_size):
    c.absent("input_scale")  # a static scale next to a dynamic scheme is a sign of a mixed-up export


INPUT = InputScheme("fp8-token", "token", False, 1, None, fake_quant_per_token, no_tensors, read_nothing,
                    _input_check)
