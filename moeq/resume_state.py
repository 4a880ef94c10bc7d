"""Streaming's resume state: what an interrupted run leaves so the next one continues, and
nothing the next one could trust wrongly.

`.<out>.moeq-partial/` next to the destination holds:

    progress.json          the manifest, rewritten atomically after every layer: the commit point
    activations-00003.pt   hidden states after the first 3 layers (the input of layer 3); with
                           GPTQ the pair (unquantized, quantized) of streams
    shard-00000.tmp ...    the export's finished shards (named as transformers does at the end)

Invariants:
- A layer is done when progress.json says so; it names every file it relies on with its
  size, sha256 and the layer it belongs to, and carries a sha256 of its own content.
  Files it does not name are leftovers of an unfinished step and are removed.
- Missing, truncated or altered state (any file, the manifest included) is never trusted:
  the state is discarded with a warning naming the file and the run starts over.
- `fingerprint()` covers every input that changes the output bytes. A partial run with a
  different one is refused, naming the option, unless `overwrite` (which discards it).
- One run at a time per output: the directory is locked (flock) while in use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .durable import fsync_dir, sha256_file, write_atomic

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None

log = logging.getLogger("moeq")

class ResumeMismatch(ValueError):
    """A partial run of the same output was made with other options (the message names it)."""


class PartialRunBusy(RuntimeError):
    """Another live process holds the partial run of the same output."""


VERSION = 2  # of the manifest format; version 1 was progress.json without checksums
MANIFEST = "progress.json"


def calib_digest(batches) -> dict:
    """Shapes and a sha256 of the calibration token ids (not a sum: a permutation differs)."""
    h = hashlib.sha256()
    for b in batches:
        t = b.detach().to("cpu", torch.int64).contiguous()
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return {"batches": [list(b.shape) for b in batches], "sha256": h.hexdigest()}


def _model_files(path: Path) -> list:
    """(name, size, mtime) of the files the weights and config come from."""
    weights = (".safetensors", ".safetensors.index.json")
    files = sorted(p for p in path.iterdir() if p.name == "config.json" or p.name.endswith(weights))
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def fingerprint(*, model_path, recipe, layout: str, dtype, calib_all_experts: bool, calib, max_shard_bytes: int,
                device, world_size: int, algorithm: str = "max") -> dict:
    """Everything that changes the bytes a streaming run writes, as JSON-comparable values."""
    import transformers

    from . import __version__

    path = Path(model_path).resolve()
    fp = {
        "model": str(path), "model files": _model_files(path), "recipe": dataclasses.asdict(recipe),
        "layout": layout, "dtype": str(dtype).removeprefix("torch."), "calib_all_experts": bool(calib_all_experts),
        "calibration tokens": calib_digest(calib), "max_shard_bytes": int(max_shard_bytes),
        "device": torch.device(device).type, "processes": int(world_size), "algorithm": algorithm,
        "moeq version": __version__,
        "torch version": torch.__version__, "transformers version": transformers.__version__,
    }
    return json.loads(json.dumps(fp, default=str))  # tuples -> lists, as they come back from progress.json


def _short(v) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 160 else s[:157] + "..."


def mismatch(old: dict, new: dict) -> "tuple[str, object, object] | None":
    """(option, old value, new value) of the first difference, recipe fields named one by one."""
    for key in new:
        a, b = old.get(key), new[key]
        if a == b:
            continue
        if key == "recipe" and isinstance(a, dict):
            for f in b:
                if a.get(f) != b[f]:
                    return {"exclude": "exclude", "name": "recipe"}.get(f, f"recipe.{f}"), a.get(f), b[f]
        return key, a, b
    extra = set(old) - set(new)
    return (sorted(extra)[0], old[sorted(extra)[0]], None) if extra else None


def _digest(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


@dataclass
class Resumed:
    """What a verified partial run hands over: continue at layer `done` with `hidden`."""
    done: int
    hidden: list
    shards: list[dict]
    total_bytes: int
    tokens_per_expert: dict
    excluded: list[str]


class PartialRun:
    """`run = PartialRun(dir, fp); resumed = run.open(overwrite, n_layers)`; after each layer
    `run.commit(...)`; at the end `run.finish()` then rename the directory; `run.release()`."""

    def __init__(self, directory: Path, fp: dict):
        self.dir, self.fp = Path(directory), fp
        self.manifest: dict | None = None
        self._fd: int | None = None

    # -- opening -----------------------------------------------------------------------
    def open(self, overwrite: bool, n_layers: int, resume: bool = True) -> "Resumed | None":
        """Lock the directory and return the verified state to continue from (None: start at
        layer 0 with an empty directory). Raises ResumeMismatch (a ValueError) on other
        options, PartialRunBusy while another process holds it."""
        if self.dir.exists() and not self.dir.is_dir():
            log.warning("removing %s: a file where moeq keeps its resume state", self.dir)
            self.dir.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        m, problem = self._read(n_layers)
        if m is not None:
            diff = mismatch(m["fingerprint"], self.fp)
            if diff is not None:
                opt, a, b = diff
                if not overwrite:
                    self.release()
                    raise ResumeMismatch(f"the partial run in {self.dir} used {opt}={_short(a)}; this run uses "
                                         f"{_short(b)}: re-run with the same options to resume it, or pass overwrite=True "
                                         f"(moeq quantize --overwrite) to start over")
                log.warning("overwrite: discarding the partial run in %s (it used %s=%s)", self.dir, opt, _short(a))
                m = None
            elif not resume:
                log.warning("discarding the partial run in %s: resuming is not supported with several processes", self.dir)
                m = None
            else:
                problem = self._verify(m)
        if problem is not None:
            log.warning("the partial run in %s is damaged (%s): discarding it and starting over", self.dir, problem)
            m = None
        if m is None:
            self._clear()
            return None
        self.manifest = m
        self.drop_uncommitted()
        hidden = torch.load(self.dir / m["activations"]["file"], weights_only=True)
        log.warning("resuming %s after layer %d of %d", self.dir, m["done"], n_layers)
        return Resumed(m["done"], hidden, m["shards"], m["total_bytes"], m["tokens_per_expert"], m["excluded"])

    def _read(self, n_layers: int) -> "tuple[dict | None, str | None]":
        p = self.dir / MANIFEST
        if not p.exists():
            return None, None  # nothing committed: whatever is there is a first step's leftovers
        try:
            m = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            return None, f"{MANIFEST} cannot be read ({type(e).__name__}: {e})"
        if not isinstance(m, dict) or m.get("version") != VERSION:
            return None, f"{MANIFEST} is not a version-{VERSION} resume manifest"
        if m.pop("sha256", None) != _digest(m):
            return None, f"{MANIFEST} differs from its own checksum"
        try:
            ok = (isinstance(m["fingerprint"], dict) and 1 <= int(m["done"]) <= n_layers
                  and m["activations"]["layer"] == m["done"] and isinstance(m["shards"], list)
                  and all({"file", "keys", "bytes", "sha256", "layer"} <= set(s) for s in m["shards"])
                  and isinstance(m["tokens_per_expert"], dict) and isinstance(m["excluded"], list)
                  and int(m["total_bytes"]) >= 0)
        except (KeyError, TypeError, ValueError):
            ok = False
        return (m, None) if ok else (None, f"{MANIFEST} is incomplete or inconsistent")

    def _verify(self, m: dict) -> "str | None":
        for rec in [m["activations"], *m["shards"]]:
            p = self.dir / rec["file"]
            what = f"{rec['file']} (layer {rec['layer']})"
            if not p.is_file():
                return f"{what} is missing"
            if p.stat().st_size != rec["bytes"]:
                return f"{what} has {p.stat().st_size} bytes, {MANIFEST} says {rec['bytes']}"
            if sha256_file(p) != rec["sha256"]:
                return f"{what} differs from the checksum in {MANIFEST}"
        return None

    # -- writing -----------------------------------------------------------------------
    def commit(self, done: int, hidden, shards: list[dict], total_bytes: int, tokens_per_expert: dict,
               excluded: list[str]) -> None:
        """Save the activations after layer `done - 1`, then (the commit point) the manifest."""
        name = f"activations-{done:05d}.pt"
        part = self.dir / f"{name}.part"
        with open(part, "wb") as f:  # a file object: a full disk surfaces as OSError(ENOSPC)
            torch.save(hidden, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, self.dir / name)
        fsync_dir(self.dir)
        act = {"file": name, "layer": done, "bytes": (self.dir / name).stat().st_size,
               "sha256": sha256_file(self.dir / name)}
        m = {"version": VERSION, "fingerprint": self.fp, "done": done, "activations": act, "shards": shards,
             "total_bytes": total_bytes, "tokens_per_expert": tokens_per_expert, "excluded": list(excluded)}
        write_atomic(self.dir / MANIFEST, json.dumps({**m, "sha256": _digest(m)}))
        old, self.manifest = self.manifest, m
        if old is not None and old["activations"]["file"] != name:
            (self.dir / old["activations"]["file"]).unlink(missing_ok=True)

    def drop_uncommitted(self) -> None:
        """Remove every file the manifest on disk does not name (all of them when nothing is
        committed). The manifest on disk is the truth: an interruption inside `commit` may
        have written it or not."""
        try:
            self.manifest = json.loads((self.dir / MANIFEST).read_text())
        except (OSError, ValueError):
            self.manifest = None
        keep = set() if self.manifest is None else {MANIFEST, self.manifest["activations"]["file"],
                                                     *(s["file"] for s in self.manifest["shards"])}
        for p in self.dir.iterdir():
            if p.name not in keep:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    def _clear(self) -> None:
        for p in self.dir.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        self.manifest = None

    def finish(self) -> None:
        """The export in the directory is complete: drop the resume state (manifest first, so an
        interruption from here on means "start over")."""
        m, self.manifest = self.manifest, None
        (self.dir / MANIFEST).unlink(missing_ok=True)
        if m is not None:
            for f in [m["activations"]["file"], *(s["file"] for s in m["shards"])]:
                (self.dir / f).unlink(missing_ok=True)
        for p in self.dir.glob("*.tmp"):  # this run's own shards, linked under their final names
            p.unlink()
        fsync_dir(self.dir)

    # -- locking -----------------------------------------------------------------------
    def _lock(self) -> None:
        if fcntl is None or self._fd is not None:
            return
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PartialRunBusy(f"another moeq run is writing {self.dir} right now; wait for it to finish, or stop "
                                 f"it and re-run (it resumes)") from None
        except OSError as e:  # a file system without flock (some network mounts): run unlocked
            log.debug("cannot lock %s (%s)", self.dir, e)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
