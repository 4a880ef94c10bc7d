"""INT4 symmetric group-wise weights (W4A16), compressed-tensors `pack-quantized` only.

weight_packed (int32 [N, K/8]), weight_scale ([N, K/g], model dtype), weight_shape (int64 [2]).
Scales come from the weight's own groups: the calibrated amax is not used.
"""

from __future__ import annotations

import torch

from ..formats import int4
from .spec import WeightScheme, group_abs_amax


def _group(w, group_size, group_amax):
    return group_size if group_amax is None else w.shape[-1] // group_amax.shape[-1]


def _quantize(w, amax, group_size, group_amax=None):
    return int4.quantize(w, _group(w, group_size, group_amax), group_amax=group_amax)


def _fake_quant(w, amax, group_size, group_amax=None):
    return int4.fake_quant(w, _group(w, group_size, group_amax), group_amax=group_amax)


def _scales(amax, group_amax, dtype):
    return int4.fixed_scales(group_amax, dtype)


def _tensors(layout, q, amax, n_k):
    return {"weight_packed": int4.pack(q.codes), "weight_scale": q.scale,
            "weight_shape": torch.tensor(n_k, dtype=torch.int64)}


def _read(r, layout, stem, dtype, n_k=None):
    # experts under vLLM's gpt-oss names carry no weight_shape (vLLM has no loader path for one)
    n, k = r[f"{stem}weight_shape"].tolist() if f"{stem}weight_shape" in r else n_k
    codes = int4.unpack(r[f"{stem}weight_packed"])[:, :k]
    return int4.dequantize(codes, r[f"{stem}weight_scale"], dtype)


def _check(c, layout, group_size):
    ws = c.need("weight_packed", torch.int32)
    if c.vllm_fused:  # experts under vLLM's gpt-oss names ('...w13_'): no weight_shape
        if ws:
            c.need("weight_scale", None, (ws[0], ws[1] * 8 // group_size))
        c.positive("weight_scale")
        return
    shp = c.need("weight_shape", torch.int64, (2,))
    if ws and shp:
        n, k = c.tensor("weight_shape").tolist()
        if ws != (n, k // 8):
            c.problem(f"weight_packed has shape {ws}, expected {(n, k // 8)} for weight_shape {[n, k]}")
        c.need("weight_scale", None, (n, k // group_size))
    c.positive("weight_scale")


WEIGHT = WeightScheme("int4", "group", lambda g: g, _quantize, _fake_quant, _tensors, _read, _check,
                      ct_format="pack-quantized", unit_amax=group_abs_amax, scales=_scales,
                      fake_quant_scaled=int4.fake_quant_scaled)
