"""AWQ's scale search (see awq.py): candidate scales s = stat^alpha for alpha in GRID, each
scored by the quantization error of the group's quantized consumers on sampled rows
(`ConsumerLoss`), summed over ranks in a multi-process run; s = 1 (max) wins ties."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..calibration_stats import abs_amax
from ..quantizer import fake_quant_input, fake_quant_weight, input_is_static, input_scale_param
from .awq_stats import sum_over_ranks

GRID = tuple(i / 20 for i in range(20))  # alpha in [0, 1), AutoAWQ's grid
DUO = False  # True: s = x^alpha / w^(1 - alpha) (AutoAWQ's duo scaling; measured no better on the demo)
OUT_ROWS = 64  # weight rows per expert the loss is estimated on


def _floor(t: torch.Tensor) -> torch.Tensor:
    """Floored at 1e-4 of its max, so a dead channel cannot blow up 1/s."""
    return t.clamp_min(t.amax(-1, keepdim=True) * 1e-4).clamp_min(1e-12)


def scales(stat: torch.Tensor, alpha: float, wstat: torch.Tensor | None = None) -> torch.Tensor:
    """stat [..., K] -> s = stat^alpha (DUO: / wstat^(1 - alpha)) normalized by sqrt(max * min)
    along K (AutoAWQ)."""
    s = _floor(stat).pow(alpha)
    if wstat is not None:
        s = s / _floor(wstat).pow(1 - alpha)
    return s / (s.amax(-1, keepdim=True) * s.amin(-1, keepdim=True)).sqrt()


def weight_stat(w_nk: torch.Tensor) -> torch.Tensor:
    """Per input channel mean over rows of |W| / max_row |W| (AutoAWQ's duo-scaling weight
    statistic, rows instead of groups): [E, N, K] -> [E, K]."""
    w = w_nk.detach().float().abs()
    return (w / w.amax(-1, keepdim=True).clamp_min(1e-12)).mean(-2)


class ConsumerLoss:
    """loss(s) = sum ||Q(W s) Qin(x / s) - W x||^2 of one quantized consumer, estimated on
    up to OUT_ROWS output rows per expert (a fixed random subset, the same for every s, and
    scaled by N / rows: the weight's per-row scales make rows independent). w_nk [E, N, K] (a
    parameter view), x [E, M, K] float32 (zero rows = padding); s [K] or [E, K]. Computed in
    float32 whatever the parameters' dtype.
    The per-expert weight amax stays exact: max_k(colmax_k * s_k)."""

    def __init__(self, recipe, w_nk: torch.Tensor, x: torch.Tensor, per_expert_input: bool = False,
                 shared: dict | None = None):
        from ..schemes.table import WEIGHT

        self.recipe, self.x, self.per_expert_input = recipe, x, per_expert_input
        self.shared = {} if shared is None else shared  # Qin(x / s) of the last (x, s), shared by consumers of one x
        E, N, K = w_nk.shape
        unit = WEIGHT[recipe.weight].rows  # block schemes: scales span `unit` rows
        units = N // unit
        take = min(units, -(-OUT_ROWS // unit))
        pick = torch.randperm(units, generator=torch.Generator().manual_seed(0))[:take].sort().values
        rows = (pick[:, None] * unit + torch.arange(unit)).flatten().to(w_nk.device)
        self.w = w_nk.detach()[:, rows].float()  # [E, R, K]
        self.colmax = abs_amax(w_nk.detach(), (1,))  # [E, K]
        self.factor = N / rows.numel()
        self.ref = torch.bmm(x, self.w.transpose(1, 2))

    def __call__(self, s: torch.Tensor) -> float:
        r, x = self.recipe, self.x
        s3 = s.to(x.device).unsqueeze(-2) if s.dim() == 2 else s.to(x.device).reshape(1, 1, -1)
        sh = self.shared  # keeps x and s alive: identity, not a recycled id(), says it is the same input
        if sh.get("x") is not x or sh.get("s") is not s:
            sh.update(x=x, s=s, xs=self._input(x, s3))
        xs = sh["xs"]
        ws = self.w * s3  # float32 throughout: the same grid, and fast on CPUs without bf16 units
        amax = (self.colmax * s3[:, 0]).amax(-1)
        q = fake_quant_weight(r, ws, amax.expand(ws.shape[0])).float()
        return self.factor * float((torch.bmm(xs.float(), q.transpose(1, 2)) - self.ref).square().sum())

    def _input(self, x: torch.Tensor, s3: torch.Tensor) -> torch.Tensor:
        r = self.recipe
        xs = x / s3
        if r.input is not None:
            prm = None
            if input_is_static(r):
                a = abs_amax(xs, (1, 2)) if self.per_expert_input else abs_amax(xs, (0, 1, 2))
                prm = input_scale_param(r, a.clamp_min(1e-12))
                prm = prm.reshape(-1, 1, 1) if prm.dim() else prm
            xs = fake_quant_input(r, xs, prm)
        return xs


@dataclass(eq=False)
class Group:
    """One fold: `stat` [K] (norm, dense MLP) or [E, K] (experts' down_proj); `losses`: one
    factory per quantized consumer of a ConsumerLoss (built when the group is searched, so
    one layer's buffers live at a time); `apply(s)` folds; `params` are what it edits."""

    name: str
    layer: str
    stat: torch.Tensor
    losses: list
    apply: object
    params: list
    wstat: torch.Tensor | None = None  # weight statistic for DUO scaling, like stat
    s: torch.Tensor | None = None  # the search's choice
    result: dict = field(default_factory=dict)


def search(g: Group) -> torch.Tensor:
    """The s with the least loss among s = 1 (max) and the alphas of GRID; s = 1 wins ties
    (result alpha None). Multi-process: each rank's sample loss is summed over ranks before the
    choice, so every rank folds the same s."""
    losses = [make() for make in g.losses]
    cands = [(None, torch.ones_like(g.stat))] + [(a, scales(g.stat, a, g.wstat if DUO else None))
                                                 for a in GRID if a != 0 or DUO]  # alpha 0 without DUO: s = 1
    total = torch.tensor([sum(f(s) for f in losses) for _, s in cands], dtype=torch.float64, device=g.stat.device)
    total = sum_over_ranks(total)
    i = int(torch.argmin(total))  # the first minimum: s = 1 wins ties
    g.result.update(loss_max=float(total[0]), loss=float(total[i]), alpha=cands[i][0])
    return cands[i][1]
