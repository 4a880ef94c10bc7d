"""Sharding and atomicity of the checkpoint writer, and the errors of `moeq.export`."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from safetensors import safe_open

import moeq

from .helpers import logits, read_checkpoint, tm

writer = importlib.import_module("moeq.checkpoint.writer")

MODEL, PRESET = "qwen3_moe", "nvfp4"


def _keys(path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def _export(zoo, out, layout="modelopt", **kw):
    model, _ = zoo.quantized(MODEL, PRESET)
    return moeq.export(model, out, layout, progress=False, **kw)


@pytest.mark.parametrize("layout", ["modelopt", "compressed-tensors"])
def test_sharded_export(zoo, tmp_path, layout):
    out = tmp_path / "sharded"
    report = _export(zoo, out, layout, max_shard_bytes=256 * 1024)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n >= 3
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()

    index = json.loads((out / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    on_disk = {}
    for name in shards:
        for key in _keys(out / name):
            on_disk[key] = name
    assert weight_map == on_disk  # every key, each in the file that holds it
    sd = read_checkpoint(out)
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    assert index["metadata"]["total_size"] == nbytes == report.bytes_written
    assert report.tensors == len(sd)

    # same tensors as the single-file export, and the sharded one still round-trips
    single = read_checkpoint(zoo.exported(MODEL, PRESET, layout).path)
    assert set(single) == set(sd) and all(torch.equal(single[k], sd[k]) for k in sd)
    ids = zoo.eval_ids(zoo.base(MODEL))
    assert torch.equal(logits(moeq.load(out), ids), zoo.quantized_logits(MODEL, PRESET))


def _failing_save_file(monkeypatch, fail_on=2):
    calls = []
    real = writer.save_file

    def save_file(*args, **kwargs):
        calls.append(args[1] if len(args) > 1 else kwargs.get("filename"))
        if len(calls) == fail_on:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "save_file", save_file)
    return calls


def test_failed_write_leaves_nothing(zoo, tmp_path, monkeypatch):
    calls = _failing_save_file(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        _export(zoo, out, max_shard_bytes=64 * 1024)
    assert len(calls) == 2  # it really failed half-way, after writing a shard
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind either


def test_failed_overwrite_keeps_the_old_export(zoo, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _export(zoo, out, "compressed-tensors")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _failing_save_file(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        _export(zoo, out, overwrite=True, max_shard_bytes=64 * 1024)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_non_empty_output_dir_is_refused_unless_overwrite(zoo, tmp_path):
    out = tmp_path / "out"
    _export(zoo, out, "compressed-tensors")
    (out / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _export(zoo, out)
    assert (out / "keep.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    _export(zoo, out, overwrite=True)  # an earlier moeq export (it has moeq_export.json) is replaced
    assert not (out / "keep.txt").exists()
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert (out / "hf_quant_config.json").exists()  # the modelopt export replaced the compressed-tensors one
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the replaced directory is gone
    ids = zoo.eval_ids(zoo.base(MODEL))
    assert torch.equal(logits(moeq.load(out), ids), zoo.quantized_logits(MODEL, PRESET))


def test_overwrite_refuses_a_directory_moeq_did_not_write(zoo, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="not written by moeq"):
        _export(zoo, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_empty_output_dir_is_fine(zoo, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _export(zoo, out)
    assert (out / "model.safetensors").exists()


def test_output_path_that_is_a_file_is_refused(zoo, tmp_path):
    out = tmp_path / "out"
    out.write_text("not a directory")
    with pytest.raises(FileExistsError):
        _export(zoo, out)
    assert out.read_text() == "not a directory"


def test_never_quantized_model_is_refused(tmp_path):
    model = tm.tiny_model("qwen3_moe")
    with pytest.raises(ValueError, match=r"never quantized.*moeq\.quantize"):
        moeq.export(model, tmp_path / "out", "modelopt", progress=False)
    assert list(tmp_path.iterdir()) == []
