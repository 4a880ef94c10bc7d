"""Recipe-level quantize / fake-quant of weights and inputs, on top of moeq.formats.

Weights are passed as [..., N, K] with amax covering a prefix of the dims (per expert
[E] or per tensor ()). Inputs have K last and an amax that is a scalar (layer-shared)
or per row.
"""

from __future__ import annotations

import torch

from .formats import fp8, int4, nvfp4
from .recipes import Recipe


def fake_quant_weight(recipe: Recipe, w_nk: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    if recipe.weight == "nvfp4":
        return nvfp4.fake_quant(w_nk, amax)
    if recipe.weight == "fp8":
        return fp8.fake_quant(w_nk, amax)
    return int4.fake_quant(w_nk, recipe.group_size)


def quantize_weight(recipe: Recipe, w_nk: torch.Tensor, amax: torch.Tensor):
    """-> NVFP4Tensor | FP8Tensor | Int4Tensor, the on-disk pieces of one weight."""
    if recipe.weight == "nvfp4":
        return nvfp4.quantize(w_nk, amax)
    if recipe.weight == "fp8":
        return fp8.quantize(w_nk, amax)
    return int4.quantize(w_nk, recipe.group_size)


def input_scale_param(recipe: Recipe, amax: torch.Tensor) -> torch.Tensor:
    """The static per-tensor input parameter the hot path multiplies/divides by:
    NVFP4 global scale (1 / scale_2) or FP8 scale (amax / 448)."""
    if recipe.input == "nvfp4":
        return nvfp4.global_scale(amax)
    return fp8.scale_from_amax(amax)


def fake_quant_input(recipe: Recipe, x: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """x [..., K]; param from input_scale_param, a scalar or shaped to broadcast with x[..., :1]."""
    if recipe.input == "nvfp4":
        return nvfp4.fake_quant_with_global_scale(x, param, nvfp4.BLOCK_SIZE)
    return fp8.fake_quant_with_scale(x, param)
