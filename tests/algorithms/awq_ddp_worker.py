"""Run by tests/algorithms/test_torchrun_algorithms.py: `python -m torch.distributed.run
--nproc-per-node N awq_ddp_worker.py OUT`. Each rank quantizes the tiny Qwen3-MoE model with
algorithm awq on its share of the calibration batches (rank r takes batches r::N) and saves
OUT/rank{r}.pt: the AWQ report (group -> alpha), the rows per expert and every parameter after
the folds."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tiny_models as tm  # noqa: E402

import moeq  # noqa: E402


def main(out: Path) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.set_num_threads(1)
    model = tm.tiny_model("qwen3_moe", seed=0)
    calib = [tm.random_input_ids(model, 1, 16, seed=s) for s in range(4)]
    rep = moeq.quantize(model, "w4a16-int4", calib[rank::world], progress=False, algorithm="awq")
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.save({"alpha": {k: v["alpha"] for k, v in rep.awq.items()}, "skipped": rep.awq_skipped, "params": params,
                "tokens": rep.tokens_per_expert},
               out / f"rank{rank}.pt")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
