"""Issue 13: FSDP2 under torchrun (2 processes, CPU, gloo) with fully_shard per decoder
layer: calibrate, fake-quant forward and export. The export is byte-identical to a
single-process run on the same data and the fake-quant logits are equal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("fsdp2_worker.py")


def _run(out: Path, nproc: int) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), str(WORKER), str(out)]
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), str(out), "--no-shard"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-4000:]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_fsdp2_two_processes_equal_single_process(tmp_path):
    _run(tmp_path / "single", 1)
    _run(tmp_path / "fsdp", 2)
    a, b = torch.load(tmp_path / "single" / "logits.pt"), torch.load(tmp_path / "fsdp" / "logits.pt")
    assert torch.equal(a, b)
    files = sorted(p.name for p in (tmp_path / "single" / "export").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "fsdp" / "export").iterdir())
    for f in files:
        if f.endswith(".safetensors") or f in ("config.json", "hf_quant_config.json"):
            assert (tmp_path / "single" / "export" / f).read_bytes() == (tmp_path / "fsdp" / "export" / f).read_bytes(), f
