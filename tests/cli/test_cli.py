"""The `moeq` command line on a tiny Qwen3.5-MoE checkpoint directory: quantize -> inspect
-> eval, and every user error path with its message and exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeq.cli import main
from moeq.data import DEMO_CALIB, DEMO_EVAL

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model_dirs import make_model_dir  # noqa: E402

SMALL = ["--samples", "4", "--seq-len", "32", "--batch-size", "4"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("user_model"))


@pytest.fixture(scope="module")
def quantized(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "out"
    rc = main(["quantize", "--model", str(model_dir), "--calib", str(DEMO_CALIB), "--out", str(out),
               "--recipe", "nvfp4", "--eval", "--eval-data", str(DEMO_EVAL), "--eval-samples", "4", *SMALL])
    assert rc == 0
    return out


def test_quantize_writes_checkpoint_coverage_and_summary(quantized, model_dir, capsys):
    files = {p.name for p in quantized.iterdir()}
    assert {"config.json", "hf_quant_config.json", "model.safetensors", "expert_coverage.png",
            "expert_coverage.json", "tokenizer.json"} <= files
    cov = json.loads((quantized / "expert_coverage.json").read_text())
    counts = cov["tokens_per_expert"]
    assert len(counts) == 2 and all(len(v) == 8 for v in counts.values())
    # 4 samples x 32 tokens, top-2 routing: each layer routes 2 x 128 token slots
    assert all(sum(v) == 2 * 4 * 32 for v in counts.values())
    assert json.loads((quantized / "config.json").read_text())["quantization_config"]["quant_algo"] == "NVFP4"


def test_inspect_ok_then_detects_a_broken_scale(quantized, tmp_path, capsys):
    assert main(["inspect", str(quantized)]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["inspect", str(quantized), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["layout"] == "modelopt" and res["recipe"] == "nvfp4" and not res["problems"]
    # break one expert's up_proj global scale: the gate/up pair check and the positivity check fire
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(quantized, broken)
    sd = load_file(broken / "model.safetensors")
    key = next(k for k in sd if k.endswith("experts.3.up_proj.weight_scale_2"))
    sd[key] = torch.tensor(0.0)
    save_file(sd, broken / "model.safetensors", metadata={"format": "pt"})
    assert main(["inspect", str(broken)]) == 1
    out = capsys.readouterr().out
    assert "different global scales" in out and "non-positive" in out


def test_eval_reports_ppl_kl_agreement(quantized, model_dir, capsys):
    rc = main(["eval", "--model", str(model_dir), "--quantized", str(quantized), "--data", str(DEMO_EVAL), "--json", *SMALL])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tokens"] == 4 * 31
    assert res["kl"] > 0 and 0 < res["top1_agreement"] <= 1
    assert res["ppl_base"] > 1 and res["ppl_quant"] > 1 and res["ppl_base"] != res["ppl_quant"]


def _err(argv, capsys):
    rc = main(argv)
    return rc, capsys.readouterr().err


def test_error_missing_path(capsys, tmp_path):
    rc, err = _err(["quantize", "--model", str(tmp_path / "nope")], capsys)
    assert rc == 2 and "does not exist" in err


def test_error_dir_without_config_or_weights(capsys, tmp_path, model_dir):
    rc, err = _err(["quantize", "--model", str(tmp_path)], capsys)
    assert rc == 2 and "no config.json" in err
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    rc, err = _err(["quantize", "--model", str(tmp_path)], capsys)
    assert rc == 2 and "no *.safetensors" in err


def test_error_unsupported_architecture(capsys, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=32, patch_size=16)).save_pretrained(tmp_path / "m")
    rc, err = _err(["quantize", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "not supported" in err and "clip_vision_model" in err


def test_error_empty_calibration_text(capsys, tmp_path, model_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    rc, err = _err(["quantize", "--model", str(model_dir), "--calib", str(empty), "--out", str(tmp_path / "o"), *SMALL], capsys)
    assert rc == 2 and "empty" in err


def test_error_seq_len_beyond_limit(capsys, tmp_path, model_dir):
    rc, err = _err(["quantize", "--model", str(model_dir), "--seq-len", "100000", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "beyond the model's limit of 512" in err


def test_error_output_dir_exists(capsys, tmp_path, model_dir):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("keep me")
    rc, err = _err(["quantize", "--model", str(model_dir), "--out", str(tmp_path / "o"), *SMALL], capsys)
    assert rc == 2 and "exists" in err and "--overwrite" in err
    assert (tmp_path / "o" / "x").read_text() == "keep me"


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "moeq.cli", "quantize", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--calib-all-experts" in r.stdout and "w4a16-int4" in r.stdout
