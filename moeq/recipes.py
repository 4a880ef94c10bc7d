"""Recipes: which number format goes to weights and to inputs, and what is left alone.

A recipe is a small frozen dataclass; presets cover the formats serving engines run:

    Recipe("nvfp4", weight="nvfp4", input="nvfp4")   # W4A4, block 16 along K
    Recipe("w4a16-int4", weight="int4", group_size=128)

Exclude patterns are fnmatch patterns on module names (`model.layers.0.mlp.gate`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fnmatch import fnmatchcase


# Routers (`*.gate`, `*.router`, and the Linears inside a router module: Gemma 4's
# `router.proj`) must stay in full precision AND be named in the export's exclude list, or
# vLLM tries to load them as quantized weights. `score` is the classification head of
# *ForTokenClassification / *ForSequenceClassification models (lm_head's counterpart;
# vLLM builds it unquantized). Linear-attention a/b
# projections and shared-expert gates have tiny output dims (heads / 1) and are not worth it.
DEFAULT_EXCLUDE = (
    "lm_head",
    "score",
    "*embed_tokens*",
    "*.gate",
    "*.router",
    "*.router.*",
    "*shared_expert_gate",
    "*conv1d*",
    "*in_proj_a",
    "*in_proj_b",
)

# The keys of moeq.schemes.table.WEIGHT / INPUT (tests/schemes/test_table.py pins them equal):
# named here so that importing the recipes (the CLI's --help) does not import torch.
FORMATS = ("nvfp4", "fp8", "fp8-channel", "int4", "mxfp4", "mxfp8", "fp8-block")
INPUT_FORMATS = ("nvfp4", "fp8", "fp8-token", "mxfp4", "mxfp8", "fp8-group")
KV_CACHE_FORMATS = ("fp8",)


@dataclass(frozen=True)
class Recipe:
    """What each quantized weight and its input become.

    weight: a key of moeq.schemes.table.WEIGHT: "nvfp4" | "fp8" (per tensor) | "fp8-channel"
        (per output channel) | "int4" | "fp8-block" (per 128 x 128 block)
    input: a key of moeq.schemes.table.INPUT: "nvfp4" | "fp8" (static per tensor) |
        "fp8-token" (dynamic per token, nothing to calibrate) | "fp8-group" (dynamic per
        128 elements of each token) | None (weight-only,
        activations stay full precision)
    group_size: elements per weight scale along K (16 for nvfp4, 128 for int4; unused for
        fp8 weights, 128 for fp8-block). NVFP4 inputs always use blocks of 16.
    exclude: fnmatch patterns of module names left unquantized
    per_expert_input_scales: default False = one input scale per layer and projection
        (the max over experts, what vLLM's fused MoE kernels use)
    kv_cache: "fp8" = static per-layer FP8 scales for the attention's keys (after rotary
        embedding) and values, calibrated and written for the engine's KV cache (moeq.kv_cache);
        None = the KV cache stays in the model dtype
    """

    name: str
    weight: str
    input: str | None = None
    group_size: int = 16
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    per_expert_input_scales: bool = False
    kv_cache: str | None = None

    def __post_init__(self):
        if self.weight not in FORMATS:
            raise ValueError(f"unknown weight format {self.weight!r}; choose one of {FORMATS}")
        if self.input is not None and self.input not in INPUT_FORMATS:
            raise ValueError(f"unknown input format {self.input!r}; choose one of {INPUT_FORMATS} or None")
        if self.weight == "nvfp4" and self.group_size != 16:
            raise ValueError("NVFP4 uses blocks of 16 elements; group_size must be 16")
        if self.weight in ("mxfp4", "mxfp8") and self.group_size != 32:
            raise ValueError(f"{self.weight.upper()} uses blocks of 32 elements (OCP MX); group_size must be 32")
        if self.kv_cache is not None and self.kv_cache not in KV_CACHE_FORMATS:
            raise ValueError(f"unknown kv_cache format {self.kv_cache!r}; choose one of {KV_CACHE_FORMATS} or None")
        if self.weight == "fp8-block" and self.group_size != 128:
            raise ValueError("fp8-block uses 128 x 128 blocks (what vLLM's block-FP8 kernels run); group_size must be 128")

    def excludes(self, name: str) -> bool:
        return any(fnmatchcase(name, p) for p in self.exclude)

    def with_exclude(self, add=(), remove=()) -> "Recipe":
        """A copy with patterns added to / removed from the exclude list."""
        kept = tuple(p for p in self.exclude if p not in set(remove))
        return dataclasses.replace(self, exclude=kept + tuple(p for p in add if p not in kept))

    @property
    def block(self) -> int:
        """Divisibility K must satisfy for this recipe's weights and inputs (NVFP4 inputs use
        blocks of 16 whatever the weights use)."""
        from .schemes.table import INPUT, WEIGHT

        weight = WEIGHT[self.weight].block(self.group_size)
        return weight if self.input is None else math.lcm(weight, INPUT[self.input].block)


PRESETS = {
    "fp8": Recipe("fp8", weight="fp8", input="fp8", group_size=1),
    "fp8-dynamic": Recipe("fp8-dynamic", weight="fp8-channel", input="fp8-token", group_size=1),
    "fp8-block": Recipe("fp8-block", weight="fp8-block", input="fp8-group", group_size=128),
    "nvfp4": Recipe("nvfp4", weight="nvfp4", input="nvfp4"),
    "w4a16-nvfp4": Recipe("w4a16-nvfp4", weight="nvfp4"),
    "w4a16-int4": Recipe("w4a16-int4", weight="int4", group_size=128),
    # OCP MX: E8M0 scale per 32 along K; inputs quantized per group of 32 at run time (nothing calibrated)
    "mxfp4": Recipe("mxfp4", weight="mxfp4", input="mxfp4", group_size=32),
    "w4a16-mxfp4": Recipe("w4a16-mxfp4", weight="mxfp4", group_size=32),
    "mxfp8": Recipe("mxfp8", weight="mxfp8", input="mxfp8", group_size=32),
}


def get_recipe(recipe: "str | Recipe") -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in PRESETS:
        raise ValueError(f"unknown recipe {recipe!r}; presets are: {', '.join(PRESETS)}")
    return PRESETS[recipe]
