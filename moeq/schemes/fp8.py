"""FP8 E4M3 W8A8 with static per-tensor scales (per expert in a fused stack).

Both layouts: weight (e4m3 [N, K]), weight_scale (fp32, amax / 448), input_scale (fp32);
the scales are 0-d in ModelOpt, [1] in compressed-tensors.
"""

from __future__ import annotations

import torch

from ..formats import fp8
from .spec import CT, InputScheme, WeightScheme


def _scalar(layout):
    return (1,) if layout == CT else ()


def _quantize(w, amax, group_size):
    return fp8.quantize(w, amax)


def _fake_quant(w, amax, group_size):
    return fp8.fake_quant(w, amax)


def _scales(amax, group_amax, dtype):
    s = fp8.scale_from_amax(amax)
    return s.reshape(s.shape + (1, 1))  # amax [...] -> [..., 1, 1]: one unit, the whole [N, K]


def _tensors(layout, q, amax, n_k):
    return {"weight": q.codes, "weight_scale": fp8.scale_from_amax(amax).reshape(_scalar(layout))}


def _read(r, layout, stem, dtype, n_k=None):
    return fp8.dequantize(r[f"{stem}weight"], r[f"{stem}weight_scale"].reshape(()), dtype)


def _check(c, layout, group_size):
    c.need("weight", torch.float8_e4m3fn)
    c.need("weight_scale", torch.float32, _scalar(layout))
    c.positive("weight_scale")


WEIGHT = WeightScheme("fp8", "tensor", lambda g: 1, _quantize, _fake_quant, _tensors, _read, _check,
                      ct_format="float-quantized", scales=_scales, fake_quant_scaled=fp8.fake_quant_scaled)


def _input_tensors(layout, amax):
    return {"input_scale": fp8.scale_from_amax(amax).reshape(_scalar(layout))}


def _input_read(r, layout, stem):
    return r[f"{stem}input_scale"].reshape(()).float()


def _input_check(c, layout, group_size):
    c.need("input_scale", torch.float32, _scalar(layout))
    c.positive("input_scale")


INPUT = InputScheme("fp8", "tensor", True, 1, fp8.scale_from_amax, fp8.fake_quant_with_scale,
                    _input_tensors, _input_read, _input_check)
