"""Where each in-memory parameter goes in the original checkpoint's key space.

transformers v5 fuses per-expert checkpoint tensors into 3-D parameters at load time and
reverts that at save time (`revert_weight_conversion`). Instead of re-implementing those
per-model rules, we run the revert on *probe* tensors whose values are unique element
ids (one per row of each parameter), and read back which checkpoint key holds which
rows of which parameter. Export uses the map to split fused experts into per-expert keys
with the exact names of the original checkpoint (Qwen3.5 `model.language_model.` prefix,
Mixtral `block_sparse_moe.experts.{e}.w1/w2/w3`, ...); load uses it the other way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.core_model_loading import revert_weight_conversion


@dataclass
class Piece:
    """Checkpoint tensor `key` holds rows `rows` (of the [N, K] view) of expert `expert`
    (None for 2-D / 1-D params) of the in-memory parameter `param`."""

    key: str
    param: str
    expert: int | None
    rows: torch.Tensor | None  # None = the whole parameter, unchanged


def _row_axis(p: torch.Tensor, transposed: bool) -> int:
    """Axis of p that indexes output rows N (the probe keeps it and collapses K)."""
    return p.dim() - 1 if transposed else p.dim() - 2


def checkpoint_plan(model: nn.Module, transposed: set[str]) -> dict[str, list[Piece]]:
    """param name -> the checkpoint pieces it is saved as. `transposed` names 3-D params
    stored [E, K, N]."""
    names, bases, shapes, probes = [], [], [], {}
    base = 0
    for name, p in model.state_dict(keep_vars=True).items():
        if p.dim() >= 2:
            shape = list(p.shape)
            k_axis = p.dim() - 2 if name in transposed else p.dim() - 1
            shape[k_axis] = 1
        else:
            shape = list(p.shape)
        n = 1
        for s in shape:
            n *= s
        probes[name] = (torch.arange(n, dtype=torch.float64) + base).reshape(shape)
        names.append(name)
        bases.append(base)
        shapes.append(shape)
        base += max(n, 1)
    reverted = revert_weight_conversion(model, dict(probes))
    bases_t = torch.tensor(bases, dtype=torch.float64)
    plan: dict[str, list[Piece]] = {n: [] for n in names}
    for key, t in reverted.items():
        flat = t.reshape(-1)
        if flat.numel() == 0:
            continue
        i = int(torch.searchsorted(bases_t, flat[:1], right=True)) - 1
        name, shape = names[i], shapes[i]
        local = (flat - bases[i]).long()
        probe = probes[name]
        if t.shape == probe.shape and torch.equal(t, probe):
            plan[name].append(Piece(key, name, None, None))
            continue
        if len(shape) not in (2, 3):
            raise NotImplementedError(f"checkpoint conversion of {name} -> {key} is not a row split; unsupported")
        if len(shape) == 3:
            per_e = shape[1] * shape[2]
            experts = torch.unique(local // per_e)
            if experts.numel() != 1:
                raise NotImplementedError(f"checkpoint key {key} mixes experts of {name}; unsupported")
            plan[name].append(Piece(key, name, int(experts), local % per_e))
        else:
            plan[name].append(Piece(key, name, None, local))
    return plan


def fill_from_checkpoint(dst: torch.Tensor, pieces: list[Piece], read) -> None:
    """Write the checkpoint tensors of `pieces` (read(key) -> tensor) into parameter `dst`."""
    for piece in pieces:
        src = read(piece.key)
        if piece.rows is None:
            dst.copy_(src)
        elif piece.expert is not None:
            dst[piece.expert][piece.rows] = src.to(dst.dtype)
        else:
            dst[piece.rows] = src.to(dst.dtype)
