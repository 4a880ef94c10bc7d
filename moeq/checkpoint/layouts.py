"""The two checkpoint conventions: per-module tensor names and the quantization config.

What each format writes lives with the format (`moeq/schemes/`, e.g. NVFP4 in ModelOpt:
weight uint8 [N, K/2], weight_scale e4m3 [N, K/16], weight_scale_2 fp32 [], input_scale
fp32 []); this module dispatches through `moeq.schemes.table` and builds the configs.
The config side of compressed-tensors comes from the compressed-tensors package itself.
"""

from __future__ import annotations

import dataclasses

import torch

from ..recipes import Recipe
from ..schemes.table import CONFIGS, INPUT, WEIGHT

LAYOUTS = ("modelopt", "compressed-tensors")
# gpt-oss's own checkpoint format (openai/gpt-oss-*: transformers' Mxfp4Config, vLLM's gpt-oss MXFP4 loader):
# config {"quant_method": "mxfp4", "modules_to_not_convert": [...]}, each fused expert stack as
# `<param>_blocks` / `<param>_scales`, everything else (attention, router, lm_head) unquantized.
NATIVE = "mxfp4-native"
MODELOPT_ALGO = {k: c.modelopt for k, c in CONFIGS.items() if c.modelopt}
CT_PRESET = {k: c.compressed_tensors for k, c in CONFIGS.items()}
CT_FORMAT = {name: s.ct_format for name, s in WEIGHT.items()}


def check_supported(layout: str, recipe: Recipe) -> None:
    if layout not in LAYOUTS + (NATIVE,):
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS + (NATIVE,)}")
    if layout == NATIVE:
        if recipe.weight != "mxfp4":
            raise ValueError(f"recipe {recipe.name} cannot be written in the {NATIVE} layout (gpt-oss's own checkpoint "
                             f"format holds MXFP4 experts only); use recipe w4a16-mxfp4 or mxfp4")
        if recipe.kv_cache is not None:
            raise ValueError(f"the {NATIVE} layout (quant_method mxfp4) has no place for KV cache scales; "
                             f"quantize without kv_cache")
        return
    table = MODELOPT_ALGO if layout == "modelopt" else CT_PRESET
    if (recipe.weight, recipe.input) not in table:
        why = CONFIGS[(recipe.weight, recipe.input)].why_not_modelopt if (recipe.weight, recipe.input) in CONFIGS else ""
        hint = f" ({why})" if why else ""
        raise ValueError(f"recipe {recipe.name} cannot be written in the {layout} layout{hint}")


class UnsupportedExport(ValueError):
    """A (model, recipe, layout) combination that vLLM 0.33 has no loader path for."""


# vLLM 0.33 creates expert biases (w13_bias / w2_bias) only in the compressed-tensors WNA16 MoE method
# (compressed_tensors_moe_wna16.py: "Per-expert biases, as gpt-oss carries"); ModelOptFp8MoEMethod,
# ModelOptNvFp4FusedMoE, CompressedTensorsW8A8Fp8MoEMethod and CompressedTensorsW4A4Nvfp4MoEMethod have none,
# so a checkpoint with expert biases fails in their load (KeyError '...experts.w2_bias').
BIASED_EXPERTS_OK = {("compressed-tensors", "int4", None)}
# ... and in gpt-oss's own MXFP4 format (gpt_oss.py `_load_weights_mxfp4`: w13_bias / w2_bias next to the blocks)
BIASED_EXPERTS_OK |= {(NATIVE, "mxfp4", None), (NATIVE, "mxfp4", "mxfp4")}


def check_experts_supported(layout: str, recipe: Recipe, experts, linears=()) -> None:
    """Refuse, before any calibration, experts that vLLM 0.33 cannot load in `layout` with `recipe`.
    experts: the ExpertsTarget list (find_targets); linears: the quantized Linear targets (the mxfp4-native
    layout has no place for them). One-line error naming the combination and the way out."""
    biased = [t for t in experts if getattr(t.module, "has_bias", False)]
    if biased and (layout, recipe.weight, recipe.input) not in BIASED_EXPERTS_OK:
        t = biased[0]
        native = f"; for MXFP4 use layout='{NATIVE}' (gpt-oss's own checkpoint format)" if recipe.weight == "mxfp4" else ""
        raise UnsupportedExport(
            f"{type(t.module).__name__} ({t.name}) has expert biases, which vLLM 0.33 loads only with w4a16-int4 in the "
            f"compressed-tensors layout; recipe {recipe.name} in the {layout} layout has no vLLM path: use recipe "
            f"w4a16-int4 with layout compressed-tensors, or exclude the experts (Recipe.with_exclude)" + native)
    if layout == NATIVE:
        _check_native(experts, linears, biased)


def _check_native(experts, linears, biased) -> None:
    if len(biased) != len(experts) or not experts:
        t = next((t for t in experts if t not in biased), None)
        raise UnsupportedExport(
            f"the {NATIVE} layout is gpt-oss's own checkpoint format, which vLLM 0.33 reads only for gpt-oss (experts "
            f"with biases); {'no experts' if t is None else f'{type(t.module).__name__} ({t.name})'} cannot be written "
            f"in it: use layout='compressed-tensors'")
    if linears:
        names = [t.name for t in linears]
        pats = sorted({"*" + n.rsplit(".", 1)[-1] for n in names})
        raise UnsupportedExport(
            f"the {NATIVE} layout stores only the experts quantized (attention, router and lm_head stay in the model "
            f"dtype), but the recipe also quantizes {len(names)} Linear modules ({', '.join(names[:3])}"
            f"{' ...' if len(names) > 3 else ''}): leave them unquantized with recipe.with_exclude(add={pats})")


def weight_tensors(layout: str, recipe: Recipe, q, amax: torch.Tensor, n_k: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Tensors of one module's weight. q: the quantized [N, K] slice (NamedTuple of formats);
    amax: the weight's per-tensor amax (0-d)."""
    return WEIGHT[recipe.weight].tensors(layout, q, amax, n_k)


def input_tensors(layout: str, recipe: Recipe, amax: torch.Tensor) -> dict[str, torch.Tensor]:
    if recipe.input is None:
        return {}
    return INPUT[recipe.input].tensors(layout, amax)


# compressed-tensors' kv_cache_scheme for a static per-tensor FP8 cache (vLLM's CompressedTensorsKVCacheMethod
# accepts float / 8 bits / tensor or attn_head / symmetric); vLLM's modelopt flat config reads the same dict as FP8
KV_CACHE_SCHEME = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "tensor",
                   "dynamic": False}


def kv_cache_tensors(layout: str, scales: dict[str, torch.Tensor], k_proj: str, v_proj: str) -> dict[str, torch.Tensor]:
    """One attention layer's k/v scales under the names vLLM 0.33 maps to `...attn.k_scale` / `v_scale`
    (maybe_remap_kv_scale_name): ModelOpt `{k_proj}.k_scale` / `{v_proj}.v_scale` (0-d); compressed-tensors
    `{attention}.k_scale` / `v_scale` ([1]). k_proj / v_proj: the projections' checkpoint module names."""
    if layout == "modelopt":
        return {f"{k_proj}.k_scale": scales["k"].reshape(()), f"{v_proj}.v_scale": scales["v"].reshape(())}
    attn = k_proj.rsplit(".", 1)[0]
    return {f"{attn}.k_scale": scales["k"].reshape(1), f"{attn}.v_scale": scales["v"].reshape(1)}


def kv_cache_names(layout: str, attention: str) -> dict[str, str]:
    """{"k": key, "v": key} of the scales of the attention module whose checkpoint name is `attention`."""
    if layout == "modelopt":
        return {"k": f"{attention}.k_proj.k_scale", "v": f"{attention}.v_proj.v_scale"}
    return {"k": f"{attention}.k_scale", "v": f"{attention}.v_scale"}


def quant_configs(layout: str, recipe: Recipe, ignore: list[str], version: str) -> tuple[dict, dict | None]:
    """-> (config.json quantization_config, hf_quant_config.json or None)."""
    key = (recipe.weight, recipe.input)
    if layout == NATIVE:  # what openai/gpt-oss-* ship (transformers Mxfp4Config); vLLM maps it to gpt_oss_mxfp4
        return {"quant_method": "mxfp4", "modules_to_not_convert": ignore}, None
    kv = recipe.kv_cache == "fp8"
    if layout == "modelopt":
        algo = MODELOPT_ALGO[key]
        producer = {"name": "moeq", "version": version}
        group_size = recipe.group_size if WEIGHT[recipe.weight].granularity == "tensor_group" else None
        nested = {"producer": producer, "quantization": {
            "quant_algo": algo, "kv_cache_quant_algo": "FP8" if kv else None, "group_size": group_size,
            "exclude_modules": ignore}}
        flat = {"quant_method": "modelopt", "quant_algo": algo, "ignore": ignore, "exclude_modules": ignore,
                "group_size": nested["quantization"]["group_size"], "kv_cache_scheme": dict(KV_CACHE_SCHEME) if kv else None,
                "producer": producer}
        return flat, nested
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, preset_name_to_scheme

    scheme = preset_name_to_scheme(CT_PRESET[key], ["Linear"])
    if WEIGHT[recipe.weight].granularity == "group":
        scheme.weights.group_size = recipe.group_size
    cfg = QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore, format=CT_FORMAT[recipe.weight],
                             quantization_status="compressed",
                             kv_cache_scheme=QuantizationArgs(**KV_CACHE_SCHEME) if kv else None)
    return cfg.to_dict(), None


def _kv_cache_from_config(qc: dict) -> str | None:
    """"fp8" when the config asks for a static per-tensor FP8 KV cache, None when it asks for none."""
    algo = qc.get("quantization", {}).get("kv_cache_quant_algo") if "quantization" in qc else None
    scheme = qc.get("kv_cache_scheme")
    if algo is None and scheme is None:
        return None
    if str(algo).upper() == "FP8" or (isinstance(scheme, dict) and scheme.get("type") == "float"
                                        and scheme.get("num_bits") == 8 and scheme.get("strategy", "tensor") == "tensor"
                                        and not scheme.get("dynamic")):
        return "fp8"
    raise ValueError(f"unsupported KV cache quantization in the config ({algo or scheme}); moeq reads static "
                     f"per-tensor FP8 k/v scales only")


def recipe_from_config(qc: dict) -> tuple[str, Recipe]:
    """(layout, recipe) of a quantization_config as written by either convention (kv_cache included)."""
    layout, recipe = _recipe_from_config(qc)
    kv = _kv_cache_from_config(qc)
    return layout, (dataclasses.replace(recipe, kv_cache=kv) if kv else recipe)


def _recipe_from_config(qc: dict) -> tuple[str, Recipe]:
    from ..recipes import PRESETS

    if qc.get("quant_method") == "mxfp4":  # the format carries no activation scheme: weight-only unless a sidecar says
        return NATIVE, PRESETS["w4a16-mxfp4"]
    if qc.get("quant_method") == "modelopt" or "quantization" in qc:
        algo = qc.get("quant_algo") or qc.get("quantization", {}).get("quant_algo")
        key = next((k for k, v in MODELOPT_ALGO.items() if v == algo), None)
        layout = "modelopt"
    elif qc.get("quant_method") == "compressed-tensors":
        groups = list(qc.get("config_groups", {}).values())
        if len(groups) != 1:
            raise ValueError("moeq.load reads compressed-tensors checkpoints with exactly one config group")
        w, a = groups[0].get("weights") or {}, groups[0].get("input_activations")
        key = next((k for k, preset in CT_PRESET.items() if _ct_signature(w, a) == _preset_signature(preset)), None)
        layout = "compressed-tensors"
        if key is not None and WEIGHT[key[0]].granularity == "group":
            rec = next(r for r in PRESETS.values() if (r.weight, r.input) == key)
            return layout, dataclasses.replace(rec, group_size=int(w.get("group_size") or 128))
    else:
        raise ValueError(f"unsupported quantization_config quant_method {qc.get('quant_method')!r}")
    for r in PRESETS.values():
        if (r.weight, r.input) == key:
            return layout, r
    raise ValueError(f"unsupported quantization scheme in {qc}")


def _args_signature(args: dict | None):
    """What tells the schemes apart in compressed-tensors QuantizationArgs (as a dict): the
    strategy says the granularity (token = dynamic per token, tensor = static for FP8 inputs)."""
    if not args:
        return None
    return str(args.get("type")), args.get("num_bits"), str(args.get("strategy"))


def _ct_signature(w: dict, a: dict | None):
    return _args_signature(w), _args_signature(a)


def _preset_signature(preset: str):
    from compressed_tensors.quantization import preset_name_to_scheme

    s = preset_name_to_scheme(preset, ["Linear"])
    dump = lambda x: None if x is None else x.model_dump(mode="json")  # noqa: E731
    return _args_signature(dump(s.weights)), _args_signature(dump(s.input_activations))
