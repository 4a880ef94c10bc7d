"""Sharded safetensors writing into a temporary directory, renamed into place at the end.

A crash leaves no half checkpoint: everything is written to `<out>.moeq-tmp-*` next to
the destination and moved with one rename after the index is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

DEFAULT_SHARD_BYTES = 1 << 30  # a shard is held in memory until written: this bounds export's extra memory


class ShardWriter:
    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.dir, self.max = Path(directory), max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.keys: set[str] = set()
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self.keys:
            raise ValueError(f"duplicate checkpoint key {key}")
        self.keys.add(key)
        t = tensor.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max:
            self.flush()
        self.pending[key] = t
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        i = len(self.shards)
        save_file(self.pending, str(self.dir / f"shard-{i:05d}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Name the shards as transformers does and write the index."""
        self.flush()
        n = len(self.shards)
        weight_map = {}
        for i, keys in enumerate(self.shards):
            name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / f"shard-{i:05d}.tmp", self.dir / name)
            weight_map.update({k: name for k in keys})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


class AtomicDir:
    """`with AtomicDir(out, overwrite) as tmp:` write into tmp; renamed to out on success."""

    def __init__(self, out: "str | os.PathLike", overwrite: bool = False):
        self.out, self.overwrite = Path(out), overwrite
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())) and not overwrite:
            raise FileExistsError(f"output directory {self.out} exists and is not empty; choose another path or pass overwrite=True")

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.moeq-tmp-", dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.moeq-old-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False
