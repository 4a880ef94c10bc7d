"""The two checkpoint conventions: per-module tensor names and the quantization config.

ModelOpt (vLLM `modelopt` / `modelopt_fp4`):
    NVFP4: weight (uint8 [N, K/2]), weight_scale (e4m3 [N, K/16]), weight_scale_2 (fp32 []),
           input_scale (fp32 [])
    FP8:   weight (e4m3 [N, K]), weight_scale (fp32 []), input_scale (fp32 [])
compressed-tensors:
    NVFP4: weight_packed, weight_scale, weight_global_scale [1], input_global_scale [1]
    FP8:   weight, weight_scale [1], input_scale [1]
    INT4:  weight_packed (int32 [N, K/8]), weight_scale ([N, K/g], model dtype), weight_shape (int64 [2])
The config side of compressed-tensors comes from the compressed-tensors package itself.
"""

from __future__ import annotations

import torch

from ..formats import fp8, int4, nvfp4
from ..recipes import Recipe

LAYOUTS = ("modelopt", "compressed-tensors")
MODELOPT_ALGO = {("nvfp4", "nvfp4"): "NVFP4", ("nvfp4", None): "W4A16_NVFP4", ("fp8", "fp8"): "FP8"}
CT_PRESET = {("nvfp4", "nvfp4"): "NVFP4", ("nvfp4", None): "NVFP4A16", ("fp8", "fp8"): "FP8", ("int4", None): "W4A16"}
CT_FORMAT = {"nvfp4": "nvfp4-pack-quantized", "fp8": "float-quantized", "int4": "pack-quantized"}


def check_supported(layout: str, recipe: Recipe) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    table = MODELOPT_ALGO if layout == "modelopt" else CT_PRESET
    if (recipe.weight, recipe.input) not in table:
        hint = " (vLLM's modelopt loader has no INT4 scheme; use layout='compressed-tensors')" if recipe.weight == "int4" else ""
        raise ValueError(f"recipe {recipe.name} cannot be written in the {layout} layout{hint}")


class UnsupportedExport(ValueError):
    """A (model, recipe, layout) combination that vLLM 0.33 has no loader path for."""


# vLLM 0.33 creates expert biases (w13_bias / w2_bias) only in the compressed-tensors WNA16 MoE method
# (compressed_tensors_moe_wna16.py: "Per-expert biases, as gpt-oss carries"); ModelOptFp8MoEMethod,
# ModelOptNvFp4FusedMoE, CompressedTensorsW8A8Fp8MoEMethod and CompressedTensorsW4A4Nvfp4MoEMethod have none,
# so a checkpoint with expert biases fails in their load (KeyError '...experts.w2_bias').
BIASED_EXPERTS_OK = {("compressed-tensors", "int4", None)}


def check_experts_supported(layout: str, recipe: Recipe, experts) -> None:
    """Refuse, before any calibration, experts that vLLM 0.33 cannot load in `layout` with `recipe`.
    experts: the ExpertsTarget list (find_targets). One-line error naming the combination and the way out."""
    biased = [t for t in experts if getattr(t.module, "has_bias", False)]
    if biased and (layout, recipe.weight, recipe.input) not in BIASED_EXPERTS_OK:
        t = biased[0]
        raise UnsupportedExport(
            f"{type(t.module).__name__} ({t.name}) has expert biases, which vLLM 0.33 loads only with w4a16-int4 in the "
            f"compressed-tensors layout; recipe {recipe.name} in the {layout} layout has no vLLM path: use recipe "
            f"w4a16-int4 with layout compressed-tensors, or exclude the experts (Recipe.with_exclude)")


def weight_tensors(layout: str, recipe: Recipe, q, amax: torch.Tensor, n_k: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Tensors of one module's weight. q: the quantized [N, K] slice (NamedTuple of formats);
    amax: the weight's per-tensor amax (0-d)."""
    ct = layout == "compressed-tensors"
    if recipe.weight == "nvfp4":
        out = {"weight_packed" if ct else "weight": nvfp4.pack(q.codes), "weight_scale": q.block_scale}
        if ct:
            out["weight_global_scale"] = nvfp4.global_scale(amax).reshape(1)
        else:
            out["weight_scale_2"] = nvfp4.scale_2(amax).reshape(())
        return out
    if recipe.weight == "fp8":
        s = fp8.scale_from_amax(amax)
        return {"weight": q.codes, "weight_scale": s.reshape(1) if ct else s.reshape(())}
    return {"weight_packed": int4.pack(q.codes), "weight_scale": q.scale,
            "weight_shape": torch.tensor(n_k, dtype=torch.int64)}


def input_tensors(layout: str, recipe: Recipe, amax: torch.Tensor) -> dict[str, torch.Tensor]:
    if recipe.input is None:
        return {}
    ct = layout == "compressed-tensors"
    if recipe.input == "nvfp4":
        return {"input_global_scale": nvfp4.global_scale(amax).reshape(1)} if ct else {"input_scale": nvfp4.scale_2(amax).reshape(())}
    s = fp8.scale_from_amax(amax)
    return {"input_scale": s.reshape(1) if ct else s.reshape(())}


def quant_configs(layout: str, recipe: Recipe, ignore: list[str], version: str) -> tuple[dict, dict | None]:
    """-> (config.json quantization_config, hf_quant_config.json or None)."""
    key = (recipe.weight, recipe.input)
    if layout == "modelopt":
        algo = MODELOPT_ALGO[key]
        producer = {"name": "moeq", "version": version}
        nested = {"producer": producer, "quantization": {
            "quant_algo": algo, "kv_cache_quant_algo": None, "group_size": recipe.group_size if recipe.weight == "nvfp4" else None,
            "exclude_modules": ignore}}
        flat = {"quant_method": "modelopt", "quant_algo": algo, "ignore": ignore, "exclude_modules": ignore,
                "group_size": nested["quantization"]["group_size"], "kv_cache_scheme": None, "producer": producer}
        return flat, nested
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    scheme = preset_name_to_scheme(CT_PRESET[key], ["Linear"])
    if recipe.weight == "int4":
        scheme.weights.group_size = recipe.group_size
    cfg = QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore, format=CT_FORMAT[recipe.weight],
                             quantization_status="compressed")
    return cfg.to_dict(), None


def recipe_from_config(qc: dict) -> tuple[str, Recipe]:
    """(layout, recipe) of a quantization_config as written by either convention."""
    from ..recipes import PRESETS

    if qc.get("quant_method") == "modelopt" or "quantization" in qc:
        algo = qc.get("quant_algo") or qc.get("quantization", {}).get("quant_algo")
        key = next((k for k, v in MODELOPT_ALGO.items() if v == algo), None)
        layout = "modelopt"
    elif qc.get("quant_method") == "compressed-tensors":
        groups = list(qc.get("config_groups", {}).values())
        if len(groups) != 1:
            raise ValueError("moeq.load reads compressed-tensors checkpoints with exactly one config group")
        w, a = groups[0].get("weights") or {}, groups[0].get("input_activations")
        wfmt = "int4" if w.get("type") == "int" else ("fp8" if w.get("num_bits") == 8 else "nvfp4")
        key = (wfmt, None if not a else ("fp8" if a.get("num_bits") == 8 else "nvfp4"))
        layout = "compressed-tensors"
        if wfmt == "int4":
            rec = Recipe("w4a16-int4", weight="int4", group_size=int(w.get("group_size") or 128))
            return layout, rec
    else:
        raise ValueError(f"unsupported quantization_config quant_method {qc.get('quant_method')!r}")
    for r in PRESETS.values():
        if (r.weight, r.input) == key:
            return layout, r
    raise ValueError(f"unsupported quantization scheme in {qc}")
