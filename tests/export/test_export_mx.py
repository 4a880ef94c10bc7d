"""MX presets end to end (mxfp4 W4A4, w4a16-mxfp4, mxfp8 W8A8): quantize without calibration data,
export, moeq.load reproduces the in-memory logits bit for bit on the core tiny models (gpt-oss in its
own MXFP4 checkpoint format, 'mxfp4-native'); the compressed-tensors and ModelOpt tensors and configs;
inputs quantized per group of 32 at run time; the refusals and what they point at."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import moeq
from moeq.checkpoint.layouts import NATIVE, UnsupportedExport, check_supported
from moeq.formats import mx
from moeq.inspect_checkpoint import inspect_checkpoint
from moeq.recipes import PRESETS

from .helpers import input_fake_quants, logits, quantized_modules, read_checkpoint, tm

CT = "compressed-tensors"
# gpt-oss's own format keeps attention in the model dtype (only the experts are MXFP4)
ATTENTION = ["*q_proj", "*k_proj", "*v_proj", "*o_proj"]


def _layout(model_type: str, preset: str) -> str:
    return NATIVE if model_type == "gpt_oss" else CT


class _Cache(dict):
    """(model_type, preset, layout) -> (fake-quant model, its logits, export dir); built once per module."""

    def __init__(self, zoo, root):
        super().__init__()
        self.zoo, self.root = zoo, root

    def get(self, model_type, preset, layout=None):
        layout = layout or _layout(model_type, preset)
        key = (model_type, preset, layout)
        if key not in self:
            m = copy.deepcopy(self.zoo.base(model_type))
            recipe = PRESETS[preset].with_exclude(add=ATTENTION) if layout == NATIVE else PRESETS[preset]
            report = moeq.quantize(m, recipe, progress=False)  # dynamic MX inputs: nothing to calibrate
            assert report.calib_tokens == 0
            out = self.root / "-".join(key)
            moeq.export(m, out, layout, progress=False)
            self[key] = (m, logits(m, self.zoo.eval_ids(m)), out)
        return self[key]


@pytest.fixture(scope="module")
def cache(zoo, tmp_path_factory):
    return _Cache(zoo, tmp_path_factory.mktemp("mx"))


ROUND_TRIPS = ([(m, "mxfp4") for m in tm.CORE_MODELS] + [(m, "mxfp8") for m in tm.CORE_MODELS if m != "gpt_oss"]
               + [("mixtral", "w4a16-mxfp4"), ("gpt_oss", "w4a16-mxfp4")])


@pytest.mark.parametrize("model_type,preset", ROUND_TRIPS)
def test_load_reproduces_quantized_logits(zoo, cache, model_type, preset):
    model, want, out = cache.get(model_type, preset)
    assert not torch.equal(want, zoo.quantized_logits(model_type, None))  # really quantized
    got = logits(moeq.load(out), zoo.eval_ids(model))
    assert torch.equal(got, want), f"max abs diff {(got - want).abs().max().item():.3g}"


@pytest.mark.parametrize("preset", ["mxfp4", "mxfp8"])
def test_compressed_tensors_tensors_and_config(cache, preset):
    _, _, out = cache.get("qwen3_moe", preset)
    sd = read_checkpoint(out)
    assert not any(k.endswith(("input_scale", "global_scale")) for k in sd)  # dynamic inputs: nothing written
    mods = quantized_modules(sd)
    assert any(".experts.3.up_proj" in m for m in mods) and any("self_attn.q_proj" in m for m in mods)
    for m in mods:
        s = sd[f"{m}.weight_scale"]
        w = sd[f"{m}.weight_packed"] if preset == "mxfp4" else sd[f"{m}.weight"]
        k = w.shape[1] * (2 if preset == "mxfp4" else 1)
        assert w.dtype == (torch.uint8 if preset == "mxfp4" else torch.float8_e4m3fn), m
        assert s.dtype == torch.uint8 and s.shape == (w.shape[0], k // 32), m
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == {"mxfp4": "mxfp4-pack-quantized", "mxfp8": "mxfp8-quantized"}[preset]
    (group,) = qc["config_groups"].values()
    for args in (group["weights"], group["input_activations"]):
        assert (args["strategy"], args["group_size"], args["num_bits"]) == ("group", 32, 4 if preset == "mxfp4" else 8)
    assert group["input_activations"]["dynamic"] is True
    res = inspect_checkpoint(out)
    assert res.recipe == preset and not res.problems, res.problems


def test_mxfp8_modelopt_layout(zoo, cache):
    model, want, out = cache.get("qwen3_moe", "mxfp8", "modelopt")
    hq = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert hq["quant_algo"] == "MXFP8" and "kv_cache_quant_algo" in hq and "exclude_modules" in hq
    sd = read_checkpoint(out)
    w, s = sd["model.layers.0.mlp.experts.5.down_proj.weight"], sd["model.layers.0.mlp.experts.5.down_proj.weight_scale"]
    assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.uint8 and s.shape == (w.shape[0], w.shape[1] // 32)
    assert torch.equal(logits(moeq.load(out), zoo.eval_ids(model)), want)


def test_mxfp4_modelopt_layout_is_refused_with_the_reason():
    for preset in ("mxfp4", "w4a16-mxfp4"):
        with pytest.raises(ValueError, match=rf"{preset} cannot be written in the modelopt layout.*no MXFP4 quant_algo"):
            check_supported("modelopt", PRESETS[preset])


@pytest.mark.parametrize("preset", ["mxfp4", "mxfp8"])
def test_inputs_are_quantized_per_group_of_32_at_run_time(cache, preset):
    """Scaling one 32-element group of one token changes that group only (a per-token or static scale
    would coarsen the other groups too), and the inputs really are quantized."""
    model, _, _ = cache.get("qwen3_moe", preset)
    for fq in input_fake_quants(model):
        x = torch.randn(4, 128, generator=torch.Generator().manual_seed(0))
        big = x.clone()
        big[-1, :32] *= 1000
        a, b = fq(x), fq(big)
        assert not torch.equal(a, x)
        assert torch.equal(a[:-1], b[:-1]) and torch.equal(a[-1, 32:], b[-1, 32:])
        assert torch.equal(a, mx.fake_quant(x, "e2m1" if preset == "mxfp4" else "e4m3"))


# ---------------------------------------------------------------- gpt-oss: its own MXFP4 checkpoint format


def test_gpt_oss_native_tensors_and_config(zoo, cache):
    """What openai/gpt-oss-* ship and vLLM's gpt_oss.py `_load_weights_mxfp4` reads: per layer the fused
    stacks as `<param>_blocks` uint8 [E, N, K/32, 16] and `<param>_scales` uint8 [E, N, K/32], N in the
    in-memory row order (gate/up interleaved: row 2j gate j, row 2j+1 up j), the biases under their own
    names, attention / router / lm_head unquantized and named in modules_to_not_convert."""
    model, _, out = cache.get("gpt_oss", "w4a16-mxfp4")
    sd = read_checkpoint(out)
    experts = model.model.layers[0].mlp.experts
    E, H, two_i = experts.gate_up_proj.shape  # gpt-oss stores [E, H, 2I] (is_transposed)
    p = "model.layers.0.mlp.experts."
    blocks, scales = sd[p + "gate_up_proj_blocks"], sd[p + "gate_up_proj_scales"]
    assert blocks.dtype == scales.dtype == torch.uint8
    assert blocks.shape == (E, two_i, H // 32, 16) and scales.shape == (E, two_i, H // 32)
    assert sd[p + "down_proj_blocks"].shape == (E, H, two_i // 2 // 32, 16)
    assert sd[p + "gate_up_proj_bias"].shape == (E, two_i) and sd[p + "down_proj_bias"].shape == (E, H)
    assert not any(".experts.0." in k or k.endswith(("weight_packed", "weight_scale")) for k in sd)
    assert sd["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    # low nibble = element 2j along K (H); row r of the [2I, H] view = column r of the in-memory [H, 2I] weight
    q = mx.quantize(experts.gate_up_proj.detach().transpose(1, 2), "e2m1")
    assert torch.equal(blocks.flatten(-2) & 0x0F, q.codes[..., 0::2]) and torch.equal(scales, q.scale)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "mxfp4" and set(qc) == {"quant_method", "modules_to_not_convert"}
    skip = qc["modules_to_not_convert"]
    assert {"lm_head", "model.layers.0.mlp.router", "model.layers.0.self_attn.q_proj"} <= set(skip)
    assert not (out / "hf_quant_config.json").exists()
    assert not inspect_checkpoint(out).problems


def test_transformers_mxfp4_integration_reads_the_native_export(zoo, cache):
    """transformers' own gpt-oss MXFP4 loader (integrations/mxfp4.py, dequantizing on CPU: lut[code] ldexp
    (scale - 127), exact in float32) gives moeq's fake-quant weights bit for bit, hence the same logits."""
    import transformers

    model, want, out = cache.get("gpt_oss", "w4a16-mxfp4")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    got = logits(hf, zoo.eval_ids(model))
    assert torch.equal(got, want), f"max abs diff {(got - want).abs().max().item():.3g}"


def test_native_layout_refusals(zoo):
    gpt_oss = zoo.base("gpt_oss")
    with pytest.raises(UnsupportedExport, match=r"expert biases.*use layout='mxfp4-native'"):
        moeq.quantize(copy.deepcopy(gpt_oss), "w4a16-mxfp4", progress=False, layout=CT)
    with pytest.raises(UnsupportedExport, match=r"stores only the experts.*with_exclude\(add=\['\*k_proj'"):
        moeq.quantize(copy.deepcopy(gpt_oss), "w4a16-mxfp4", progress=False, layout=NATIVE)
    with pytest.raises(ValueError, match=r"mxfp8 cannot be written in the mxfp4-native layout"):
        moeq.quantize(copy.deepcopy(gpt_oss), "mxfp8", progress=False, layout=NATIVE)
    with pytest.raises(UnsupportedExport, match=r"reads only for gpt-oss.*Qwen3MoeExperts.*compressed-tensors"):
        recipe = PRESETS["w4a16-mxfp4"].with_exclude(add=ATTENTION)
        moeq.quantize(copy.deepcopy(zoo.base("qwen3_moe")), recipe, progress=False, layout=NATIVE)


def test_inspect_flags_a_broken_native_export(cache, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    _, _, out = cache.get("gpt_oss", "w4a16-mxfp4")
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    sd = load_file(bad / "model.safetensors")
    p = "model.layers.1.mlp.experts."
    del sd[p + "down_proj_scales"]
    sd[p + "gate_up_proj_scales"] = sd[p + "gate_up_proj_scales"][..., :-1].contiguous()
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    problems = inspect_checkpoint(bad).problems
    assert any(f"{p}down_proj_scales is missing" in x for x in problems), problems
    assert any(f"{p}gate_up_proj_scales has dtype" in x for x in problems), problems
