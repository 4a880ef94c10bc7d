"""The exported config and tensors read the way vLLM reads them.

ModelOpt: `hf_quant_config.json` (nested) and config.json's flat `quantization_config`;
exclusions matched like vLLM's `ModelOptQuantConfigBase.is_layer_excluded` (exact, substring,
then fnmatch). compressed-tensors: `ignore` entries are exact names or `re:` regexes. Every
quantized tensor has the dtype and shape of its convention; scales that vLLM fuses are shared.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict

import pytest
import torch

import moeq

from .helpers import (LAYOUTS, NVFP4_PRESETS, PRESETS, UNWRITABLE, VLLM_FUSED, ct_ignored, expert_leaf, quant_config,
                      quantized_modules, read_checkpoint, stem, tm, vllm_modelopt_excluded)

MODELOPT_ALGO = {"fp8": "FP8", "nvfp4": "NVFP4", "w4a16-nvfp4": "W4A16_NVFP4"}
CASES = [(p, lay) for p in PRESETS for lay in LAYOUTS if (p, lay) not in UNWRITABLE]
E4M3, F32 = torch.float8_e4m3fn, torch.float32


def _excluded(layout, prefix, qc):
    if layout == "modelopt":
        return vllm_modelopt_excluded(prefix, qc["ignore"])
    return ct_ignored(prefix, qc["ignore"])


def _params(sd, prefix):
    """{param name: tensor} of one module in a checkpoint (prefix: a module name or a vLLM '...w13_' stem)."""
    st = stem(prefix)
    return {k[len(st):]: v for k, v in sd.items() if k.startswith(st) and "." not in k[len(st):]}


def _n_k(zoo, model_type, prefix):
    """[N, K] of a quantized module, from the unquantized model's own checkpoint (or its fused experts)."""
    plain = zoo.plain(model_type)
    if f"{prefix}.weight" in plain:
        n, k = plain[f"{prefix}.weight"].shape
        return n, k
    mod, _, leaf = expert_leaf(prefix)  # experts kept fused in the original checkpoint (gpt_oss): vLLM's w13_/w2_
    em = zoo.base(model_type).get_submodule(mod)
    p = em.down_proj if leaf == "down" else (em.gate_up_proj if em.has_gate else em.up_proj)
    n, k = p.shape[1:][::-1] if em.is_transposed else p.shape[1:]
    return n, k


def _expected(layout, preset, n, k, model_dtype, shape=True):
    """{param: (dtype, shape)} of one quantized module (shape False: no int4 weight_shape, vLLM fused experts)."""
    ct = layout == "compressed-tensors"
    scalar = (1,) if ct else ()
    if preset in NVFP4_PRESETS:
        out = {"weight_packed" if ct else "weight": (torch.uint8, (n, k // 2)), "weight_scale": (E4M3, (n, k // 16)),
               "weight_global_scale" if ct else "weight_scale_2": (F32, scalar)}
        if preset == "nvfp4":
            out["input_global_scale" if ct else "input_scale"] = (F32, scalar)
        return out
    if preset == "fp8":
        return {"weight": (E4M3, (n, k)), "weight_scale": (F32, scalar), "input_scale": (F32, scalar)}
    if preset == "fp8-dynamic":  # per-channel weight scale, no input scale (dynamic per token)
        return {"weight": (E4M3, (n, k)), "weight_scale": (F32, (n, 1))}
    out = {"weight_packed": (torch.int32, (n, k // 8)), "weight_scale": (model_dtype, (n, k // 128))}
    return {**out, "weight_shape": (torch.int64, (2,))} if shape else out


def _weight_global(layout, preset):
    if preset in NVFP4_PRESETS:
        return "weight_global_scale" if layout == "compressed-tensors" else "weight_scale_2"
    return "weight_scale" if preset == "fp8" else None


def _input_param(layout, preset):
    if preset == "nvfp4":
        return "input_global_scale" if layout == "compressed-tensors" else "input_scale"
    return "input_scale" if preset == "fp8" else None


# ---- config -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", tm.CORE_MODELS)
@pytest.mark.parametrize("preset", list(MODELOPT_ALGO))
def test_modelopt_config_as_vllm_reads_it(zoo, model_type, preset):
    exp = zoo.exported(model_type, preset, "modelopt")
    nested = json.loads((exp.path / "hf_quant_config.json").read_text())
    assert set(nested) >= {"producer", "quantization"}
    assert nested["producer"]["name"] == "moeq" and nested["producer"]["version"] == moeq.__version__
    q = nested["quantization"]
    assert {"quant_algo", "kv_cache_quant_algo", "group_size", "exclude_modules"} <= set(q)
    assert q["quant_algo"] == MODELOPT_ALGO[preset]
    assert q["kv_cache_quant_algo"] is None
    if preset in NVFP4_PRESETS:
        assert q["group_size"] == 16
    flat = quant_config(exp.path)
    assert flat["quant_method"] == "modelopt"
    assert flat["quant_algo"] == q["quant_algo"] and flat["group_size"] == q["group_size"]
    assert flat["ignore"] == q["exclude_modules"] and isinstance(flat["ignore"], list)
    assert flat.get("kv_cache_quant_algo") is None
    assert exp.report.ignore == flat["ignore"]


@pytest.mark.parametrize("model_type", tm.CORE_MODELS)
@pytest.mark.parametrize("preset", PRESETS)
def test_ct_config_parses(zoo, model_type, preset):
    from compressed_tensors.quantization import QuantizationConfig

    exp = zoo.exported(model_type, preset, "compressed-tensors")
    qc = quant_config(exp.path)
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    fmt = {"fp8": "float-quantized", "fp8-dynamic": "float-quantized", "w4a16-int4": "pack-quantized"}.get(
        preset, "nvfp4-pack-quantized")
    assert qc["format"] == fmt
    parsed = QuantizationConfig.model_validate(qc)
    (group,) = parsed.config_groups.values()
    assert group.targets == ["Linear"]
    w, a = group.weights, group.input_activations
    if preset == "w4a16-int4":
        assert (w.type, w.num_bits, w.strategy, w.group_size, w.symmetric) == ("int", 4, "group", 128, True)
    elif preset == "fp8":
        assert (w.type, w.num_bits, w.strategy) == ("float", 8, "tensor") and a.num_bits == 8 and not a.dynamic
    elif preset == "fp8-dynamic":
        assert (w.type, w.num_bits, w.strategy, w.dynamic) == ("float", 8, "channel", False)
        assert (a.type, a.num_bits, a.strategy, a.dynamic) == ("float", 8, "token", True)
    else:
        assert (w.type, w.num_bits, w.strategy, w.group_size) == ("float", 4, "tensor_group", 16)
    assert (a is None) == preset.startswith("w4a16")


@pytest.mark.parametrize("model_type", tm.CORE_MODELS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_routers_excluded_and_quantized_modules_not(zoo, model_type, layout):
    preset = "nvfp4"
    exp = zoo.exported(model_type, preset, layout)
    qc, sd = quant_config(exp.path), read_checkpoint(exp.path)
    routers = zoo.routers(model_type)
    for r in routers:
        assert f"{r}.weight" in sd and f"{r}.weight_scale" not in sd, r
        assert _excluded(layout, r, qc), f"router {r} is not matched by the exclude list {qc['ignore']}"
    quantized = quantized_modules(sd)
    fused_experts = {expert_leaf(p)[0] for p in quantized if expert_leaf(p)}
    assert fused_experts, "no experts were quantized"
    for prefix in sorted(quantized | fused_experts):
        assert not _excluded(layout, prefix, qc), f"quantized {prefix} is excluded by {qc['ignore']}"
    # every nn.Linear of the model is either quantized in the checkpoint or excluded
    for name, mod in zoo.base(model_type).named_modules():
        if isinstance(mod, torch.nn.Linear):
            name = zoo.checkpoint_name(model_type, name)
            assert (name in quantized) != _excluded(layout, name, qc), name


# ---- tensors ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", tm.CORE_MODELS)
@pytest.mark.parametrize("preset,layout", CASES)
def test_tensor_dtypes_and_shapes(zoo, model_type, preset, layout):
    exp = zoo.exported(model_type, preset, layout)
    sd = read_checkpoint(exp.path)
    quantized = quantized_modules(sd)
    assert quantized
    for prefix in sorted(quantized):
        n, k = _n_k(zoo, model_type, prefix)
        want = _expected(layout, preset, n, k, torch.float32, shape=not prefix.endswith("_"))
        got = _params(sd, prefix)
        bias = zoo.plain(model_type).get(f"{prefix}.bias")
        if bias is not None:  # biases stay as they were
            assert torch.equal(got.pop("bias"), bias), f"{prefix}.bias"
        assert set(got) == set(want), f"{prefix}: {sorted(got)} vs {sorted(want)}"
        for name, (dtype, shape) in want.items():
            t = got[name]
            assert t.dtype == dtype and tuple(t.shape) == shape, f"{prefix}.{name}: {t.dtype}{tuple(t.shape)}"
            if t.dtype == F32 or name == "weight_scale":
                assert torch.isfinite(t.float()).all() and (t.float() > 0).all(), f"{prefix}.{name}"
        if preset == "w4a16-int4" and "weight_shape" in want:
            assert got["weight_shape"].tolist() == [n, k]


def _expert_groups(sd):
    """{experts module: {expert: {gate|up|down: prefix}}}."""
    out = defaultdict(lambda: defaultdict(dict))
    for prefix in quantized_modules(sd):
        leaf = expert_leaf(prefix)
        if leaf:
            mod, e, role = leaf
            out[mod][e][role] = prefix
    return out


@pytest.mark.parametrize("model_type", tm.CORE_MODELS)
@pytest.mark.parametrize("preset,layout", [c for c in CASES if c[0] != "w4a16-int4"])
def test_expert_scales_shared_as_vllm_fuses_them(zoo, model_type, preset, layout):
    """gate/up of an expert share the weight global scale (vLLM uses the gate's for both halves of w13); one
    input scale per layer and projection, equal for gate and up, finite and > 0."""
    sd = read_checkpoint(zoo.exported(model_type, preset, layout).path)
    wg, ip = _weight_global(layout, preset), _input_param(layout, preset)
    groups = _expert_groups(sd)
    (n_experts,) = {m.down_proj.shape[0] for _, m in tm.experts_modules(zoo.base(model_type))}
    assert len(groups) == len(tm.experts_modules(zoo.base(model_type)))
    for mod, experts in groups.items():
        assert sorted(experts) == list(range(n_experts)), mod
        for e, roles in experts.items():
            if "gate" in roles and wg is not None:  # per-channel weight scales: nothing shared
                assert torch.equal(sd[f"{roles['gate']}.{wg}"], sd[f"{roles['up']}.{wg}"]), f"{mod}.{e}"
        if ip is None:
            continue
        per_role = defaultdict(set)
        for e, roles in experts.items():
            for role, prefix in roles.items():
                v = sd[f"{prefix}.{ip}"]
                assert torch.isfinite(v).all() and (v > 0).all(), f"{prefix}.{ip} = {v}"
                per_role["up" if role == "gate" else role].add(v.item())  # gate and up read the same input
        for role, values in per_role.items():
            assert len(values) == 1, f"{mod} {role}: {len(values)} different input scales across experts"




@pytest.mark.parametrize("model_type", tm.CORE_MODELS)
@pytest.mark.parametrize("preset,layout", [c for c in CASES if c[0] in NVFP4_PRESETS])
def test_vllm_fused_siblings_share_scales(zoo, model_type, preset, layout):
    """Dense modules vLLM loads into one GEMM (q/k/v, gate/up, MLA q_a/kv_a, Qwen3.5 qkv/z) share their NVFP4
    weight global scale and input scale."""
    sd = read_checkpoint(zoo.exported(model_type, preset, layout).path)
    wg, ip = _weight_global(layout, preset), _input_param(layout, preset)
    quantized = {p for p in quantized_modules(sd) if not expert_leaf(p)}
    n_groups = 0
    for parent in sorted({p.rpartition(".")[0] for p in quantized}):
        for fused, leaves in VLLM_FUSED.items():
            members = [f"{parent}.{leaf}" for leaf in leaves if f"{parent}.{leaf}" in quantized]
            if len(members) < 2:
                continue
            n_groups += 1
            for name in [wg] + ([ip] if ip else []):
                values = {m: sd[f"{m}.{name}"].item() for m in members}
                assert len(set(values.values())) == 1, f"{parent} {fused}: {name} differs: {values}"
    assert n_groups > 0


def _layer(name: str) -> int:
    return int(re.search(r"\blayers\.(\d+)\.", name)[1])


def _check_never_routed(report, exp, path, layout, preset):
    never = {m: v for m, v in report.never_routed.items() if v}
    assert never, f"calibration routed every expert: {report.tokens_per_expert}"
    for m, experts in never.items():
        assert all(report.tokens_per_expert[m][e] == 0 for e in experts)
    assert exp.never_routed == report.never_routed
    assert json.loads((path / "moeq_export.json").read_text())["never_routed"] == report.never_routed
    sd = read_checkpoint(path)
    ip = _input_param(layout, preset)
    groups = _expert_groups(sd)
    for m, experts in never.items():
        (mod,) = [g for g in groups if _layer(g) == _layer(m)]  # on disk Mixtral's mlp is block_sparse_moe
        routed = next(x for x in range(len(report.tokens_per_expert[m])) if x not in experts)
        for e in experts:
            for role, prefix in groups[mod][e].items():
                v = sd[f"{prefix}.{ip}"]
                assert torch.isfinite(v).all() and (v > 0).all(), f"never-routed {prefix}.{ip} = {v}"
                assert torch.equal(v, sd[f"{groups[mod][routed][role]}.{ip}"]), prefix


@pytest.mark.parametrize("model_type", ["qwen3_moe", "nemotron_h"])
@pytest.mark.parametrize("preset", ["nvfp4", "fp8"])
def test_forced_never_routed_expert_gets_the_layer_input_scale(model_type, preset, tmp_path):
    model = tm.tiny_model(model_type)
    ids = tm.random_input_ids(model, batch=1, seq=2, seed=3)  # 2 tokens x top-2 of 8 experts
    report = moeq.quantize(model, preset, [ids], progress=False)
    assert report.calib_tokens == 2
    for layout in LAYOUTS:
        exp = moeq.export(model, tmp_path / layout, layout, progress=False)
        _check_never_routed(report, exp, tmp_path / layout, layout, preset)


@pytest.mark.parametrize("model_type,preset,layout", [
    ("mixtral", "nvfp4", "modelopt"), ("mixtral", "fp8", "compressed-tensors"), ("gpt_oss", "fp8", "modelopt")])
def test_never_routed_experts_of_the_shared_exports(zoo, model_type, preset, layout):
    """The suite's own calibration (2 x 16 tokens) leaves some experts of these models unrouted."""
    _, report = zoo.quantized(model_type, preset)
    exp = zoo.exported(model_type, preset, layout)
    _check_never_routed(report, exp.report, exp.path, layout, preset)
