"""`moeq.export` killed (SIGKILL: nothing runs after) or failing at each phase boundary:
the output path is untouched, and the next run writes exactly what an uninterrupted run
writes and leaves nothing else behind (the killed run's temp dir included)."""

from __future__ import annotations

import importlib
import os

import pytest

from .inject import KILLED, RAISED, assert_same_files, at, dst_is, run_in_child, snapshot

writer = importlib.import_module("moeq.checkpoint.writer")
export_mod = importlib.import_module("moeq.checkpoint.export")
outdir = importlib.import_module("moeq.checkpoint.outdir")

# phase -> patch factory (out, action)
PHASES = {
    "before the first shard": lambda out, a: at(writer, "save_file", 1, a),
    "between shards": lambda out, a: at(writer, "save_file", 3, a),
    "shard written, not renamed": lambda out, a: at(writer, "replace_durably", 2, a),
    "shards named, before the index": lambda out, a: at(writer, "write_atomic", 1, a),
    "before config.json": lambda out, a: at(export_mod, "_write_config", 1, a),
    "after the sidecar": lambda out, a: at(export_mod, "write_sidecar", 1, a, after=True),
    "before the final rename": lambda out, a: at(os, "replace", 1, a, when=dst_is(out)),
}


@pytest.mark.parametrize("action", ["kill", "raise"])
@pytest.mark.parametrize("phase", list(PHASES))
def test_interrupted_export_leaves_nothing_and_reruns_identically(setup, tmp_path, phase, action):
    out = tmp_path / "out"
    status = run_in_child(lambda: setup.export(out), PHASES[phase](out, action))
    assert status == (KILLED if action == "kill" else RAISED)
    assert not out.exists()
    if action == "raise":
        assert list(tmp_path.iterdir()) == []  # an exception cleans up at once
    setup.export(out)
    assert_same_files(out, setup.ref_mem)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # a killed run's temp dir is removed by the next run


OVERWRITE_PHASES = {
    "between shards": lambda out: at(writer, "save_file", 3, "kill"),
    "before the swap": lambda out: at(outdir, "_exchange", 1, "kill"),
    "after the swap": lambda out: at(outdir, "_exchange", 1, "kill", after=True),
}


@pytest.mark.parametrize("phase", list(OVERWRITE_PHASES))
def test_interrupted_overwrite_keeps_the_old_export_or_the_new_one(setup, tmp_path, phase):
    out = tmp_path / "out"
    setup.export(out, layout="compressed-tensors")
    old = snapshot(out)
    assert run_in_child(lambda: setup.export(out, overwrite=True), OVERWRITE_PHASES[phase](out)) == KILLED
    # never a mix of old and new files, never nothing: the directories are swapped atomically
    assert snapshot(out) == (snapshot(setup.ref_mem) if phase == "after the swap" else old)
    setup.export(out, overwrite=True)
    assert_same_files(out, setup.ref_mem)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_overwrite_without_atomic_swap(setup, tmp_path, monkeypatch):
    """Where directories cannot be swapped: old set aside, new renamed in; a kill between the
    two leaves no `out` (and the set-aside old export is removed by the next run)."""
    out = tmp_path / "out"
    setup.export(out, layout="compressed-tensors")
    monkeypatch.setattr(outdir, "_exchange", lambda a, b: False)
    kill = at(os, "replace", 1, "kill", when=dst_is(out))
    assert run_in_child(lambda: setup.export(out, overwrite=True), kill) == KILLED
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if ".moeq-old-" in p.name]
    setup.export(out, overwrite=True)
    assert_same_files(out, setup.ref_mem)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
