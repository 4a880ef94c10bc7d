"""Streaming (layer-by-layer) quantization: same export as the in-memory path, resumable
after an interruption, and multi-process calibration equal to a single process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import moeq
from moeq.checkpoint.load import CheckpointReader
from moeq.streaming import quantize_streaming

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tiny_models as tm  # noqa: E402
from model_dirs import make_model_dir  # noqa: E402


def assert_same_checkpoint(a: Path, b: Path):
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    assert set(ra.files) == set(rb.files)
    for k in ra.files:
        x, y = ra[k], rb[k]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        if x.dtype == torch.float8_e4m3fn:
            x, y = x.view(torch.uint8), y.view(torch.uint8)
        assert torch.equal(x, y), k


def _calib(model, n=2):
    return [tm.random_input_ids(model, batch=2, seq=16, seed=s) for s in range(n)]


@pytest.mark.parametrize("model_type,recipe,layout", [
    ("qwen3_5_moe", "nvfp4", "modelopt"),
    ("qwen3_5_moe", "nvfp4", "compressed-tensors"),
    ("gpt_oss", "w4a16-int4", "compressed-tensors"),  # experts with biases: the one combination vLLM loads
    ("mixtral", "w4a16-int4", "compressed-tensors"),
    ("qwen3_moe", "fp8-dynamic", "compressed-tensors"),
    # gpt-oss's own MXFP4 format: fused <param>_blocks / _scales, attention left in the model dtype
    ("gpt_oss", moeq.get_recipe("w4a16-mxfp4").with_exclude(add=["*q_proj", "*k_proj", "*v_proj", "*o_proj"]),
     "mxfp4-native"),
])
def test_streaming_equals_in_memory(tmp_path, model_type, recipe, layout):
    src = tmp_path / "src"
    tm.tiny_model(model_type).save_pretrained(src)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    calib = _calib(model)
    moeq.quantize(model, recipe, calib, progress=False)
    moeq.export(model, tmp_path / "mem", layout, progress=False)
    report, exp = quantize_streaming(src, recipe, calib, tmp_path / "stream", layout, progress=False)
    assert_same_checkpoint(tmp_path / "mem", tmp_path / "stream")
    assert report.tokens_per_expert == model.moeq_session.report.tokens_per_expert
    # the streamed export loads back and runs
    logits = moeq.load(tmp_path / "stream")(calib[0]).logits
    assert torch.equal(logits, model(calib[0]).logits)


def test_resume_after_interruption(tmp_path):
    src = tmp_path / "src"
    tm.tiny_model("qwen3_5_moe").save_pretrained(src)
    calib = _calib(transformers.AutoModelForCausalLM.from_pretrained(src))
    quantize_streaming(src, "nvfp4", calib, tmp_path / "full", progress=False)
    with pytest.raises(KeyboardInterrupt):
        quantize_streaming(src, "nvfp4", calib, tmp_path / "resumed", progress=False, stop_after_layers=1)
    partial = tmp_path / ".resumed.moeq-partial"
    assert not (tmp_path / "resumed").exists() and (partial / "progress.json").exists()
    import json

    assert json.loads((partial / "progress.json").read_text())["done"] == 1
    quantize_streaming(src, "nvfp4", calib, tmp_path / "resumed", progress=False)
    assert not partial.exists()
    assert_same_checkpoint(tmp_path / "full", tmp_path / "resumed")


def _cli(args, nproc=1, env=None):
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 \
        else [sys.executable]
    cmd = base + ["-m", "moeq.cli", "quantize", *args] if nproc == 1 else base + ["--module", "moeq.cli", "quantize", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.parametrize("streaming", [False, True])
def test_two_process_gloo_equals_single_process(tmp_path, streaming):
    src = make_model_dir(tmp_path / "src")
    args = ["--model", str(src), "--samples", "8", "--seq-len", "32", "--batch-size", "2", "--device", "cpu"]
    args += ["--streaming"] if streaming else []
    _cli(args + ["--out", str(tmp_path / "one")])
    # two ranks each calibrate on half of the windows (rank r takes windows r::2); stats are reduced with gloo
    _cli(args + ["--out", str(tmp_path / "two")], nproc=2)
    assert_same_checkpoint(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen3_5_moe"])
def test_streaming_padded_batches_equal_in_memory(tmp_path, model_type):
    """Issue 11: padding marked by attention_mask is honoured by streaming as by moeq.quantize
    (it used to be refused); the exports are identical and differ from an unmasked run."""
    src = tmp_path / "src"
    tm.tiny_model(model_type).save_pretrained(src)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    ids = tm.random_input_ids(model, batch=3, seq=16, seed=3)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    calib = [{"input_ids": ids, "attention_mask": mask}, tm.random_input_ids(model, batch=2, seq=16, seed=4)]
    rep_mem = moeq.quantize(model, "nvfp4", calib, progress=False)
    moeq.export(model, tmp_path / "mem", progress=False)
    report, _ = quantize_streaming(src, "nvfp4", calib, tmp_path / "stream", progress=False)
    assert report.calib_tokens == rep_mem.calib_tokens == int(mask.sum()) + 32
    assert report.tokens_per_expert == rep_mem.tokens_per_expert
    assert_same_checkpoint(tmp_path / "mem", tmp_path / "stream")
    quantize_streaming(src, "nvfp4", [ids, calib[1]], tmp_path / "unmasked", progress=False)
    with pytest.raises(AssertionError):
        assert_same_checkpoint(tmp_path / "stream", tmp_path / "unmasked")


def test_streaming_refuses_unloadable_experts_before_reading_data(tmp_path):
    from moeq.checkpoint.layouts import UnsupportedExport
    from moeq.streaming import quantize_streaming

    src = tmp_path / "src"
    tm.tiny_model("gpt_oss").save_pretrained(src)

    def never():
        raise AssertionError("calibration data was read before the refusal")
        yield  # pragma: no cover

    with pytest.raises(UnsupportedExport, match="fp8 in the modelopt layout"):
        quantize_streaming(src, "fp8", never(), tmp_path / "out", "modelopt", progress=False)
    assert not (tmp_path / "out").exists()
