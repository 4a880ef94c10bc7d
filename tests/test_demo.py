"""The committed demo model: its held-out perplexity is what metrics.json and the README
claim, the whole CLI job runs on it, and streaming equals in-memory on it."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import transformers

import moeq
from moeq import data as D
from moeq.cli import main
from moeq.evaluate import perplexity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from streaming.test_streaming import assert_same_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(D.DEMO_MODEL)


def test_demo_model_is_a_small_qwen35_moe():
    cfg = transformers.AutoConfig.from_pretrained(D.DEMO_MODEL)
    assert cfg.architectures == ["Qwen3_5MoeForCausalLM"]
    assert cfg.num_experts >= 16 and cfg.num_experts_per_tok >= 2
    assert {"linear_attention", "full_attention"} <= set(cfg.layer_types)
    assert sum(f.stat().st_size for f in D.DEMO_MODEL.iterdir()) <= 25 * 2**20
    assert moeq.DEMO_MODEL == D.DEMO_MODEL


def test_demo_perplexity_matches_the_claims(tokenizer):
    metrics = json.loads((D.DEMO_DIR / "metrics.json").read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(D.DEMO_MODEL, dtype=torch.float32).eval()
    windows = D.token_windows(tokenizer, D.read_text(D.DEMO_EVAL), metrics["window"])
    ppl = perplexity(model, D.batches(windows, 16))
    assert ppl == pytest.approx(metrics["eval_ppl"], rel=0.01)
    assert ppl < metrics["unigram_ppl"] / 5  # a real language model of Python code
    readme = (ROOT / "README.md").read_text()
    claimed = re.search(r"held-out perplexity ([0-9.]+)", readme)
    assert claimed, "README must state the demo model's held-out perplexity"
    assert float(claimed.group(1)) == pytest.approx(ppl, rel=0.01)


def test_cli_job_on_demo(tmp_path, capsys):
    out = tmp_path / "q"
    small = ["--samples", "4", "--seq-len", "64", "--batch-size", "4"]
    assert main(["quantize", "--out", str(out), "--layout", "compressed-tensors", "--recipe", "w4a16-nvfp4", *small]) == 0
    summary = capsys.readouterr().out
    assert "tokens calibrated    256" in summary and "MiB ->" in summary
    assert main(["inspect", str(out)]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["eval", "--quantized", str(out), "--json", *small]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["ppl_quant"] > res["ppl_base"] * 0.9 and res["kl"] > 0


@pytest.mark.parametrize("layout", ["modelopt", "compressed-tensors"])
def test_streaming_equals_in_memory_on_demo(tmp_path, tokenizer, layout):
    from moeq.streaming import quantize_streaming

    calib = D.batches(D.token_windows(tokenizer, D.read_text(D.DEMO_CALIB), 64, 4), 2)
    model = transformers.AutoModelForCausalLM.from_pretrained(D.DEMO_MODEL).eval()
    moeq.quantize(model, "nvfp4", calib, progress=False)
    moeq.export(model, tmp_path / "mem", layout, progress=False)
    quantize_streaming(D.DEMO_MODEL, "nvfp4", calib, tmp_path / "stream", layout, progress=False)
    assert_same_checkpoint(tmp_path / "mem", tmp_path / "stream")
