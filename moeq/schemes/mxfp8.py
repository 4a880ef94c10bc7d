"""MXFP8 (OCP MX, E4M3 elements, E8M0 scale per 32 along K): weights, and dynamic inputs.

Both layouts write the same tensors: weight (float8_e4m3fn [N, K]) and weight_scale
(uint8 E8M0 [N, K/32]); compressed-tensors `mxfp8-quantized` (preset MXFP8), ModelOpt
quant_algo MXFP8 (vLLM 0.33 `ModelOptMxFp8Config`: linears and `ModelOptMxFp8FusedMoE`).
Inputs are quantized per group of 32 at run time: nothing calibrated, nothing written.
"""

from __future__ import annotations

import torch

from ..formats import mx
from .mxfp4 import dynamic_input
from .spec import WeightScheme


def _quantize(w, amax, group_size):
    return mx.quantize(w, "e4m3")


def _fake_quant(w, amax, group_size):
    return mx.fake_quant(w, "e4m3")


def _tensors(layout, q, amax, n_k):
    return {"weight": q.codes, "weight_scale": q.scale}


def _read(r, layout, stem, dtype, n_k=None):
    return mx.dequantize(r[f"{stem}weight"], r[f"{stem}weight_scale"], dtype)


def _check(c, layout, group_size):
    ws = c.need("weight", torch.float8_e4m3fn)
    if ws:
        c.need("weight_scale", torch.uint8, (ws[0], ws[1] // mx.BLOCK_SIZE))


WEIGHT = WeightScheme("mxfp8", "group", lambda g: mx.BLOCK_SIZE, _quantize, _fake_quant, _tensors, _read, _check,
                      ct_format="mxfp8-quantized")


INPUT = dynamic_input("mxfp8", "e4m3", "input_scale")
