"""An independent client reads the MX compressed-tensors exports: transformers' `from_pretrained` with
the compressed-tensors package dequantizes them on load. (gpt-oss's own MXFP4 format is read by
transformers' Mxfp4 integration: tests/export/test_export_mx.py.)

bfloat16 models: compressed-tensors dequantizes MX scales through bfloat16 (`decompress_mx_scale`), so an
fp32 model gets bf16 weights and its forward fails on the dtype mismatch; in bf16 every dequantized
weight is exact (E2M1 value x 2**k), so the weights must equal moeq.load's bit for bit."""

from __future__ import annotations

import pytest
import torch
import transformers

import moeq

from .helpers import logits, rel_err, tm

pytest.importorskip("compressed_tensors")

MXFP8_MOE = ("transformers bug: CompressedTensorsDequantize (integrations/compressed_tensors.py) treats every 8-bit "
             "float expert scheme as FP8 with a per-channel/tensor scale and multiplies the weight by the raw uint8 "
             "E8M0 group scale [N, K/32]: shape mismatch, the experts are reported missing")


def _export(model_type, preset, tmp_path):
    m = tm.tiny_model(model_type, dtype=torch.bfloat16)
    moeq.quantize(m, preset, progress=False)
    out = tmp_path / preset
    moeq.export(m, out, "compressed-tensors", progress=False)
    return m, out


def test_transformers_loads_w4a16_mxfp4_moe(tmp_path):
    model, out = _export("qwen3_moe", "w4a16-mxfp4", tmp_path)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, output_loading_info=True)
    assert not any(info.values()), info
    ids = tm.random_input_ids(model, batch=1, seq=8, seed=1)
    got = logits(hf.eval(), ids)  # (dense layers are decompressed at their first forward)
    ours = moeq.load(out, dtype=torch.bfloat16)
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj",
                 "model.layers.0.self_attn.q_proj.weight"):
        mod, _, attr = name.rpartition(".")
        assert torch.equal(getattr(hf.get_submodule(mod), attr), getattr(ours.get_submodule(mod), attr)), name
    # same weights; the two forwards differ only by bf16 kernel rounding
    assert rel_err(got, logits(model, ids)) <= 2e-2


@pytest.mark.xfail(strict=True, raises=RuntimeError, reason=MXFP8_MOE)
def test_transformers_loads_mxfp8_moe(tmp_path):
    _, out = _export("qwen3_moe", "mxfp8", tmp_path)
    transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
