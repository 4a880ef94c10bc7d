"""GPTQ under torchrun (2 processes, gloo): each rank calibrates on its half of the windows,
the Hessians are summed over ranks before every solve, so the export equals a single process
on all windows up to float summation order (Hessian sums in another order may flip a rare
rounding)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from moeq.checkpoint.load import CheckpointReader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model_dirs import make_model_dir  # noqa: E402
from streaming.test_streaming import _cli  # noqa: E402


@pytest.mark.parametrize("streaming", [False, True])
def test_two_process_gptq_equals_single_process(tmp_path, streaming):
    src = make_model_dir(tmp_path / "src")
    args = ["--model", str(src), "--samples", "8", "--seq-len", "32", "--batch-size", "2", "--device", "cpu",
            "--recipe", "w4a16-int4", "--layout", "compressed-tensors", "--algorithm", "gptq"]
    args += ["--streaming"] if streaming else []
    _cli(args + ["--out", str(tmp_path / "one")])
    _cli(args + ["--out", str(tmp_path / "two")], nproc=2)
    _cli(["--model", str(src), "--samples", "8", "--seq-len", "32", "--batch-size", "2", "--device", "cpu",
          "--recipe", "w4a16-int4", "--layout", "compressed-tensors", "--out", str(tmp_path / "max")])
    one, two, rtn = (CheckpointReader(tmp_path / d) for d in ("one", "two", "max"))
    assert set(one.files) == set(two.files)
    packed = [k for k in one.files if k.endswith("weight_packed")]
    assert packed
    same, moved = 0.0, 0.0
    for k in one.files:
        a, b = one[k], two[k]
        if k in packed:  # int4 codes: equal but for rare flips; GPTQ moved many codes from round-to-nearest
            same = min(same or 1.0, (a == b).float().mean().item())
            moved = max(moved, (a != rtn[k]).float().mean().item())
        else:
            assert torch.equal(a, b), k
    assert same > 0.99 and moved > 0.05, (same, moved)
