"""fp8-block end to end: quantize without calibration data, the compressed-tensors export
(weight_scale [ceil(N/128), ceil(K/128)] per module, no input scales, FP8_BLOCK config), moeq.load
reproducing the logits on the core models, the shapes vLLM refuses refused up front, modelopt
refused, `inspect`, and transformers' own loader on a dense model (exact logits)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import moeq
from moeq.checkpoint.layouts import check_supported
from moeq.inspect_checkpoint import inspect_checkpoint
from moeq.quantization import SESSION_ATTR, ShapeError
from moeq.recipes import PRESETS

from .helpers import input_fake_quants, logits, quant_config, quantized_modules, read_checkpoint, tm

CT = "compressed-tensors"
# tiny qwen3_moe has head_dim 32: k_proj / v_proj of 64 rows, which vLLM cannot fuse into qkv with 128-row blocks
OVERRIDES = {"qwen3_moe": {"head_dim": 64}}


def _blocks(n: int) -> int:
    return -(-n // 128)


@pytest.mark.parametrize("model_type", [m for m in tm.CORE_MODELS if m != "gpt_oss"])
def test_export_round_trips_with_block_scales(model_type, tmp_path):
    model = tm.tiny_model(model_type, **OVERRIDES.get(model_type, {}))
    ids = tm.random_input_ids(model, batch=1, seq=8, seed=1)
    plain = logits(model, ids)
    report = moeq.quantize(model, "fp8-block", progress=False, layout=CT)  # dynamic inputs: nothing to calibrate
    assert report.calib_tokens == 0
    want = logits(model, ids)
    assert not torch.equal(want, plain)
    moeq.export(model, tmp_path / "ct", CT, progress=False)
    sd = read_checkpoint(tmp_path / "ct")
    assert not any(k.endswith(("input_scale", "input_global_scale")) for k in sd)
    partial = 0
    for prefix in quantized_modules(sd):
        w, s = sd[f"{prefix}.weight"], sd[f"{prefix}.weight_scale"]
        assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32, prefix
        assert s.shape == (_blocks(w.shape[0]), _blocks(w.shape[1])), (prefix, tuple(w.shape), tuple(s.shape))
        partial += w.shape[0] % 128 != 0
    if model_type in ("deepseek_v3", "nemotron_h"):  # kv_a_proj_with_mqa (160 rows), mamba in_proj (548 rows)
        assert partial > 0
    assert torch.equal(logits(moeq.load(tmp_path / "ct"), ids), want)
    groups = quant_config(tmp_path / "ct")["config_groups"]
    w_args, a_args = groups["group_0"]["weights"], groups["group_0"]["input_activations"]
    assert (w_args["strategy"], w_args["block_structure"], w_args["type"], w_args["num_bits"]) == ("block", [128, 128], "float", 8)
    assert (a_args["strategy"], a_args["group_size"], a_args["dynamic"]) == ("group", 128, True)


def test_inputs_are_quantized_per_group_at_run_time():
    """Dense and experts input fake quant: a group of 128 elements of a token has its own scale, so
    scaling one group changes no other group, and the inputs are really quantized."""
    model = tm.tiny_model("mixtral")
    moeq.quantize(model, "fp8-block", progress=False)
    for fq in input_fake_quants(model):
        x = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
        big = x.clone()
        big[:, 128:] *= 1000
        a, b = fq(x), fq(big)
        assert not torch.equal(a, x)
        assert torch.equal(a[:, :128], b[:, :128])


@pytest.mark.parametrize("model_type,match", [
    ("qwen3_moe", r"self_attn\.k_proj \(N=64, fused with q_proj, v_proj\)"),
    ("gpt_oss", r"mlp\.experts\.gate_up_proj \(gate and up rows interleaved\)"),
])
def test_shapes_vllm_cannot_load_are_refused_before_calibration(model_type, match):
    model = tm.tiny_model(model_type)
    with pytest.raises(ShapeError, match=match) as err:
        moeq.quantize(model, "fp8-block", progress=False)
    assert "divisible by 128" in str(err.value) and "Recipe.with_exclude" in str(err.value)
    assert getattr(model, SESSION_ATTR, None) is None


def test_excluding_the_fused_siblings_together_lifts_the_refusal():
    model = tm.tiny_model("qwen3_moe")
    moeq.quantize(model, PRESETS["fp8-block"].with_exclude(add=["*.self_attn.[qkv]_proj"]), progress=False)


def test_modelopt_layout_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"fp8-block cannot be written in the modelopt layout") as err:
        check_supported("modelopt", PRESETS["fp8-block"])
    assert "FP8_PB_WO" in str(err.value) and "layout='compressed-tensors'" in str(err.value)


def test_inspect_accepts_the_export_and_flags_a_wrong_scale_shape(tmp_path):
    model = tm.tiny_model("mixtral")
    moeq.quantize(model, "fp8-block", progress=False)
    out = tmp_path / "ct"
    moeq.export(model, out, CT, progress=False, max_shard_bytes=1 << 40)
    res = inspect_checkpoint(out)
    assert res.recipe == "fp8-block" and res.layout == CT and not res.problems, res.problems
    sd = load_file(out / "model.safetensors")
    prefix = sorted(p for p in quantized_modules(sd) if ".experts." in p)[0]
    sd[f"{prefix}.input_scale"] = torch.ones(1)
    sd[f"{prefix}.weight_scale"] = sd[f"{prefix}.weight_scale"].repeat_interleave(128, 0)  # per row, not per block
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    problems = inspect_checkpoint(out).problems
    assert any(f"{prefix}.input_scale is present" in p for p in problems), problems
    assert any(f"{prefix}.weight_scale has shape" in p for p in problems), problems


def test_transformers_loads_the_dense_export_with_identical_logits(tmp_path):
    """transformers + compressed-tensors decompress the block weights and quantize the inputs per group at run
    time: float32 logits equal to moeq's fake quant exactly. (Its fused-experts FP8 path multiplies each expert
    weight by its weight_scale by broadcasting, which a block scale [N/128, K/128] does not; MoE models fail to
    load there, a transformers limitation.)"""
    cfg = transformers.Qwen3Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=64, vocab_size=256, max_position_embeddings=128,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    base = transformers.Qwen3ForCausalLM(cfg).eval()
    model = copy.deepcopy(base)
    moeq.quantize(model, "fp8-block", progress=False)
    moeq.export(model, tmp_path / "ct", CT, progress=False)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32,
                                                                 output_loading_info=True)
    assert not any(info.values()), info
    ids = tm.random_input_ids(base, batch=2, seq=8, seed=1)
    want = logits(model, ids)
    assert not torch.equal(want, logits(base, ids))
    assert torch.equal(logits(hf.eval(), ids), want)


def test_transformers_cannot_load_block_fp8_fused_experts_yet(tmp_path):
    """Pins the transformers limitation named above (integrations/compressed_tensors.py, the FP8 experts branch:
    `quant * scale` with a [N/128, K/128] scale). When transformers handles block scales this test fails: then
    extend the dense test above to the MoE models."""
    model = tm.tiny_model("mixtral")
    moeq.quantize(model, "fp8-block", progress=False)
    moeq.export(model, tmp_path / "ct", CT, progress=False)
    with pytest.raises(RuntimeError, match="conversion"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
