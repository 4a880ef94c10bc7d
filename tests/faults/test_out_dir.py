"""Where an export may land: never onto, around or inside the source model, never over a
file or a directory moeq did not write; normal permissions; leftovers of killed runs
cleaned; carried files only from inside the model folder, remote code only on request."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest
import transformers

from moeq.checkpoint.outdir import check_out_dir

from .conftest import runs
from .inject import snapshot


@pytest.mark.parametrize("run", ["export", "streaming"])
@pytest.mark.parametrize("where,what", [("inside", "lies inside"), ("link to model", "is")])
def test_the_source_model_is_never_the_output(setup, own, tmp_path, run, where, what):
    """(The model itself and its parent folder: test_regressions.)"""
    src = own[0]
    out = {"model": src, "parent": src.parent, "inside": src / "quantized", "link to model": tmp_path / "link"}[where]
    if where == "link to model":
        out.symlink_to(src, target_is_directory=True)
    before = snapshot(src.parent)
    with pytest.raises(ValueError, match=f"{what} the source model") as e:
        runs(setup, own)[run](out, overwrite=True)
    assert "\n" not in str(e.value)
    assert snapshot(src.parent) == before


@pytest.mark.parametrize("run", ["export", "streaming"])
def test_overwrite_replaces_only_what_moeq_wrote(setup, own, tmp_path, run):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="not written by moeq"):
        runs(setup, own)[run](out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    (out / "thesis.tex").unlink()
    runs(setup, own)[run](out)  # an empty directory is fine
    runs(setup, own)[run](out, overwrite=True)  # and so is replacing moeq's own export
    assert (out / "moeq_export.json").exists()


def test_temp_dirs_of_dead_runs_are_removed(setup, tmp_path):
    p = subprocess.Popen(["true"])
    p.wait()  # a pid that is no longer running
    host = socket.gethostname()
    dead = [tmp_path / f".out.moeq-tmp-{host}-{p.pid}-0000abcd", tmp_path / f".out.moeq-old-{host}-{p.pid}-0000abcd"]
    alive = [tmp_path / f".out.moeq-tmp-{host}-{os.getpid()}-0000abcd",  # a run going on right now
             tmp_path / f".out.moeq-tmp-otherhost-{p.pid}-0000abcd",  # pids of other hosts mean nothing here
             tmp_path / f".other.moeq-tmp-{host}-{p.pid}-0000abcd"]  # another output's
    for d in dead + alive:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half a shard")
    setup.export(tmp_path / "out")
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(["out"] + [d.name for d in alive])


def test_carried_files_stay_inside_the_model_folder_and_remote_code_needs_trust(setup, odd_source, tmp_path, caplog):
    out, trusted = tmp_path / "out", tmp_path / "trusted"
    with caplog.at_level("WARNING", logger="moeq"):
        setup.stream(out, src=odd_source)
    assert not (out / "special_tokens_map.json").exists()
    assert "special_tokens_map.json" in caplog.text and "outside the model folder" in caplog.text
    assert (out / "vocab.txt").read_text() == "a b c\n" and not (out / "vocab.txt").is_symlink()
    assert (out / "tokenizer.json").read_bytes() == (setup.src / "tokenizer.json").read_bytes()
    assert not list(out.glob("*.py")) and "modeling_odd.py" in caplog.text
    assert "auto_map" not in json.loads((out / "config.json").read_text()) and "dropping auto_map" in caplog.text
    # a loader that trusts remote code gets transformers' own class, the one moeq calibrated
    assert type(transformers.AutoConfig.from_pretrained(out, trust_remote_code=True)).__module__.startswith("transformers.")

    setup.stream(trusted, src=odd_source, trust_remote_code=True)
    assert sorted(p.name for p in trusted.glob("*.py")) == ["configuration_odd.py", "modeling_odd.py"]
    assert json.loads((trusted / "config.json").read_text())["auto_map"]["AutoConfig"] == "configuration_odd.OddConfig"
    assert not (trusted / "special_tokens_map.json").exists()


def test_check_out_dir_before_loading_the_model(own, tmp_path):
    """What the CLI calls before any work: the resolved path, or the refusal."""
    src = own[0]
    assert check_out_dir(tmp_path / "new", src) == (tmp_path / "new").resolve()
    with pytest.raises(ValueError, match="is the source model"):
        check_out_dir(src, src, overwrite=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        check_out_dir(tmp_path / "full", src)
