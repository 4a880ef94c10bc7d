"""MSE scale search: per scale unit, the clipping ratio of the amax that minimizes the
weight's reconstruction error sum((fake_quant(w) - w)^2).

Units: every NVFP4 block of 16 (its E4M3 block scale; the per-expert global scale stays at
the max), every INT4 group, every FP8 row of per-channel weights, and for per-tensor FP8
the per-expert scale (a Linear sibling group q/k/v shares one ratio, its scale is shared).
Each unit's error depends only on its own scale, so the per-unit argmin over the grid is
the exact minimizer on the grid; the grid starts at 1.0 (= max) and a ratio replaces it
only when strictly better, so the error never exceeds max's. Vectorized over experts and
units: one fake quant of the whole stack per ratio (in expert chunks), with the candidate's
scales computed once per ratio and no input checks after the first (`weight_scales`,
`fake_quant_weight_scaled`: bit for bit the checked fake quant's values).
"""

from __future__ import annotations

import torch

from ..calibration_stats import full
from ..quantizer import fake_quant_weight, fake_quant_weight_scaled, unit_amax, weight_granularity, weight_scales

RATIOS = tuple(round(1.0 - 0.02 * i, 2) for i in range(26))  # 1.0, 0.98, ..., 0.5
_CHUNK_ELEMS = 1 << 22


def search_units(recipe, w_nk: torch.Tensor, amax: torch.Tensor, ratios=RATIOS) -> torch.Tensor:
    """w_nk [..., N, K] (its own dtype), amax as fake_quant_weight takes it -> the best
    group_amax [..., N, K/g] (float32)."""
    base = unit_amax(recipe, w_nk)
    wu = w_nk.unflatten(-1, (base.shape[-1], -1))  # [..., N, U, K/U]: one unit per row of the last two dims
    wf = wu.float()
    best, best_err = base, None
    for r in ratios:
        ga = base if r == 1.0 else base * r
        if best_err is None:  # the checked fake quant once (finite, divisible), then the same arithmetic unchecked
            fq = fake_quant_weight(recipe, w_nk, amax, ga).unflatten(-1, wu.shape[-2:])
        else:
            fq = fake_quant_weight_scaled(recipe, wu, weight_scales(recipe, amax, ga, w_nk.dtype).unsqueeze(-1))
        err = _sq_err(fq, wf).sum(-1)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best = torch.where(better, ga, best)
        best_err = torch.where(better, err, best_err)
    return best


def tensor_errors(recipe, w_nk: torch.Tensor, amax: torch.Tensor, ratios=RATIOS) -> torch.Tensor:
    """Per-tensor schemes: [len(ratios), E] error of w_nk [E, N, K] with amax [E] * ratio
    (or [len(ratios)] for a 2-D weight and a scalar amax)."""
    wf = w_nk.float()
    errs = []
    for r in ratios:
        if not errs:  # checked once
            fq = fake_quant_weight(recipe, w_nk, amax * r)
        else:
            fq = fake_quant_weight_scaled(recipe, w_nk, weight_scales(recipe, amax * r, None, w_nk.dtype))
        errs.append(_sq_err(fq, wf).sum((-2, -1)))
    return torch.stack(errs)


def _sq_err(fq: torch.Tensor, wf: torch.Tensor) -> torch.Tensor:
    """(fq - wf)^2 in float32, in place: fq (and so fq.float()) is a fresh fake-quant result."""
    return fq.float().sub_(wf).square_()


def _pick(errs: torch.Tensor, ratios=RATIOS) -> torch.Tensor:
    """Ratio per column of errs [R, ...]: the first (largest) among the minimal ones, so ties keep max."""
    return torch.tensor(ratios, dtype=torch.float32, device=errs.device)[errs.argmin(0)]


@torch.no_grad()
def run(session) -> None:
    recipe = session.recipe
    per_tensor = weight_granularity(recipe) == "tensor"
    for st in session.experts:
        t = st.target
        for p in t.projs:
            w = t.nk(p, full(t.param(p).detach()))
            amax = st.w_amax[p].to(w.device)
            step = max(1, _CHUNK_ELEMS // max(1, w[0].numel()))
            parts = []
            for s in range(0, w.shape[0], step):
                if per_tensor:
                    parts.append(amax[s:s + step] * _pick(tensor_errors(recipe, w[s:s + step], amax[s:s + step])))
                else:
                    parts.append(search_units(recipe, w[s:s + step], amax[s:s + step]))
            if per_tensor:
                st.w_amax[p] = torch.cat(parts).to(st.w_amax[p].device)
            else:
                st.group_amax[p] = torch.cat(parts)
    done = set()
    for name, st in session.linears.items():
        if not per_tensor:
            w = full(st.target.module.weight.detach())
            st.group_amax = search_units(recipe, w, st.w_amax.to(w.device))
            continue
        if name in done:
            continue
        group = [n for n in st.target.group if n in session.linears]
        done.update(group)
        errs = 0
        for n in group:  # one shared scale: the ratio minimizes the group's total error
            w = full(session.linears[n].target.module.weight.detach())
            errs = errs + tensor_errors(recipe, w, session.linears[n].w_amax.to(w.device)).cpu()
        r = _pick(errs)
        for n in group:
            session.linears[n].w_amax = session.linears[n].w_amax * r.to(session.linears[n].w_amax.device)
