"""An export of a model loaded from a directory carries that directory's other files
(tokenizer, generation config) and a config.json transformers and vLLM can read."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import moeq

from .helpers import LAYOUTS, logits, tm

TOKENIZER_FILES = {
    "tokenizer.json": '{"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}\n',
    "tokenizer_config.json": '{"model_max_length": 512, "tokenizer_class": "PreTrainedTokenizerFast"}\n',
    "special_tokens_map.json": '{"eos_token": "<eos>"}\n',
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A model directory as on the hub: config, generation config, sharded weights, tokenizer files."""
    src = tmp_path_factory.mktemp("src") / "tiny-qwen3-moe"
    model = tm.tiny_model("qwen3_moe")
    model.generation_config = transformers.GenerationConfig(max_new_tokens=7, do_sample=False, eos_token_id=3)
    model.save_pretrained(src, max_shard_size="200KB")  # sharded: its index must not leak into the export
    for name, text in TOKENIZER_FILES.items():
        (src / name).write_text(text)
    assert (src / "model.safetensors.index.json").exists() and (src / "generation_config.json").exists()
    return src


@pytest.mark.parametrize("layout", LAYOUTS)
def test_export_carries_source_files(source, layout, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    ids = tm.random_input_ids(model, batch=2, seq=16)
    moeq.quantize(model, "nvfp4", [ids], progress=False)
    out = tmp_path / "out"
    moeq.export(model, out, layout, progress=False)

    for name, text in TOKENIZER_FILES.items():
        assert (out / name).read_text() == text, name
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["max_new_tokens"] == 7 and gen["eos_token_id"] == 3
    cfg = json.loads((out / "config.json").read_text())
    src_cfg = json.loads((source / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"]
    assert cfg["quantization_config"]["quant_method"] == ("modelopt" if layout == "modelopt" else "compressed-tensors")
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "moe_intermediate_size"):
        assert cfg[key] == src_cfg[key], key
    # the export is one file: the source's shards and shard index are not carried over
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    assert (out / "hf_quant_config.json").exists() == (layout == "modelopt")
    # and transformers reads the config back
    assert transformers.AutoConfig.from_pretrained(out).model_type == "qwen3_moe"

    ids = tm.random_input_ids(model, batch=1, seq=8, seed=1)
    assert torch.equal(logits(moeq.load(out), ids), logits(model, ids))


def test_model_built_from_config_gets_architectures(zoo):
    """No source directory: nothing to carry, but config.json still names the architecture."""
    exp = zoo.exported("mixtral", "fp8", "modelopt")
    cfg = json.loads((exp.path / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"]
    assert not (exp.path / "tokenizer.json").exists()
