"""fp8-dynamic end to end: quantize without calibration data, the compressed-tensors
export (per-channel weight scales, no input scales), modelopt refused, `inspect`, and the
scheme table's configs read back to the recipe that wrote them."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

import moeq
from moeq.checkpoint.layouts import LAYOUTS, check_supported, quant_configs, recipe_from_config
from moeq.inspect_checkpoint import inspect_checkpoint
from moeq.recipes import PRESETS
from moeq.schemes.table import CONFIGS

from .helpers import input_fake_quants, logits, quantized_modules, read_checkpoint, tm


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])  # (gpt-oss: refused, its expert biases)
def test_quantize_without_calibration_data_round_trips(model_type, tmp_path):
    model = tm.tiny_model(model_type)
    ids = tm.random_input_ids(model, batch=1, seq=8, seed=1)
    plain = logits(model, ids)
    report = moeq.quantize(model, "fp8-dynamic", progress=False)  # dynamic inputs: nothing to calibrate
    assert report.calib_tokens == 0
    want = logits(model, ids)
    assert not torch.equal(want, plain)
    moeq.export(model, tmp_path / "ct", "compressed-tensors", progress=False)
    sd = read_checkpoint(tmp_path / "ct")
    assert not any(k.endswith(("input_scale", "input_global_scale")) for k in sd)
    for prefix in quantized_modules(sd):
        w, s = sd[f"{prefix}.weight"], sd[f"{prefix}.weight_scale"]
        assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (w.shape[0], 1), prefix
    assert torch.equal(logits(moeq.load(tmp_path / "ct"), ids), want)


def test_inputs_are_quantized_per_token_at_run_time():
    """The quantized model's input fake quant (dense and experts) scales each token by its
    own amax: scaling one token changes no other token (a dynamic per-tensor scale would:
    the big token would coarsen every token's grid), and the inputs are really quantized."""
    model = tm.tiny_model("qwen3_moe")
    moeq.quantize(model, "fp8-dynamic", progress=False)
    for fq in input_fake_quants(model):
        k = 128
        x = torch.randn(6, k, generator=torch.Generator().manual_seed(0))
        big = x.clone()
        big[-1] *= 1000
        a, b = fq(x), fq(big)
        assert not torch.equal(a, x)
        assert torch.equal(a[:-1], b[:-1])
        assert torch.equal(a, torch.cat([fq(x[i:i + 1]) for i in range(6)]))


def test_modelopt_layout_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"fp8-dynamic cannot be written in the modelopt layout") as err:
        check_supported("modelopt", PRESETS["fp8-dynamic"])
    assert "FP8_PER_CHANNEL_PER_TOKEN" in str(err.value) and "layout='compressed-tensors'" in str(err.value)


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_preset_config_reads_back_to_its_recipe(name, layout):
    recipe = PRESETS[name]
    if (CONFIGS[(recipe.weight, recipe.input)].modelopt is None) and layout == "modelopt":
        pytest.skip("not written in this layout")
    qc, _ = quant_configs(layout, recipe, [], "0")
    assert recipe_from_config(qc) == (layout, recipe)
    if recipe.weight == "int4":  # the group size comes from the config
        r64 = dataclasses.replace(recipe, group_size=64)
        assert recipe_from_config(quant_configs(layout, r64, [], "0")[0]) == (layout, r64)


def test_inspect_accepts_the_export_and_flags_a_planted_input_scale(tmp_path):
    model = tm.tiny_model("qwen3_moe")
    moeq.quantize(model, "fp8-dynamic", progress=False)
    out = tmp_path / "ct"
    moeq.export(model, out, "compressed-tensors", progress=False, max_shard_bytes=1 << 40)
    res = inspect_checkpoint(out)
    assert res.recipe == "fp8-dynamic" and res.layout == "compressed-tensors" and not res.problems, res.problems
    sd = load_file(out / "model.safetensors")
    prefix = sorted(quantized_modules(sd))[0]
    sd[f"{prefix}.input_scale"] = torch.ones(1)
    sd[f"{prefix}.weight_scale"] = sd[f"{prefix}.weight_scale"].reshape(-1)  # [N] instead of [N, 1]
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    problems = inspect_checkpoint(out).problems
    assert any(f"{prefix}.input_scale is present" in p for p in problems), problems
    assert any(f"{prefix}.weight_scale has shape" in p for p in problems), problems
