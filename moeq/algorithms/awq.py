"""AWQ-style activation-aware scaling (Lin et al. 2023), folded into the model's own parameters.

For a weight W [N, K] consuming x [.., K]: W' = W * s (column k times s_k), x' = x / s, so
W' x' = W x in full precision while the quantization error changes. s is folded into what
produces x, so the export needs no extra tensor:
- a decoder layer's norm -> every module that receives its output (Linears, fused experts'
  first projection, and unquantized router-like 2-D weights, whose fold keeps the routing):
  one s [K] per norm. Consumers are found by storage: during the statistics pass each
  module's inputs are matched (data_ptr, numel) against the norm outputs of the current
  layer. A norm is folded only if every leaf module that received its output can be scaled.
- gated experts' up half -> down_proj (per expert s_e [I]) and a dense gated MLP's up_proj ->
  down_proj, when the activation is act(gate) * up (`fold.gate_is_linear_in_up`).

Statistic: per-channel mean |x| over the calibration rows (padding excluded). Search per
group: s = 1 (max calibration) and s = stat^alpha / sqrt(max * min) for alpha in GRID;
loss = sum over the group's quantized consumers of ||Q(W s) Qin(x / s) - W x||^2 on a
bounded random sample of input rows (NORM_ROWS per norm; EXPERT_ROWS routed rows per expert,
each expert's loss on its own rows, vectorized over experts) and OUT_ROWS weight rows per
expert (`awq_search.ConsumerLoss`). Q recomputes the weight amax from W s; Qin (static input scales)
the amax from x / s over the sample, approximating the layer amax calibration will see.
The down fold's effect on the up rows' quantization is not in its loss (AutoAWQ's
convention for the previous op). s = 1 wins ties, so a group's sample loss never exceeds
max's. Memory: the samples of every layer are kept until the search (E x EXPERT_ROWS rows
per experts projection, in the activations' dtype).

Files: `awq_stats.py` (the statistics pass: `Collector`, row samples), `awq_search.py` (the
candidate scales and their loss), this file (groups, folds, the check, the entry points).

Safety net: each decoder layer is run on one short calibration sequence before and after
its folds (unquantized); if the output moved by more than rounding (CHECK_TOL) the layer's
folds are reverted one group at a time and the culprits listed in `QuantReport.awq_skipped`.
Then every calibration statistic is reset and the normal max calibration runs on the
scaled model (`moeq.quantization.quantize`).

Streaming (`run_layer`): the same collection, search, folds and check for one decoder layer
on its recorded inputs, before the layer's calibration. torchrun: statistics (`Collector.
reduce`) and candidate losses (`search`) are summed over ranks and the check's error is the
largest over ranks, so every rank folds the same scales.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from torch import nn

from ..targets import is_experts_module
from . import fold
from .awq_search import DUO, ConsumerLoss, Group, search, weight_stat
from .awq_stats import Collector, layer_of, max_over_ranks

log = logging.getLogger("moeq")

CHECK_TOKENS = 64
# 90th percentile over tokens of |y' - y| / |y - x| (the layer's own contribution). Measured
# on the demo model: 3e-7 in fp32, 0.8e-2 to 1.0e-2 in bf16 (every scaled weight and the
# norm are rounded again); a missed consumer moves every token by far more (tests/algorithms/
# test_awq.py). A 16-bit false alarm only costs a fold: it is reverted.
CHECK_TOL = {torch.float32: 1e-4, torch.float64: 1e-4}
CHECK_TOL_16BIT = 3e-2


def _consumer_kind(m: nn.Module, k: int) -> str | None:
    if isinstance(m, nn.Linear):
        return "linear" if m.in_features == k else None
    if is_experts_module(m):
        return "experts" if fold.experts_nk(m, fold.first_proj(m)).shape[-1] == k else None
    w = getattr(m, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[-1] == k and not list(m.children()):
        return "router"
    return None


def norm_groups(c: Collector, skipped: dict) -> list[Group]:
    s, recipe = c.session, c.session.recipe
    quantized = {st.target.name: st for st in s.experts} | dict(s.linears)
    groups = []
    for name, lname in c.norms.items():
        norm, k = c.modules[name], c.modules[name].weight.shape[0]
        recv = c.receivers.get(name, set())
        consumers = [(n, c.modules[n], _consumer_kind(c.modules[n], k)) for n in sorted(recv)]
        bad = [n for n, m, kind in consumers if kind is None and not list(m.children())]
        consumers = [x for x in consumers if x[2] is not None]
        offset = fold.norm_offset(norm, k)
        why = (c.blocked.get(name) or (f"its output reaches {', '.join(bad)}, which cannot be scaled" if bad else None)
               or ("no quantized module receives its output" if not any(n in quantized for n, _, _ in consumers) else None)
               or ("not of the form n(x) * w or n(x) * (1 + w)" if offset is None else None))
        if why:
            skipped[name] = why
            continue
        losses, params = [], [norm.weight] + ([norm.bias] if isinstance(getattr(norm, "bias", None), torch.Tensor) else [])
        rows = {}  # the norm rows, padded once for all Linear consumers (their Qin(x / s) is computed once)
        for n, m, kind in consumers:
            params.append(getattr(m, fold.first_proj(m)) if kind == "experts" else m.weight)
            if n not in quantized:
                continue
            if kind == "experts":
                w = fold.experts_nk(m, fold.first_proj(m))
                losses.append(lambda w=w, smp=c.expert_rows[n]: ConsumerLoss(recipe, w, smp.padded()))
            else:
                losses.append(lambda w=m.weight, smp=c.norm_rows[name], rows=rows: ConsumerLoss(
                    recipe, w[None], rows.setdefault("x", smp.padded()), shared=rows.setdefault("q", {})))

        def apply(s, norm=norm, offset=offset, consumers=consumers):
            fold.fold_norm(norm, offset, s)
            for _, m, kind in consumers:
                fold.scale_columns(fold.experts_nk(m, fold.first_proj(m)) if kind == "experts" else m.weight, s)

        ws = [weight_stat(fold.experts_nk(m, fold.first_proj(m)) if kind == "experts" else m.weight[None]).mean(0)
              for n, m, kind in consumers if n in quantized] if DUO else []
        groups.append(Group(name, lname, c.norm_stat[name].mean()[0], losses, apply, params,
                            torch.stack(ws).mean(0) if ws else None))
    return groups


def down_groups(c: Collector, skipped: dict) -> list[Group]:
    recipe, groups = c.session.recipe, []
    for st in c.session.experts:
        t, m = st.target, st.target.module
        if t.name not in c.down_rows:
            continue
        if not fold.gate_is_linear_in_up(m):
            skipped[f"{t.name}.down_proj"] = "the experts' activation is not act(gate) * up"
            continue
        w, smp = fold.experts_nk(m, "down_proj"), c.down_rows[t.name]
        per = recipe.per_expert_input_scales
        bias = getattr(m, "gate_up_proj_bias", None) if getattr(m, "has_bias", False) else None

        def apply(s, m=m, bias=bias):
            gu = fold.experts_nk(m, "gate_up_proj")
            fold.scale_rows(gu[:, fold.up_rows(m, gu.shape[-2])], s)
            if bias is not None:
                fold.scale_rows(bias[:, fold.up_rows(m, bias.shape[-1]), None], s)
            fold.scale_columns(fold.experts_nk(m, "down_proj"), s)

        groups.append(Group(f"{t.name}.down_proj", layer_of(t.name, c.layers), c.down_stat[t.name].mean(),
                            [lambda w=w, smp=smp, per=per: ConsumerLoss(recipe, w, smp.padded(), per)], apply,
                            [m.gate_up_proj, m.down_proj] + ([bias] if bias is not None else []),
                            weight_stat(w) if DUO else None))
    for name, st in c.session.linears.items():
        parent_name = name.rpartition(".")[0]
        parent = c.modules.get(parent_name)
        up, gate = getattr(parent, "up_proj", None), getattr(parent, "gate_proj", None)
        down = st.target.module
        if name not in c.down_rows or not isinstance(up, nn.Linear) or not isinstance(gate, nn.Linear):
            continue
        if up.out_features != down.in_features:
            continue

        def apply(s, up=up, down=down):
            fold.scale_rows(up.weight, s)
            if up.bias is not None:
                fold.scale_rows(up.bias[:, None], s)
            fold.scale_columns(down.weight, s)

        groups.append(Group(name, layer_of(name, c.layers), c.down_stat[name].mean()[0],
                            [lambda w=down.weight, smp=c.down_rows[name]: ConsumerLoss(recipe, w[None], smp.padded())],
                            apply, [up.weight, down.weight] + ([up.bias] if up.bias is not None else []),
                            weight_stat(down.weight[None])[0] if DUO else None))
    return groups


class LayerCheck:
    """Inputs and output of every decoder layer on one short sequence, captured before any
    fold (`cap`: name -> [args, kwargs, output]); `error(layer)` reruns the layer and measures
    how far its output moved (the largest over ranks in a multi-process run)."""

    def __init__(self, layers: dict, cap: dict):
        self.layers, self.cap = layers, cap

    @classmethod
    @torch.no_grad()
    def capture(cls, model: nn.Module, layers: dict, ids: torch.Tensor) -> "LayerCheck":
        """One forward of `model` on ids records every layer's first call."""
        cap, handles = {}, []
        for name, layer in layers.items():
            def pre(m, args, kwargs, name=name):
                if name not in cap:
                    cap[name] = [tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args), dict(kwargs), None]

            def post(m, args, kwargs, out, name=name):
                if cap[name][2] is None:
                    cap[name][2] = _first(out).detach().clone()
            handles += [layer.register_forward_pre_hook(pre, with_kwargs=True),
                        layer.register_forward_hook(post, with_kwargs=True)]
        try:
            model(input_ids=ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return cls(layers, cap)

    @torch.no_grad()
    def error(self, name: str) -> float:
        args, kwargs, ref = self.cap[name]
        y = _first(self.layers[name](*args, **kwargs)).float()
        x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
        base = ref.float() - x.float() if isinstance(x, torch.Tensor) and x.shape == ref.shape else ref.float()
        err = (y - ref.float()).norm(dim=-1) / base.norm(dim=-1).clamp_min(1e-30)
        return max_over_ranks(float(torch.quantile(err.flatten(), 0.9)))


def _first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def _check_ids(calib_data) -> torch.Tensor:
    item = next(iter(calib_data))
    ids = item if isinstance(item, torch.Tensor) else item["input_ids"]
    mask = None if isinstance(item, torch.Tensor) else item.get("attention_mask")
    row = ids[0] if mask is None else ids[0][mask[0].bool()]
    return row[:CHECK_TOKENS].reshape(1, -1)


@torch.no_grad()
def run(session, calibrate, calib_data, report) -> None:
    """calibrate(): one calibration pass over calib_data through the session's hooks.
    Folds in place; fills report.awq (group -> alpha (None: s = 1 kept), loss, loss_max,
    check: the layer check's error after the folds) and report.awq_skipped (name -> why)."""
    model = session.model
    c = Collector(session)
    emb = model.get_input_embeddings()
    check = LayerCheck.capture(model, c.layers, _check_ids(calib_data).to(emb.weight.device))
    _collect(c, calibrate)
    fold_layers(c, check, report)
    session.reset_statistics()


@torch.no_grad()
def run_layer(session, name: str, layer: nn.Module, hidden: list, masks: list, calls: list, report,
              device=None) -> list[torch.Tensor]:
    """AWQ for one decoder layer on its recorded inputs (streaming quantization): hidden[b] the
    layer's input for batch b, masks[b] its token mask or None, calls[b] the recorded
    (_, args, kwargs). The check runs on the first batch. Returns the parameters the kept folds
    rewrote (the streaming export writes these from memory, not from the checkpoint)."""
    move = (lambda h: h) if device is None else (lambda h: h.to(device))  # noqa: E731
    _, args, kwargs = calls[0]
    h0 = move(hidden[0])
    check = LayerCheck({name: layer}, {name: [(h0, *args), dict(kwargs), _first(layer(h0, *args, **kwargs)).clone()]})

    def forwards():
        try:
            for h, m, (_, args, kwargs) in zip(hidden, masks, calls):
                session.batch.token_mask = m
                layer(move(h), *args, **kwargs)
        finally:
            session.batch.token_mask = None

    c = Collector(session, {name: layer})
    _collect(c, forwards)
    edited = fold_layers(c, check, report)
    session.reset_statistics()
    return edited


def _collect(c: Collector, forwards) -> None:
    c.attach()
    try:
        forwards()
    finally:
        c.detach()
    c.reduce()


@torch.no_grad()
def fold_layers(c: Collector, check: LayerCheck, report) -> list[torch.Tensor]:
    """Search and fold every group the collected statistics allow, layer by layer, each layer's
    folds checked (`LayerCheck`) and reverted one group at a time if its output moved. Fills
    report.awq / report.awq_skipped; returns the parameters the kept folds rewrote."""
    skipped = {}
    groups = norm_groups(c, skipped) + down_groups(c, skipped)
    by_layer = defaultdict(list)
    for g in groups:
        by_layer[g.layer].append(g)
    edited = {}
    for lname, gs in by_layer.items():
        if lname not in check.cap or check.cap[lname][2] is None:
            skipped.update({g.name: "its layer did not run on the check sequence" for g in gs})
            continue
        tol = CHECK_TOL.get(next(p.dtype for p in gs[0].params), CHECK_TOL_16BIT)
        if check.error(lname) > tol / 10:
            skipped.update({g.name: "its layer is not deterministic, the fold cannot be checked" for g in gs})
            continue
        for g in gs:
            g.s = search(g)
        for g in [g for g in gs if g.result["alpha"] is None]:  # s = 1: nothing to fold
            report.awq[g.name] = {**g.result, "check": 0.0}
        gs = [g for g in gs if g.result["alpha"] is not None]
        saved_params = list({id(p): p for g in gs for p in g.params}.values())
        saved = {id(p): p.detach().clone() for p in saved_params}
        for g in gs:
            g.apply(g.s)
        kept = gs
        if gs and check.error(lname) > tol:
            kept = []  # revert all, then keep the groups that pass with the ones kept before them
            for g in gs:
                for p in saved_params:
                    p.copy_(saved[id(p)])
                for k in kept + [g]:
                    k.apply(k.s)
                err = check.error(lname)
                if err <= tol:
                    kept.append(g)
                    continue
                skipped[g.name] = f"the folded layer's output moved by {err:.1e} (> {tol:g}): a consumer moeq cannot see"
                log.warning("AWQ: %s not folded: %s", g.name, skipped[g.name])
            for p in saved_params:
                p.copy_(saved[id(p)])
            for k in kept:
                k.apply(k.s)
        err = check.error(lname) if kept else 0.0
        for k in kept:
            report.awq[k.name] = {**k.result, "check": err}
            edited.update({id(p): p for p in k.params})
    report.awq_skipped.update(skipped)
    return list(edited.values())
