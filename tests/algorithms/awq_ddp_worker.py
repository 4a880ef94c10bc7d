"""Run by tests/algorithms/test_torchrun_algorithms.py: `python -m torch.distributed.run
--nproc-per-node N awq_ddp_worker.py OUT [SRC]`. Each rank quantizes the tiny Qwen3-MoE model
(SRC: its saved directory, quantized with streaming into OUT/export, rank 0 writing) with
algorithm awq on its share of the calibration batches (rank r takes batches r::N) and saves
OUT/rank{r}.pt: the AWQ report (group -> alpha, loss_max), the rows per expert and, in
memory, every parameter after the folds."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tiny_models as tm  # noqa: E402

import moeq  # noqa: E402
from moeq.streaming import quantize_streaming  # noqa: E402


def main(out: Path, src: Path | None) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.set_num_threads(1)
    model = tm.tiny_model("qwen3_moe", seed=0)
    calib = [tm.random_input_ids(model, 1, 16, seed=s) for s in range(4)][rank::world]
    params = {}
    if src is None:
        rep = moeq.quantize(model, "w4a16-int4", calib, progress=False, algorithm="awq")
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
    else:
        rep, _ = quantize_streaming(src, "w4a16-int4", calib, out / "export", "compressed-tensors", progress=False,
                                    algorithm="awq", write=rank == 0)
    torch.save({"alpha": {k: v["alpha"] for k, v in rep.awq.items()},
                "loss_max": {k: v["loss_max"] for k, v in rep.awq.items()},
                "skipped": rep.awq_skipped, "tokens": rep.tokens_per_expert, "params": params}, out / f"rank{rank}.pt")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
