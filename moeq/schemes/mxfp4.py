"""MXFP4 (OCP MX, E2M1 elements, E8M0 scale per 32 along K): weights, and dynamic inputs.

compressed-tensors (`mxfp4-pack-quantized`, presets MXFP4 / MXFP4A16): weight_packed
(uint8 [N, K/2], element 2j in the low nibble), weight_scale (uint8 E8M0 [N, K/32]);
inputs are quantized per group of 32 at run time: nothing calibrated, nothing written.
gpt-oss's own checkpoint format ("mxfp4-native", `native_tensors`): the fused expert stack
[E, N, K] as `<param>_blocks` (uint8 [E, N, K/32, 16], the same bytes) and `<param>_scales`
(uint8 [E, N, K/32]), rows in the in-memory order (gpt-oss's interleaved gate/up).
ModelOpt: not written (vLLM 0.33's modelopt loader has no MXFP4 quant_algo).
"""

from __future__ import annotations

import torch

from ..formats import mx
from .spec import InputScheme, WeightScheme, no_tensors, read_nothing


def _quantize(w, amax, group_size):
    return mx.quantize(w, "e2m1")


def _fake_quant(w, amax, group_size):
    return mx.fake_quant(w, "e2m1")


def _tensors(layout, q, amax, n_k):
    return {"weight_packed": mx.pack(q.codes), "weight_scale": q.scale}


def _read(r, layout, stem, dtype, n_k=None):
    return mx.dequantize(mx.unpack(r[f"{stem}weight_packed"]), r[f"{stem}weight_scale"], dtype)


def _check(c, layout, group_size):
    ws = c.need("weight_packed", torch.uint8)
    if ws:
        c.need("weight_scale", torch.uint8, (ws[0], ws[1] * 2 // mx.BLOCK_SIZE))
    c.absent("weight_global_scale")  # an NVFP4 leftover: MX scales are self-contained powers of two


WEIGHT = WeightScheme("mxfp4", "group", lambda g: mx.BLOCK_SIZE, _quantize, _fake_quant, _tensors, _read, _check,
                      ct_format="mxfp4-pack-quantized")


def native_tensors(q) -> dict[str, torch.Tensor]:
    """A quantized stack [E, N, K] -> gpt-oss's {'_blocks': uint8 [E, N, K/32, 16], '_scales': uint8 [E, N, K/32]}
    (suffixes of the fused parameter's checkpoint key: 'mlp.experts.gate_up_proj' + '_blocks')."""
    packed = mx.pack(q.codes)
    return {"_blocks": packed.unflatten(-1, (q.scale.shape[-1], mx.BLOCK_SIZE // 2)), "_scales": q.scale}


def native_read(blocks: torch.Tensor, scales: torch.Tensor, dtype) -> torch.Tensor:
    """Inverse of native_tensors: -> the dequantized stack [E, N, K]."""
    return mx.dequantize(mx.unpack(blocks.flatten(-2)), scales, dtype)


def dynamic_input(name: str, element: str, static_scale: str) -> InputScheme:
    """MX inputs: each group of 32 of a row gets its E8M0 scale at run time, nothing calibrated or
    written; `inspect` flags a static scale (`static_scale`) next to them as a mixed-up export."""
    def check(c, layout, group_size):
        c.absent(static_scale)

    def fake_quant(x, param=None):
        return mx.fake_quant_unchecked(x, element)

    return InputScheme(name, "group", False, mx.BLOCK_SIZE, None, fake_quant, no_tensors, read_nothing, check)


INPUT = dynamic_input("mxfp4", "e2m1", "input_global_scale")
