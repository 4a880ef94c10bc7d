"""`quantize_streaming` killed (SIGKILL) or failing at each step of each layer (calibration,
shard writes, the activations and manifest of the resume state, the final assembly and
rename): the output path never holds a partial export, and re-running the same command
resumes from the last committed layer (or starts over) and writes exactly the bytes of an
uninterrupted run."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
import torch

from moeq.quantization import Session

from .inject import KILLED, RAISED, assert_same_files, at, dst_is, run_in_child

writer = importlib.import_module("moeq.checkpoint.writer")
streaming = importlib.import_module("moeq.streaming")
rs = importlib.import_module("moeq.resume_state")


def _after_first_commit(tensors, filename, *a, **k):
    return (Path(filename).parent / "progress.json").exists()


# phase -> (patch factory (out, action), layers the re-run finds done: 0 = starts over).
# The tiny model has 2 decoder layers.
PHASES = {
    "calibration of layer 1": (lambda out, a: at(Session, "reduce_stats", 2, a), 1),
    "first shard of layer 0": (lambda out, a: at(writer, "save_file", 1, a), 0),
    "first shard of layer 1": (lambda out, a: at(writer, "save_file", 1, a, when=_after_first_commit), 1),
    "shard of layer 0 written, not renamed": (lambda out, a: at(writer, "replace_durably", 2, a), 0),
    "activations of layer 0 being saved": (lambda out, a: at(torch, "save", 1, a), 0),
    "activations of layer 1 saved, manifest not yet": (lambda out, a: at(torch, "save", 2, a, after=True), 1),
    "manifest of layer 0 being written": (lambda out, a: at(rs, "write_atomic", 1, a), 0),
    "manifest of layer 0 written": (lambda out, a: at(rs, "write_atomic", 1, a, after=True), 1),
    "last layer committed": (lambda out, a: at(rs, "write_atomic", 2, a, after=True), 2),
    "shards getting their final names": (lambda out, a: at(os, "link", 3, a), 2),
    "after the sidecar": (lambda out, a: at(streaming, "write_sidecar", 1, a, after=True), 2),
    "resume state dropped": (lambda out, a: at(rs.PartialRun, "finish", 1, a, after=True), 0),
    "before the final rename": (lambda out, a: at(os, "replace", 1, a, when=dst_is(out)), 0),
}


@pytest.mark.parametrize("action", ["kill", "raise"])
@pytest.mark.parametrize("phase", list(PHASES))
def test_interrupted_streaming_resumes_to_identical_bytes(setup, tmp_path, phase, action, caplog):
    out = tmp_path / "out"
    patch, done = PHASES[phase]
    status = run_in_child(lambda: setup.stream(out), patch(out, action))
    assert status == (KILLED if action == "kill" else RAISED)
    assert not out.exists()
    with caplog.at_level("WARNING", logger="moeq"):
        setup.stream(out)
    assert_same_files(out, setup.ref_stream)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    resumed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming")]
    assert resumed == ([f"resuming {tmp_path / '.out.moeq-partial'} after layer {done} of 2"] if done else [])
    assert "damaged" not in caplog.text  # a kill at any point leaves a consistent state


def test_killed_after_the_final_rename_is_complete(setup, tmp_path):
    out = tmp_path / "out"
    assert run_in_child(lambda: setup.stream(out), at(os, "replace", 1, "kill", after=True, when=dst_is(out))) == KILLED
    assert_same_files(out, setup.ref_stream)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
