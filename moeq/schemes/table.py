"""The one table of schemes: names used by `Recipe.weight` / `Recipe.input` -> scheme, and
for each (weight, input) pair the checkpoint configs it is written with."""

from __future__ import annotations

from typing import NamedTuple

from . import fp8, fp8_block, fp8_dynamic, int4, mxfp4, mxfp8, nvfp4

WEIGHT = {
    "nvfp4": nvfp4.WEIGHT,
    "fp8": fp8.WEIGHT,
    "fp8-channel": fp8_dynamic.WEIGHT,
    "int4": int4.WEIGHT,
    "mxfp4": mxfp4.WEIGHT,
    "mxfp8": mxfp8.WEIGHT,
    "fp8-block": fp8_block.WEIGHT,
}

INPUT = {
    "nvfp4": nvfp4.INPUT,
    "fp8": fp8.INPUT,
    "fp8-token": fp8_dynamic.INPUT,
    "mxfp4": mxfp4.INPUT,
    "mxfp8": mxfp8.INPUT,
    "fp8-group": fp8_block.INPUT,
}


class Configs(NamedTuple):
    modelopt: str | None  # ModelOpt quant_algo; None = not written in that layout
    compressed_tensors: str  # compressed-tensors preset scheme name
    why_not_modelopt: str = ""


_NO_MODELOPT_INT4 = "vLLM's modelopt loader has no INT4 scheme; use layout='compressed-tensors'"
_NO_MODELOPT_MXFP4 = ("vLLM 0.33's modelopt loader has no MXFP4 quant_algo; use layout='compressed-tensors' "
                      "(or 'mxfp4-native' for gpt-oss)")
_NO_MODELOPT_FP8_DYNAMIC = ("vLLM's modelopt FP8_PER_CHANNEL_PER_TOKEN covers Linear layers only, its FP8 MoE method "
                            "reads per-tensor static scales; use layout='compressed-tensors'")
_NO_MODELOPT_FP8_BLOCK = ("vLLM's modelopt FP8_PB_WO gives experts its per-tensor FP8 MoE method (block-FP8 experts load "
                          "only under MIXED_PRECISION); use layout='compressed-tensors'")

CONFIGS = {
    ("nvfp4", "nvfp4"): Configs("NVFP4", "NVFP4"),
    ("nvfp4", None): Configs("W4A16_NVFP4", "NVFP4A16"),
    ("fp8", "fp8"): Configs("FP8", "FP8"),
    ("fp8-channel", "fp8-token"): Configs(None, "FP8_DYNAMIC", _NO_MODELOPT_FP8_DYNAMIC),
    ("int4", None): Configs(None, "W4A16", _NO_MODELOPT_INT4),
    ("mxfp4", "mxfp4"): Configs(None, "MXFP4", _NO_MODELOPT_MXFP4),
    ("mxfp4", None): Configs(None, "MXFP4A16", _NO_MODELOPT_MXFP4),
    ("mxfp8", "mxfp8"): Configs("MXFP8", "MXFP8"),
    ("fp8-block", "fp8-group"): Configs(None, "FP8_BLOCK", _NO_MODELOPT_FP8_BLOCK),
}
