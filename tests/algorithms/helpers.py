"""Shared pieces of the algorithm tests: a spy on GPTQ's Hessians and the routed rows of one
experts module, recorded by the test itself."""

from __future__ import annotations

import torch

from moeq.algorithms import gptq

from quantize.helpers import fresh, gate_ref, tm  # noqa: F401


def spy_hessians(monkeypatch) -> dict:
    """Copies of every module's Hessians (and row counts) taken just before GPTQ uses them."""
    seen = {}
    real = gptq.run

    def run(session, report, act_order=False):
        for name, h in session.hessians.items():
            seen[name] = ({p: H.clone() for p, H in h.H.items()}, {p: c.clone() for p, c in h.rows.items()})
        return real(session, report, act_order)

    monkeypatch.setattr(gptq, "run", run)
    return seen


def record_calls(module) -> tuple[list, object]:
    """(list of (hidden, top_k_index) per experts call, hook handle)."""
    calls = []

    def pre(_m, args, kwargs):
        vals = list(args) + list(kwargs.values())
        calls.append((vals[0].detach().clone(), vals[1].detach().clone()))

    return calls, module.register_forward_pre_hook(pre, with_kwargs=True)


def unfused(mod):
    """[E, N, K] views of the first and down projections."""
    first = "gate_up_proj" if mod.has_gate else "up_proj"
    nk = (lambda w: w.transpose(-1, -2)) if mod.is_transposed else (lambda w: w)
    return nk(getattr(mod, first).detach()).clone(), nk(mod.down_proj.detach()).clone()


@torch.no_grad()
def routed_rows(mod, model_type, w1, calls, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e's inputs, built by hand: (hidden rows routed to e, act(x @ W1_e^T))."""
    xs = [x.reshape(-1, x.shape[-1])[(idx.reshape(x.reshape(-1, x.shape[-1]).shape[0], -1) == e).any(-1)]
          for x, idx in calls]
    x = torch.cat(xs).float()
    h = x @ w1[e].float().T
    b = getattr(mod, ("gate_up_proj" if mod.has_gate else "up_proj") + "_bias", None) if mod.has_bias else None
    if b is not None:
        h = h + b[e].float()
    return x, gate_ref(mod, model_type, h)
