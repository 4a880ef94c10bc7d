"""NVFP4 (W4A4 and weight-only): FP4 codes, E4M3 scales per 16 along K, FP32 global scale.

ModelOpt:            weight (uint8 [N, K/2]), weight_scale (e4m3 [N, K/16]),
                     weight_scale_2 (fp32 []), input_scale (fp32 [])
compressed-tensors:  weight_packed, weight_scale, weight_global_scale [1], input_global_scale [1]
"""

from __future__ import annotations

import torch

from ..formats import nvfp4
from .spec import CT, InputScheme, WeightScheme, group_abs_amax


def _block(w, group_amax):
    return nvfp4.BLOCK_SIZE if group_amax is None else w.shape[-1] // group_amax.shape[-1]


def _quantize(w, amax, group_size, group_amax=None):
    return nvfp4.quantize(w, amax, _block(w, group_amax), group_amax)


def _fake_quant(w, amax, group_size, group_amax=None):
    return nvfp4.fake_quant(w, amax, _block(w, group_amax), group_amax)


def _unit_amax(w, group_size):
    return group_abs_amax(w, nvfp4.BLOCK_SIZE)


def _scales(amax, group_amax, dtype):
    return nvfp4.fixed_scales(amax, group_amax)


def _tensors(layout, q, amax, n_k):
    ct = layout == CT
    out = {"weight_packed" if ct else "weight": nvfp4.pack(q.codes), "weight_scale": q.block_scale}
    if ct:
        out["weight_global_scale"] = nvfp4.global_scale(amax).reshape(1)
    else:
        out["weight_scale_2"] = nvfp4.scale_2(amax).reshape(())
    return out


def _read(r, layout, stem, dtype, n_k=None):
    ct = layout == CT
    codes = nvfp4.unpack(r[f"{stem}weight_packed" if ct else f"{stem}weight"])
    gs = r[f"{stem}weight_global_scale"].reshape(()) if ct else 1.0 / r[f"{stem}weight_scale_2"].reshape(())
    return nvfp4.dequantize(codes, r[f"{stem}weight_scale"], gs, dtype)


def _check(c, layout, group_size):
    ct = layout == CT
    ws = c.need("weight_packed" if ct else "weight", torch.uint8)
    if ws:
        c.need("weight_scale", torch.float8_e4m3fn, (ws[0], ws[1] * 2 // 16))
    c.need("weight_global_scale" if ct else "weight_scale_2", torch.float32, (1,) if ct else ())
    for s in ("weight_scale", "weight_global_scale" if ct else "weight_scale_2"):
        c.positive(s)


WEIGHT = WeightScheme("nvfp4", "tensor_group", lambda g: g, _quantize, _fake_quant, _tensors, _read, _check,
                      ct_format="nvfp4-pack-quantized", unit_amax=_unit_amax, scales=_scales,
                      fake_quant_scaled=nvfp4.fake_quant_scaled)


def _input_tensors(layout, amax):
    if layout == CT:
        return {"input_global_scale": nvfp4.global_scale(amax).reshape(1)}
    return {"input_scale": nvfp4.scale_2(amax).reshape(())}


def _input_read(r, layout, stem):
    if layout == CT:
        return r[f"{stem}input_global_scale"].reshape(())
    return 1.0 / r[f"{stem}input_scale"].reshape(())


def _input_check(c, layout, group_size):
    name = "input_global_scale" if layout == CT else "input_scale"
    c.need(name, torch.float32, (1,) if layout == CT else ())
    c.positive(name)


def _input_fake_quant(x, gs):
    return nvfp4.fake_quant_with_global_scale(x, gs, nvfp4.BLOCK_SIZE)


# static global scale (1 / scale_2 of the calibrated amax); block scales are dynamic
INPUT = InputScheme("nvfp4", "tensor", True, nvfp4.BLOCK_SIZE, nvfp4.global_scale, _input_fake_quant,
                    _input_tensors, _input_read, _input_check)
