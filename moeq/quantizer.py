"""Recipe-level quantize / fake-quant of weights and inputs: dispatch to the recipe's
schemes (`moeq.schemes.table`).

Weights are passed as [..., N, K] with amax covering a prefix of the dims (per expert
[E] or per tensor ()); per-channel and group schemes take their scales from the weight
itself. Inputs have K last and a static parameter that is a scalar (layer-shared) or per
row, or None for dynamic schemes.
"""

from __future__ import annotations

import torch

from .recipes import Recipe
from .schemes.table import INPUT, WEIGHT


def fake_quant_weight(recipe: Recipe, w_nk: torch.Tensor, amax: torch.Tensor, group_amax=None) -> torch.Tensor:
    """group_amax: None (scales from the weight itself, max calibration) or float32
    [..., N, K/g] fixed by a calibration algorithm (see WeightScheme.unit_amax)."""
    if group_amax is None:
        return WEIGHT[recipe.weight].fake_quant(w_nk, amax, recipe.group_size)
    return WEIGHT[recipe.weight].fake_quant(w_nk, amax, recipe.group_size, group_amax=group_amax)


def weight_scales(recipe: Recipe, amax: torch.Tensor, group_amax, dtype: torch.dtype) -> torch.Tensor:
    """The fixed scale of every unit, [..., N, K/g] ([..., 1, 1] per tensor: group_amax None),
    computed once for `fake_quant_weight_scaled` (see WeightScheme.scales)."""
    return WEIGHT[recipe.weight].scales(amax, group_amax, dtype)


def fake_quant_weight_scaled(recipe: Recipe, x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (a column, a slice, units [..., N, K/g, g]) fake-quantized elementwise with `weight_scales`
    broadcast against it: bit for bit what fake_quant_weight gives those elements in the whole weight."""
    return WEIGHT[recipe.weight].fake_quant_scaled(x, scales)


def quantize_weight(recipe: Recipe, w_nk: torch.Tensor, amax: torch.Tensor, group_amax=None):
    """-> NVFP4Tensor | FP8Tensor | Int4Tensor, the on-disk pieces of one weight."""
    if group_amax is None:
        return WEIGHT[recipe.weight].quantize(w_nk, amax, recipe.group_size)
    return WEIGHT[recipe.weight].quantize(w_nk, amax, recipe.group_size, group_amax=group_amax)


def unit_amax(recipe: Recipe, w_nk: torch.Tensor) -> torch.Tensor | None:
    """The weight's own amax per scale unit [..., N, K/g], or None for per-tensor schemes."""
    f = WEIGHT[recipe.weight].unit_amax
    return None if f is None else f(w_nk, recipe.group_size)


def weight_granularity(recipe: Recipe) -> str:
    return WEIGHT[recipe.weight].granularity


def input_is_static(recipe: Recipe) -> bool:
    """True when the recipe's inputs use a calibrated static scale (and need calib_data)."""
    return recipe.input is not None and INPUT[recipe.input].static


def input_scale_param(recipe: Recipe, amax: torch.Tensor) -> torch.Tensor | None:
    """The static per-tensor input parameter the hot path multiplies/divides by (NVFP4
    global scale 1 / scale_2, FP8 scale amax / 448); None for dynamic input schemes."""
    s = INPUT[recipe.input]
    return s.param(amax) if s.static else None


def fake_quant_input(recipe: Recipe, x: torch.Tensor, param: torch.Tensor | None) -> torch.Tensor:
    """x [..., K]; param from input_scale_param, a scalar or shaped to broadcast with x[..., :1]."""
    return INPUT[recipe.input].fake_quant(x, param)
