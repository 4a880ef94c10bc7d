"""A full disk while exporting: one line that names the place and says to free space
(`ExportError`, an OSError), no temp dir and no output left; a streaming run keeps its
committed layers and resumes after the space is freed."""

from __future__ import annotations

import errno
import importlib
import subprocess
from pathlib import Path

import pytest
import torch

from moeq.checkpoint.outdir import ExportError

from .inject import assert_same_files

writer = importlib.import_module("moeq.checkpoint.writer")


def _enospc_on(monkeypatch, obj, attr, nth, error=None):
    real, calls = getattr(obj, attr), [0]

    def fn(*a, **k):
        calls[0] += 1
        if calls[0] == nth:
            raise error or OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(obj, attr, fn)
    return calls


def _one_line(e, where: Path):
    msg = str(e.value)
    assert "\n" not in msg and str(where) in msg and "free space" in msg, msg


SAFETENSORS_TEXT = Exception("Error while serializing: I/O error: No space left on device (os error 28)")


def test_export_shard_write_safetensors_error(setup, tmp_path, monkeypatch):
    """(A plain OSError(ENOSPC): test_regressions.) safetensors raises its own error type."""
    error = SAFETENSORS_TEXT
    out = tmp_path / "out"
    calls = _enospc_on(monkeypatch, writer, "save_file", 3, error)
    with pytest.raises(ExportError) as e:
        setup.export(out)
    assert calls[0] == 3
    _one_line(e, out)
    assert list(tmp_path.iterdir()) == []


def _config_write_enospc(monkeypatch):
    real = Path.write_text

    def write_text(self, *a, **k):
        if self.name == "config.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", write_text)


def test_export_config_write(setup, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _config_write_enospc(monkeypatch)
    with pytest.raises(ExportError) as e:
        setup.export(out)
    _one_line(e, out)
    assert list(tmp_path.iterdir()) == []


def _torch_save_enospc(obj, f, *a, **k):
    """What torch.save into a file object does on a full disk: a RuntimeError raised while the
    file's write raised OSError(ENOSPC)."""
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


@pytest.mark.parametrize("where", ["shard of layer 1", "activations of layer 1", "config.json"])
def test_streaming_keeps_committed_layers_and_resumes(setup, tmp_path, monkeypatch, where, caplog):
    out = tmp_path / "out"
    if where == "shard of layer 1":
        real = writer.save_file

        def save_file(tensors, filename, *a, **k):
            if (Path(filename).parent / "progress.json").exists():
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(tensors, filename, *a, **k)

        monkeypatch.setattr(writer, "save_file", save_file)
    elif where == "activations of layer 1":
        real_save, calls = torch.save, [0]

        def save(obj, f, *a, **k):
            calls[0] += 1
            if calls[0] == 2:
                _torch_save_enospc(obj, f)
            return real_save(obj, f, *a, **k)

        monkeypatch.setattr(torch, "save", save)
    else:
        _config_write_enospc(monkeypatch)
    with pytest.raises(ExportError) as e:
        setup.stream(out)
    partial = tmp_path / ".out.moeq-partial"
    _one_line(e, partial)
    done = 2 if where == "config.json" else 1
    assert f"resumes after layer {done}" in str(e.value)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == [partial.name]
    assert not list(partial.glob("*.part"))  # the unfinished step's files are gone at once
    monkeypatch.undo()
    with caplog.at_level("WARNING", logger="moeq"):
        setup.stream(out)
    assert f"after layer {done} of 2" in caplog.text
    assert_same_files(out, setup.ref_stream)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.fixture
def small_fs(tmp_path):
    """A real 256 KiB file system (tmpfs; needs root), unmounted afterwards."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_real_full_disk(setup, small_fs):
    with pytest.raises(ExportError) as e:
        setup.export(small_fs / "mem")
    _one_line(e, small_fs / "mem")
    assert list(small_fs.iterdir()) == []
    with pytest.raises(ExportError) as e:
        setup.stream(small_fs / "stream")
    assert not (small_fs / "stream").exists()
    assert not list(small_fs.rglob("*.part"))
