"""Shared pieces of the algorithm tests: a spy on GPTQ's Hessians and the routed rows of one
experts module, recorded by the test itself."""

from __future__ import annotations

import torch

from moeq.algorithms import gptq

from quantize.helpers import fresh, gate_ref, tm  # noqa: F401


class HessianSpy:
    """Copies of every module's Hessians (and row counts) taken just before GPTQ solves them
    (`seen[name] = (H per proj, rows per proj)`), and which modules collect theirs right now."""

    def __init__(self, monkeypatch):
        self.seen, self.collecting = {}, set()
        attach, solve = gptq.attach_hessians, gptq.solve_attached

        def attach_spy(session, states):
            self.collecting |= {st.target.name for st in states}
            return attach(session, states)

        def solve_spy(session, states, report, act_order=False):
            for st in states:
                h = session.hessians[st.target.name]
                self.seen[st.target.name] = ({p: H.clone() for p, H in h.H.items()},
                                             {p: c.clone() for p, c in h.rows.items()})
                self.collecting.discard(st.target.name)
            return solve(session, states, report, act_order)

        monkeypatch.setattr(gptq, "attach_hessians", attach_spy)
        monkeypatch.setattr(gptq, "solve_attached", solve_spy)


def record_calls(module, name: str | None = None, spy: HessianSpy | None = None) -> tuple[list, object]:
    """(list of (hidden, top_k_index) per experts call, hook handle); with a spy, only the
    calls made while module `name` collects its Hessians."""
    calls = []

    def pre(_m, args, kwargs):
        if spy is not None and name not in spy.collecting:
            return
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
