"""Issue 11: every user mistake the CLI can see is one line naming the problem and the fix,
exit code 2, no traceback, and checked before the model is loaded (or at least before
calibration). Nothing the user owns is ever replaced."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import moeq.cli as cli
from moeq.cli import main
from moeq.data import DEMO_CALIB, DEMO_EVAL

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model_dirs import make_model_dir  # noqa: E402

SMALL = ["--samples", "2", "--seq-len", "32", "--batch-size", "2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("m") / "model", "qwen3_moe")


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the command gets as far as loading the model's weights."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the error was found")
    monkeypatch.setattr(cli, "load_model", refuse)


def _run(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("WARNING", "\r", "Loading"))]
    return rc, lines


def _one_line_error(rc, lines, *needles):
    assert rc == 2, lines
    errs = [ln for ln in lines if "error:" in ln]
    assert len(errs) == 1 and not any("Traceback" in ln for ln in lines), lines
    for n in needles:
        assert n in errs[0], errs[0]
    return errs[0]


@pytest.mark.parametrize("argv,needle", [
    (["--seq-len", "0"], "--seq-len"), (["--seq-len", "-5"], "--seq-len"), (["--samples", "0"], "--samples"),
    (["--batch-size", "0"], "--batch-size"), (["--dtype", "bfloat"], "--dtype"), (["--seq-len", "ten"], "--seq-len"),
])
def test_bad_numbers_and_dtype(argv, needle, capsys, no_load):
    rc, lines = _run(["quantize", *argv], capsys)
    _one_line_error(rc, lines, needle)


def test_help_and_argument_errors_do_not_import_torch():
    """`moeq --help` must answer at once: the CLI module and the package import no torch."""
    code = ("import sys, moeq.cli; assert 'torch' not in sys.modules and 'transformers' not in sys.modules, "
            "sorted(m for m in sys.modules if m.startswith(('torch', 'transformers')))[:5]; "
            "moeq.cli.main(['quantize', '--help'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--calib-all-experts" in r.stdout


def test_out_is_a_file(tmp_path, model_dir, capsys, no_load):
    f = tmp_path / "file"
    f.write_text("mine")
    rc, lines = _run(["quantize", "--model", str(model_dir), "--out", str(f), "--overwrite"], capsys)
    _one_line_error(rc, lines, "file")
    assert f.read_text() == "mine"


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_out_never_touches_the_source_model(tmp_path, model_dir, capsys, no_load, where):
    src = tmp_path / "models" / "m"
    shutil.copytree(model_dir, src)
    (tmp_path / "models" / "notes.txt").write_text("keep")
    out = {"same": src, "parent": src.parent, "inside": src / "q"}[where]
    before = {p: p.read_bytes() for p in src.parent.rglob("*") if p.is_file()}
    rc, lines = _run(["quantize", "--model", str(src), "--out", str(out), "--overwrite"], capsys)
    _one_line_error(rc, lines, "source model")
    assert {p: p.read_bytes() for p in src.parent.rglob("*") if p.is_file()} == before


def test_overwrite_only_replaces_moeq_exports(tmp_path, model_dir, capsys, no_load):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    rc, lines = _run(["quantize", "--model", str(model_dir), "--out", str(out), "--overwrite"], capsys)
    _one_line_error(rc, lines, "not written by moeq")
    assert (out / "thesis.tex").read_text() == "years of work"


def _broken_copy(model_dir, tmp_path, edit):
    d = tmp_path / "broken"
    shutil.copytree(model_dir, d)
    edit(d / "model.safetensors")
    return d


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "empty"])
def test_corrupt_safetensors(tmp_path, model_dir, capsys, no_load, damage):
    def edit(f):
        data = f.read_bytes()
        f.write_bytes({"truncate": data[: len(data) - 1000], "garbage_header": b"\xff" * 64 + data[64:],
                       "empty": b""}[damage])
    d = _broken_copy(model_dir, tmp_path, edit)
    rc, lines = _run(["quantize", "--model", str(d), "--out", str(tmp_path / "o"), *SMALL], capsys)
    _one_line_error(rc, lines, "model.safetensors", "download it again")


def test_missing_checkpoint_tensors_refused(tmp_path, model_dir, capsys):
    """transformers fills missing weights with random values; moeq refuses instead."""
    def edit(f):
        sd = load_file(f)
        save_file({k: v for k, v in sd.items() if "layers.1.mlp.experts" not in k}, f, metadata={"format": "pt"})
    d = _broken_copy(model_dir, tmp_path, edit)
    rc, lines = _run(["quantize", "--model", str(d), "--out", str(tmp_path / "o"), *SMALL], capsys)
    _one_line_error(rc, lines, "missing", "layers.1.mlp.experts")
    assert not (tmp_path / "o").exists()


def test_unexpected_checkpoint_tensors_refused(tmp_path, model_dir, capsys):
    def edit(f):
        sd = load_file(f)
        sd["model.layers.0.mlp.experts.extra_proj"] = sd["model.norm.weight"].clone()
        save_file(sd, f, metadata={"format": "pt"})
    d = _broken_copy(model_dir, tmp_path, edit)
    rc, lines = _run(["quantize", "--model", str(d), "--out", str(tmp_path / "o"), *SMALL], capsys)
    _one_line_error(rc, lines, "unexpected")


def test_malformed_config(tmp_path, model_dir, capsys, no_load):
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    (d / "config.json").write_text('{"model_type": "qwen3_moe", ')
    rc, lines = _run(["quantize", "--model", str(d), "--out", str(tmp_path / "o")], capsys)
    _one_line_error(rc, lines, "config.json", "not valid JSON")


def test_int4_in_modelopt_layout_refused_before_loading(tmp_path, model_dir, capsys, no_load):
    rc, lines = _run(["quantize", "--model", str(model_dir), "--recipe", "w4a16-int4", "--out", str(tmp_path / "o")], capsys)
    _one_line_error(rc, lines, "w4a16-int4", "compressed-tensors")


def test_k_not_divisible_refused_before_loading_with_exclude_hint(tmp_path, capsys, no_load):
    d = make_model_dir(tmp_path / "odd", "qwen3_moe", moe_intermediate_size=40)
    rc, lines = _run(["quantize", "--model", str(d), "--out", str(tmp_path / "o")], capsys)
    err = _one_line_error(rc, lines, "divisible by 16", "--exclude 'model.layers.*.mlp.experts'")
    assert "Recipe.with_exclude" not in err


@pytest.mark.parametrize("content", [b"\x00\x01\x02binary\x00" * 100, "caf\xe9 latin-1 text\n".encode("latin-1") * 50],
                         ids=["binary", "latin1"])
def test_calibration_text_must_be_utf8(tmp_path, model_dir, capsys, no_load, content):
    f = tmp_path / "calib.txt"
    f.write_bytes(content)
    rc, lines = _run(["quantize", "--model", str(model_dir), "--calib", str(f), "--out", str(tmp_path / "o")], capsys)
    _one_line_error(rc, lines, str(f))


def test_exclude_matching_nothing_warns(tmp_path, model_dir, capsys, caplog):
    out = tmp_path / "o"
    rc = main(["quantize", "--model", str(model_dir), "--calib", str(DEMO_CALIB), "--out", str(out),
               "--exclude", "*.mlp.expert", "--exclude", "*.self_attn.o_proj", *SMALL])
    assert rc == 0
    warned = [r.getMessage() for r in caplog.records if "matches no module" in r.getMessage()]
    assert len(warned) == 1 and "*.mlp.expert'" in warned[0]
    assert "model.layers.0.self_attn.o_proj" in json.loads((out / "moeq_export.json").read_text())["excluded_modules"]


def test_eval_refuses_another_architecture(tmp_path, model_dir, capsys):
    other = make_model_dir(tmp_path / "mixtral", "mixtral")
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(model_dir), "--calib", str(DEMO_CALIB), "--out", str(out), *SMALL]) == 0
    capsys.readouterr()
    rc, lines = _run(["eval", "--model", str(other), "--quantized", str(out), "--data", str(DEMO_EVAL), *SMALL], capsys)
    _one_line_error(rc, lines, "different models")
    # --model left out: the demo is not the base of this export
    rc, lines = _run(["eval", "--quantized", str(out), *SMALL], capsys)
    _one_line_error(rc, lines, "not an export of the demo", "--model")
    # a plain (unquantized) directory as --quantized
    rc, lines = _run(["eval", "--model", str(model_dir), "--quantized", str(model_dir), *SMALL], capsys)
    _one_line_error(rc, lines, "not a quantized checkpoint")


def test_gpt_oss_combination_vllm_cannot_load_refused_before_loading(tmp_path, capsys, no_load):
    d = make_model_dir(tmp_path / "gptoss", "gpt_oss")
    rc, lines = _run(["quantize", "--model", str(d), "--recipe", "fp8", "--out", str(tmp_path / "o")], capsys)
    _one_line_error(rc, lines, "fp8", "modelopt")
