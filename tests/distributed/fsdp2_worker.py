"""Run by tests/distributed/test_fsdp2.py: `python -m torch.distributed.run --nproc-per-node N
fsdp2_worker.py OUT [--no-shard]`. Builds the tiny Qwen3-MoE model, applies FSDP2 `fully_shard`
per decoder layer and to the root (unless --no-shard or a single process), calibrates each
rank on its share of the data, runs the fake-quant forward and exports (a collective under
FSDP2: every rank calls moeq.export, rank 0 writes). Rank 0 saves the logits to OUT/logits.pt.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tiny_models as tm  # noqa: E402

import moeq  # noqa: E402


def main(out: Path, shard: bool) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.set_num_threads(1)
    model = tm.tiny_model("qwen3_moe", experts_implementation="grouped_mm", seed=0)
    calib = [tm.random_input_ids(model, 2, 16, seed=s) for s in range(4)]
    probe = tm.random_input_ids(model, 2, 16, seed=99)
    if shard and world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    moeq.quantize(model, "nvfp4", calib[rank::world], progress=False)
    with torch.no_grad():
        logits = model(input_ids=probe, use_cache=False).logits
    moeq.export(model, out / "export", progress=False)
    if rank == 0:
        torch.save(logits, out / "logits.pt")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), "--no-shard" not in sys.argv)
