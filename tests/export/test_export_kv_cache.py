"""kv_cache='fp8' on disk: the k/v scale tensors under the names vLLM 0.33 maps to `attn.k_scale` /
`v_scale` in each layout, the config fields that switch the engine's FP8 cache on, moeq.load reading
them back (identical logits), `inspect`, the sidecar, and the streaming resume fingerprint."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import moeq
from moeq.checkpoint.layouts import LAYOUTS, recipe_from_config
from moeq.inspect_checkpoint import inspect_checkpoint
from moeq.recipes import PRESETS
from moeq.resume_state import mismatch
from moeq.streaming import quantize_streaming

from .helpers import logits, read_checkpoint, tm

KV_SCHEME = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "tensor", "dynamic": False}


def _names(layout: str, attn: str) -> tuple[str, str]:
    if layout == "modelopt":
        return f"{attn}.k_proj.k_scale", f"{attn}.v_proj.v_scale"
    return f"{attn}.k_scale", f"{attn}.v_scale"


@pytest.mark.parametrize("model_type,preset", [("qwen3_moe", "fp8"), ("mixtral", "nvfp4")])
def test_scales_written_read_back_and_declared(model_type, preset, tmp_path):
    model = tm.tiny_model(model_type)
    ids = tm.random_input_ids(model, batch=2, seq=8, seed=1)
    recipe = dataclasses.replace(PRESETS[preset], kv_cache="fp8")
    moeq.quantize(model, recipe, [ids], progress=False)
    want = logits(model, ids)
    states = model.moeq_session.attention
    assert len(states) == len(model.model.layers)
    for layout in LAYOUTS:
        out = tmp_path / layout
        moeq.export(model, out, layout, progress=False)
        sd = read_checkpoint(out)
        shape = () if layout == "modelopt" else (1,)
        for st in states:
            for key, kind in zip(_names(layout, st.name), "kv"):
                t = sd.pop(key)
                assert t.dtype == torch.float32 and t.shape == shape, key
                assert torch.equal(t.reshape(()), st.scale[kind]), key
        assert not [k for k in sd if k.endswith(("k_scale", "v_scale"))]  # nothing else, nowhere else
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        if layout == "modelopt":
            nested = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
            assert nested["kv_cache_quant_algo"] == "FP8" and qc["kv_cache_scheme"] == KV_SCHEME
        else:
            assert qc["kv_cache_scheme"] == KV_SCHEME
        assert recipe_from_config(qc)[1].kv_cache == "fp8"
        assert json.loads((out / "moeq_export.json").read_text())["recipe"]["kv_cache"] == "fp8"
        assert inspect_checkpoint(out).problems == []
        loaded = moeq.load(out)
        assert [torch.stack([s.scale["k"], s.scale["v"]]).tolist() for s in loaded.moeq_session.attention] == \
            [torch.stack([s.scale["k"], s.scale["v"]]).tolist() for s in states]
        assert torch.equal(logits(loaded, ids), want)


def test_inspect_flags_a_missing_scale_and_a_stray_one(tmp_path):
    model = tm.tiny_model("qwen3_moe")
    ids = [tm.random_input_ids(model, batch=1, seq=8)]
    moeq.quantize(model, dataclasses.replace(PRESETS["fp8"], kv_cache="fp8"), ids, progress=False)
    out = tmp_path / "kv"
    moeq.export(model, out, "compressed-tensors", progress=False, max_shard_bytes=1 << 40)
    sd = load_file(out / "model.safetensors")
    del sd["model.layers.1.self_attn.v_scale"]
    sd["model.layers.0.self_attn.k_scale"] = torch.zeros(1)
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    problems = inspect_checkpoint(out).problems
    assert any("model.layers.1.self_attn.v_scale is missing" in p for p in problems), problems
    assert any("model.layers.0.self_attn.k_scale has non-finite or non-positive" in p for p in problems), problems

    plain = tm.tiny_model("qwen3_moe")  # no kv_cache: a k_scale on disk is a mixed-up export
    moeq.quantize(plain, "fp8", ids, progress=False)
    moeq.export(plain, tmp_path / "plain", "modelopt", progress=False, max_shard_bytes=1 << 40)
    sd = load_file(tmp_path / "plain" / "model.safetensors")
    sd["model.layers.0.self_attn.k_proj.k_scale"] = torch.tensor(1.0)
    save_file(sd, tmp_path / "plain" / "model.safetensors", metadata={"format": "pt"})
    assert any("k_proj.k_scale is present, but the config declares no KV cache" in p
               for p in inspect_checkpoint(tmp_path / "plain").problems)


def test_without_kv_cache_the_sidecar_and_configs_are_as_before(tmp_path):
    """No kv_cache: no kv_cache key in moeq_export.json (earlier exports stay byte-identical) and null configs."""
    model = tm.tiny_model("qwen3_moe")
    moeq.quantize(model, "fp8-dynamic", progress=False)
    moeq.export(model, tmp_path / "ct", "compressed-tensors", progress=False)
    assert "kv_cache" not in json.loads((tmp_path / "ct" / "moeq_export.json").read_text())["recipe"]
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["kv_cache_scheme"] is None


def test_resume_fingerprint_names_the_kv_cache_option():
    a = {"recipe": dataclasses.asdict(PRESETS["fp8"])}
    b = {"recipe": dataclasses.asdict(dataclasses.replace(PRESETS["fp8"], kv_cache="fp8"))}
    assert mismatch(a, b) == ("recipe.kv_cache", None, "fp8")


def test_streaming_refuses_kv_cache(tmp_path):
    with pytest.raises(NotImplementedError, match="kv_cache='fp8' is not supported by the streaming"):
        quantize_streaming(tmp_path, dataclasses.replace(PRESETS["fp8"], kv_cache="fp8"), [], tmp_path / "out")
