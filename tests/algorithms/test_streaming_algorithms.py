"""Calibration algorithms in streaming (layer-by-layer) quantization: the same export as
moeq.quantize + moeq.export (GPTQ is layer-sequential in both: each layer's Hessians come
from the outputs of the already-quantized layers before it), resumable, and a changed
algorithm between runs is refused. AWQ runs per layer before the layer's calibration and
agrees with moeq.quantize to float rounding (see test_streaming_awq_matches_in_memory)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers

import moeq
from moeq.checkpoint.load import CheckpointReader
from moeq.resume_state import ResumeMismatch
from moeq.streaming import quantize_streaming

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tiny_models as tm  # noqa: E402
from streaming.test_streaming import assert_same_checkpoint  # noqa: E402


def _src(tmp_path, model_type):
    src = tmp_path / "src"
    tm.tiny_model(model_type).save_pretrained(src)
    return src, transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)


@pytest.mark.parametrize("model_type,recipe,layout,algorithm", [
    ("qwen3_5_moe", "nvfp4", "modelopt", "mse+gptq"),
    ("mixtral", "w4a16-int4", "compressed-tensors", "gptq"),
    ("qwen3_moe", "fp8", "compressed-tensors", "mse"),
])
def test_streaming_algorithm_equals_in_memory(tmp_path, model_type, recipe, layout, algorithm):
    src, model = _src(tmp_path, model_type)
    ids = tm.random_input_ids(model, batch=3, seq=16, seed=3)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # padding reaches neither the statistics nor the Hessians, in both paths
    calib = [{"input_ids": ids, "attention_mask": mask}, tm.random_input_ids(model, batch=2, seq=16, seed=4)]
    rep_mem = moeq.quantize(model, recipe, calib, progress=False, algorithm=algorithm)
    moeq.export(model, tmp_path / "mem", layout, progress=False)
    rep, _ = quantize_streaming(src, recipe, calib, tmp_path / "stream", layout, progress=False, algorithm=algorithm)
    assert rep.algorithm == rep_mem.algorithm == algorithm
    assert rep.rtn_fallback == rep_mem.rtn_fallback
    assert_same_checkpoint(tmp_path / "mem", tmp_path / "stream")
    # and the algorithm changed something: a max export differs
    quantize_streaming(src, recipe, calib, tmp_path / "max", layout, progress=False)
    with pytest.raises(AssertionError):
        assert_same_checkpoint(tmp_path / "stream", tmp_path / "max")


def _assert_close_checkpoints(a: Path, b: Path) -> None:
    """Same tensors; floats equal to float rounding, quantized codes (and FP8 scales) equal but
    for rare rounding flips."""
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    assert set(ra.files) == set(rb.files)
    for k in ra.files:
        x, y = ra[k], rb[k]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        if x.dtype.is_floating_point and x.element_size() > 1:
            torch.testing.assert_close(x.float(), y.float(), rtol=1e-4, atol=1e-6, msg=k)
        else:
            x, y = (x.view(torch.uint8), y.view(torch.uint8)) if x.element_size() == 1 else (x, y)
            assert (x == y).float().mean() > 0.98, k


@pytest.mark.parametrize("model_type,recipe,layout,algorithm", [
    ("qwen3_moe", "nvfp4", "modelopt", "awq"),
    ("mixtral", "w4a16-int4", "compressed-tensors", "awq+gptq"),  # mixtral: the router's checkpoint key is renamed
])
def test_streaming_awq_matches_in_memory(tmp_path, model_type, recipe, layout, algorithm):
    """AWQ per layer in streaming: the same scales as in memory, folded into the norms and
    routers the streaming export writes from memory (not from the source checkpoint). Layer i's
    AWQ statistics come from the outputs of the already folded layers before it (in memory: of
    the unscaled model), the same up to float rounding, so the exports agree to rounding."""
    src, model = _src(tmp_path, model_type)
    ids = tm.random_input_ids(model, batch=3, seq=16, seed=3)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    calib = [{"input_ids": ids, "attention_mask": mask}, tm.random_input_ids(model, batch=2, seq=16, seed=4)]
    rep_mem = moeq.quantize(model, recipe, calib, progress=False, algorithm=algorithm)
    moeq.export(model, tmp_path / "mem", layout, progress=False)
    rep, _ = quantize_streaming(src, recipe, calib, tmp_path / "stream", layout, progress=False, algorithm=algorithm)
    alphas = {k: v["alpha"] for k, v in rep.awq.items()}
    assert alphas == {k: v["alpha"] for k, v in rep_mem.awq.items()} and rep.awq_skipped == rep_mem.awq_skipped
    _assert_close_checkpoints(tmp_path / "mem", tmp_path / "stream")
    stream, source = CheckpointReader(tmp_path / "stream"), CheckpointReader(src)
    folded = [k for k, a in alphas.items() if a is not None and k.endswith("post_attention_layernorm")]
    routers = [r for k in folded for r in source.files  # each folded norm's router (scaled with it)
               if r.startswith(k.rpartition(".")[0] + ".") and r.endswith(("mlp.gate.weight", "moe.gate.weight"))]
    assert folded and len(routers) == len(folded)
    for k in [f"{k}.weight" for k in folded] + routers:  # the folds reached the export
        assert not torch.allclose(stream[k].float(), source[k].float(), rtol=1e-3), k


@pytest.mark.parametrize("model_type,algorithm", [("qwen3_5_moe", "gptq"), ("qwen3_moe", "awq")])
def test_streaming_algorithm_resumes(tmp_path, model_type, algorithm):
    """Interrupted after layer 1, the resumed run equals an uninterrupted one. GPTQ continues
    from the saved unquantized AND quantized hidden states; AWQ from layer 0's folds already
    exported and the saved stream of the folded layer. Another algorithm never continues it."""
    src, model = _src(tmp_path, model_type)
    calib = [tm.random_input_ids(model, batch=2, seq=16, seed=s) for s in range(2)]
    quantize_streaming(src, "nvfp4", calib, tmp_path / "full", progress=False, algorithm=algorithm)
    with pytest.raises(KeyboardInterrupt):
        quantize_streaming(src, "nvfp4", calib, tmp_path / "resumed", progress=False, algorithm=algorithm,
                           stop_after_layers=1)
    partial = tmp_path / ".resumed.moeq-partial"
    assert json.loads((partial / "progress.json").read_text())["done"] == 1
    with pytest.raises(ResumeMismatch, match="algorithm"):
        quantize_streaming(src, "nvfp4", calib, tmp_path / "resumed", progress=False, algorithm="max")
    quantize_streaming(src, "nvfp4", calib, tmp_path / "resumed", progress=False, algorithm=algorithm)
    assert_same_checkpoint(tmp_path / "full", tmp_path / "resumed")


def test_streaming_awq_crash_inside_a_layer_resumes_clean(tmp_path, monkeypatch):
    """A failure in the middle of layer 1's AWQ (its folds applied in memory, nothing of the layer
    written): no output directory appears, and the re-run resumes at layer 1 from the checkpoint's
    unfolded weights and equals an uninterrupted run."""
    from moeq.algorithms import awq

    src, model = _src(tmp_path, "qwen3_moe")
    calib = [tm.random_input_ids(model, batch=2, seq=16, seed=s) for s in range(2)]
    quantize_streaming(src, "nvfp4", calib, tmp_path / "full", progress=False, algorithm="awq")
    fold, calls = awq.fold_layers, []

    def fold_then_fail(c, check, report):
        edited = fold(c, check, report)
        calls.append(len(edited))
        if len(calls) == 2:
            raise RuntimeError("injected failure after layer 1's folds")
        return edited

    monkeypatch.setattr(awq, "fold_layers", fold_then_fail)
    with pytest.raises(RuntimeError, match="injected"):
        quantize_streaming(src, "nvfp4", calib, tmp_path / "resumed", progress=False, algorithm="awq")
    assert calls[1] > 0  # layer 1 had folded something before failing
    assert not (tmp_path / "resumed").exists()
    progress = json.loads((tmp_path / ".resumed.moeq-partial" / "progress.json").read_text())
    assert progress["done"] == 1  # layer 0 committed: the re-run resumes at layer 1
    monkeypatch.setattr(awq, "fold_layers", fold)
    quantize_streaming(src, "nvfp4", calib, tmp_path / "resumed", progress=False, algorithm="awq")
    assert_same_checkpoint(tmp_path / "full", tmp_path / "resumed")
