"""One test per bug observed in issue #11 (on-disk state and output directories). Each
fails on the code before the fix (checked against 516ccee) and uses only what both
versions have: the public functions and module attributes that existed then.

| bug observed before the fix                                        | test                                    |
|--------------------------------------------------------------------|-----------------------------------------|
| killed after the activations, before progress.json: wrong scales   | ..._between_activations_and_progress    |
| truncated progress / activations: stuck, --overwrite included      | ..._truncated_state_overwrite_recovers  |
| partial run's shard truncated: published as a complete checkpoint  | ..._truncated_shard_is_recomputed       |
| extra --exclude resumed silently; --dtype crashed; same-sum tokens | ..._other_options_refused_by_name       |
| --out M --overwrite replaced the model; --out parent deleted it    | ..._overwrite_never_touches_the_model   |
| --out an existing file: NotADirectoryError traceback (streaming)   | ..._existing_file_as_output             |
| in-memory exports 0700 / 0600                                      | ..._permissions_follow_the_umask        |
| a killed export's temp dir stayed forever                          | ..._killed_export_temp_dir_is_removed   |
| a link out of the model folder was copied into the export          | ..._link_out_of_the_model_folder        |
| remote code and auto_map carried without trust_remote_code         | ..._remote_code_needs_trust             |
| full disk: a raw errno traceback                                   | ..._full_disk_is_one_clear_line         |
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import stat

import pytest
import torch

import moeq

from .conftest import runs
from .inject import KILLED, assert_same_files, at, run_in_child, snapshot
from .test_resume_state import damage, interrupted, refused_then_overwrite, state_file

writer = importlib.import_module("moeq.checkpoint.writer")


def test_killed_between_activations_and_progress(setup, tmp_path):
    out = tmp_path / "out"
    assert run_in_child(lambda: setup.stream(out), at(torch, "save", 2, "kill", after=True)) == KILLED
    setup.stream(out)
    assert_same_files(out, setup.ref_stream)


@pytest.mark.parametrize("which", ["progress.json", "activations"])
def test_truncated_state_overwrite_recovers(setup, tmp_path, which):
    out = tmp_path / "out"
    partial = interrupted(setup, out)
    damage(state_file(partial, which), "truncated")
    setup.stream(out, overwrite=True)
    assert_same_files(out, setup.ref_stream)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_truncated_shard_is_recomputed(setup, tmp_path):
    out = tmp_path / "out"
    damage(state_file(interrupted(setup, out), "first shard"), "truncated")
    setup.stream(out)
    assert_same_files(out, setup.ref_stream)


@pytest.mark.parametrize("option", ["exclude", "dtype", "calibration tokens"])
def test_other_options_refused_by_name(setup, tmp_path, option):
    kw = {"exclude": dict(recipe=moeq.get_recipe("nvfp4").with_exclude(add=["model.layers.0.mlp.experts"])),
          "dtype": dict(dtype=torch.bfloat16),
          # same shapes and the same token sum (all the old fingerprint compared), other tokens
          "calibration tokens": dict(calib=[b.flip(-1) for b in setup.calib])}[option]
    refused_then_overwrite(setup, tmp_path, option, kw)


@pytest.mark.parametrize("run", ["export", "streaming"])
@pytest.mark.parametrize("where,what", [("model", "is"), ("parent", "contains")])
def test_overwrite_never_touches_the_model(setup, own, run, where, what):
    src = own[0]
    before = snapshot(src.parent)
    with pytest.raises(ValueError, match=f"{what} the source model"):
        runs(setup, own)[run](src if where == "model" else src.parent, overwrite=True)
    assert snapshot(src.parent) == before


@pytest.mark.parametrize("run", ["export", "streaming"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_existing_file_as_output(setup, own, tmp_path, run, overwrite):
    out = tmp_path / "out"
    out.write_text("a file of the user's")
    with pytest.raises(FileExistsError, match="existing file"):
        runs(setup, own)[run](out, overwrite=overwrite)
    with pytest.raises(FileExistsError, match="is a file"):
        runs(setup, own)[run](out / "sub", overwrite=overwrite)
    assert out.read_text() == "a file of the user's" and [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_permissions_follow_the_umask(setup, tmp_path, mask):
    old = os.umask(mask)
    try:
        setup.export(tmp_path / "mem")
        setup.stream(tmp_path / "stream")
    finally:
        os.umask(old)
    for d in (tmp_path / "mem", tmp_path / "stream"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~mask, d
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in d.iterdir()}
        assert modes == {n: 0o666 & ~mask for n in modes}, d


def test_killed_export_temp_dir_is_removed(setup, tmp_path):
    out = tmp_path / "out"
    assert run_in_child(lambda: setup.export(out), at(writer, "save_file", 2, "kill")) == KILLED
    assert not out.exists() and len(list(tmp_path.iterdir())) == 1  # the killed run's temp dir
    setup.export(out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_link_out_of_the_model_folder(setup, odd_source, tmp_path):
    setup.stream(tmp_path / "out", src=odd_source)
    assert not (tmp_path / "out" / "special_tokens_map.json").exists()
    assert (tmp_path / "out" / "vocab.txt").read_text() == "a b c\n"  # a link inside the folder is fine


def test_remote_code_needs_trust(setup, odd_source, tmp_path):
    setup.stream(tmp_path / "out", src=odd_source)
    assert not list((tmp_path / "out").glob("*.py"))
    assert "auto_map" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_full_disk_is_one_clear_line(setup, tmp_path, monkeypatch):
    real, calls = writer.save_file, [0]

    def save_file(*a, **k):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(writer, "save_file", save_file)
    out = tmp_path / "out"
    with pytest.raises(OSError) as e:
        setup.export(out)
    msg = str(e.value)
    assert "\n" not in msg and str(out) in msg and "free space" in msg, msg
    assert list(tmp_path.iterdir()) == []
