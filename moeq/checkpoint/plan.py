"""Where each in-memory parameter goes in the original checkpoint's key space.

transformers v5 fuses per-expert checkpoint tensors into 3-D parameters at load time and
reverts that at save time (`revert_weight_conversion`). Instead of re-implementing those
per-model rules, we run the revert on *probe* tensors whose values are unique ids, and
read back which checkpoint key holds which part of which parameter. Probes have one id
per row ([E, N, 1] for expert stacks, [N, 1] for matrices; K collapsed, so they stay
small) and one id per element for everything else (norms, conv kernels, ...). Export
uses the map to split fused experts into per-expert keys with the exact names of the
original checkpoint (Qwen3.5 `model.language_model.` prefix, Mixtral
`block_sparse_moe.experts.{e}.w1/w2/w3`, ...); load and streaming use it the other way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.core_model_loading import revert_weight_conversion

from ..targets import is_experts_module


@dataclass
class Piece:
    """Checkpoint tensor `key` holds part of the in-memory parameter `param`.

    mode "rows": rows `rows` of a matrix (of expert `expert` for an [E, N, K] stack);
    mode "elements": flat elements `rows` of the parameter. rows None = all of it,
    unchanged. `src`: which probe positions of the key belong to this parameter when the
    key is shared by several parameters (None = the whole key); `n_probe` = probe positions
    of the key."""

    key: str
    param: str
    expert: int | None
    rows: torch.Tensor | None
    mode: str = "rows"
    src: torch.Tensor | None = None
    n_probe: int = 0


def _experts_params(model: nn.Module) -> dict[str, bool]:
    """3-D parameters of experts modules -> whether stored [E, K, N] (transposed)."""
    out = {}
    for name, m in model.named_modules():
        if is_experts_module(m):
            for p, t in m.named_parameters(recurse=False):
                if t.dim() == 3:
                    out[f"{name}.{p}" if name else p] = bool(m.is_transposed)
    return out


def checkpoint_plan(model: nn.Module) -> dict[str, list[Piece]]:
    """param name -> the checkpoint pieces it is saved as."""
    experts = _experts_params(model)
    names, bases, modes, probes = [], [], {}, {}
    base = 0
    for name, p in model.state_dict(keep_vars=True).items():
        shape = list(p.shape)
        if name in experts:
            shape[1 if experts[name] else 2] = 1
            modes[name] = "rows"
        elif p.dim() == 2:
            shape[1] = 1
            modes[name] = "rows"
        else:
            modes[name] = "elements"
        n = 1
        for s in shape:
            n *= s
        probes[name] = (torch.arange(n, dtype=torch.float64) + base).reshape(shape)
        names.append(name)
        bases.append(base)
        base += max(n, 1)
    reverted = revert_weight_conversion(model, dict(probes))
    bases_t = torch.tensor(bases, dtype=torch.float64)
    plan: dict[str, list[Piece]] = {n: [] for n in names}
    for key, t in reverted.items():
        flat = t.reshape(-1)
        if flat.numel() == 0:
            continue
        owner = torch.searchsorted(bases_t, flat, right=True) - 1
        for i in torch.unique(owner).tolist():
            name, probe = names[i], probes[names[i]]
            sel = owner == i
            src = None if bool(sel.all()) else sel.nonzero().squeeze(1)
            local = (flat[sel] - bases[i]).long()
            if src is None and t.shape == probe.shape and torch.equal(t, probe):
                plan[name].append(Piece(key, name, None, None, modes[name], None, flat.numel()))
            elif name in experts:
                per_e = probe[0].numel()
                e = torch.unique(local // per_e)
                if e.numel() != 1:
                    raise NotImplementedError(
                        f"checkpoint key {key} holds several experts of {name} in one tensor; moeq can only split "
                        f"fused experts into one key per expert")
                plan[name].append(Piece(key, name, int(e), local % per_e, "rows", src, flat.numel()))
            else:
                plan[name].append(Piece(key, name, None, local, modes[name], src, flat.numel()))
    return plan


def fill_from_checkpoint(dst: torch.Tensor, pieces: list[Piece], read) -> None:
    """Write the checkpoint tensors of `pieces` (read(key) -> tensor) into parameter `dst`."""
    for piece in pieces:
        src = read(piece.key)
        if piece.src is not None:
            src = src.reshape(piece.n_probe, -1)[piece.src.to(src.device)]
        src = src.to(dst.dtype)
        if piece.rows is None:
            dst.copy_(src.reshape(dst.shape))
        elif piece.mode == "elements":
            dst.view(-1)[piece.rows] = src.reshape(-1)
        elif piece.expert is not None:
            dst[piece.expert][piece.rows] = src.reshape(len(piece.rows), -1)
        else:
            dst[piece.rows] = src.reshape(len(piece.rows), -1)


def to_checkpoint(params: dict[str, torch.Tensor], plan: dict[str, list[Piece]], read) -> dict[str, torch.Tensor]:
    """The inverse of `fill_from_checkpoint` for parameters changed in memory: param name ->
    tensor in, checkpoint key -> tensor out (read(key) -> the original tensor: its shape and
    dtype, and the parts of a shared key that other parameters own)."""
    out: dict[str, torch.Tensor] = {}
    for name, value in params.items():
        value = value.detach()
        for piece in plan[name]:
            if piece.key not in out:
                out[piece.key] = read(piece.key).clone()
            key_t = out[piece.key]
            if piece.rows is None:
                part = value
            elif piece.mode == "elements":
                part = value.reshape(-1)[piece.rows.to(value.device)]
            elif piece.expert is not None:
                part = value[piece.expert][piece.rows.to(value.device)]
            else:
                part = value[piece.rows.to(value.device)]
            part = part.to(device=key_t.device, dtype=key_t.dtype)
            if piece.src is None:
                key_t.copy_(part.reshape(key_t.shape))
            else:
                key_t.view(piece.n_probe, -1)[piece.src.to(key_t.device)] = part.reshape(len(piece.src), -1)
    return out
