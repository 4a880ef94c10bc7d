"""Sharded safetensors writing; the directory it writes into is renamed into place at the end.

A crash leaves no half checkpoint: everything is written to a temp dir next to the
destination (`outdir.AtomicDir`, or streaming's partial dir) and moved with one rename
after the index is complete. Each shard is itself written under a temporary name, fsynced
and renamed, so a shard file that exists is complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..durable import replace_durably, sha256_file, write_atomic
from .outdir import AtomicDir  # noqa: F401  (re-exported: its historical home)

DEFAULT_SHARD_BYTES = 1 << 30  # a shard is held in memory until written: this bounds export's extra memory


class ShardWriter:
    """Invariant: once `flush` returns, `records[i]` describes the complete file
    `shard-{i:05d}.tmp`: {"file", "keys", "bytes" (file size)} and, with `checksums`, its
    "sha256" (what streaming's resume state verifies)."""

    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES, checksums: bool = False):
        self.dir, self.max, self.checksums = Path(directory), max_shard_bytes, checksums
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.records: list[dict] = []
        self.keys: set[str] = set()
        self.total_bytes = 0

    @property
    def shards(self) -> list[list[str]]:
        return [r["keys"] for r in self.records]

    def resume(self, records: list[dict], total_bytes: int) -> None:
        """Continue after shards already written (and verified) by an interrupted run."""
        self.records = [dict(r) for r in records]
        self.keys = {k for r in records for k in r["keys"]}
        self.total_bytes = total_bytes

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
        name = f"shard-{len(self.records):05d}.tmp"
        part = self.dir / f"{name}.part"
        try:
            save_file(self.pending, str(part), metadata={"format": "pt"})
            replace_durably(part, self.dir / name)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        rec = {"file": name, "keys": list(self.pending), "bytes": (self.dir / name).stat().st_size}
        if self.checksums:
            rec["sha256"] = sha256_file(self.dir / name)
        self.records.append(rec)
        self.pending, self.pending_bytes = {}, 0

    def close(self, keep_tmp_names: bool = False) -> None:
        """Name the shards as transformers does and write the index. `keep_tmp_names`: give
        the shards their final names as hard links, so the `shard-*.tmp` files a resume
        state refers to stay valid until the caller removes them."""
        self.flush()
        n = len(self.records)
        weight_map = {}
        for i, rec in enumerate(self.records):
            name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            src, dst = self.dir / rec["file"], self.dir / name
            if keep_tmp_names:
                dst.unlink(missing_ok=True)
                try:
                    os.link(src, dst)
                except OSError:  # no hard links on this file system: a resume will recompute
                    os.replace(src, dst)
            else:
                os.replace(src, dst)
            weight_map.update({k: name for k in rec["keys"]})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            write_atomic(self.dir / "model.safetensors.index.json", json.dumps(index, indent=2))
