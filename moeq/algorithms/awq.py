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
expert (`ConsumerLoss`). Q recomputes the weight amax from W s; Qin (static input scales)
the amax from x / s over the sample, approximating the layer amax calibration will see.
The down fold's effect on the up rows' quantization is not in its loss (AutoAWQ's
convention for the previous op). s = 1 wins ties, so a group's sample loss never exceeds
max's. Memory: the samples of every layer are kept until the search (E x EXPERT_ROWS rows
per experts projection, in the activations' dtype).

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
from dataclasses import dataclass, field

import torch
from torch import nn

from ..calibration_stats import abs_amax
from ..quantizer import fake_quant_input, fake_quant_weight, input_is_static, input_scale_param
from ..targets import is_experts_module
from . import fold

log = logging.getLogger("moeq")

GRID = tuple(i / 20 for i in range(20))  # alpha in [0, 1), AutoAWQ's grid
DUO = False  # True: s = x^alpha / w^(1 - alpha) (AutoAWQ's duo scaling; measured no better on the demo)
NORM_ROWS = 256  # sampled norm-output rows per norm
EXPERT_ROWS = 32  # sampled routed rows per expert (and per dense down_proj: NORM_ROWS)
OUT_ROWS = 64  # weight rows per expert the loss is estimated on
CHECK_TOKENS = 64
# 90th percentile over tokens of |y' - y| / |y - x| (the layer's own contribution). Measured
# on the demo model: 3e-7 in fp32, 0.8e-2 to 1.0e-2 in bf16 (every scaled weight and the
# norm are rounded again); a missed consumer moves every token by far more (tests/algorithms/
# test_awq.py). A 16-bit false alarm only costs a fold: it is reverted.
CHECK_TOL = {torch.float32: 1e-4, torch.float64: 1e-4}
CHECK_TOL_16BIT = 3e-2


class Sample:
    """A uniform random sample of the rows fed, up to `cap` per expert (E = 1: dense):
    every row gets a random key and the `cap` smallest keys per expert are kept."""

    def __init__(self, num_experts: int, cap: int, seed: int = 0):
        self.E, self.cap = num_experts, cap
        self.gen = torch.Generator().manual_seed(seed)
        self.x = self.ids = self.keys = None

    def add(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        if x.shape[0] == 0:
            return
        ids = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device) if ids is None else ids.long()
        keys = torch.rand(x.shape[0], generator=self.gen).to(x.device)
        if self.x is not None:
            x, ids, keys = torch.cat([self.x, x]), torch.cat([self.ids, ids]), torch.cat([self.keys, keys])
        order = torch.argsort(keys)
        order = order[torch.argsort(ids[order], stable=True)]
        c = torch.bincount(ids, minlength=self.E)
        pos = torch.arange(order.numel(), device=x.device) - (torch.cumsum(c, 0) - c)[ids[order]]
        keep = order[pos < self.cap]
        self.x, self.ids, self.keys = x[keep].detach().clone(), ids[keep], keys[keep]

    def padded(self) -> torch.Tensor:
        """float32 [E, M, K], rows of expert e first, zero rows after (zero rows add no loss)."""
        c = torch.bincount(self.ids, minlength=self.E)
        M = int(c.max())
        out = self.x.new_zeros(self.E, M, self.x.shape[-1], dtype=torch.float32)
        order = torch.argsort(self.ids, stable=True)
        ids = self.ids[order]
        pos = torch.arange(ids.numel(), device=ids.device) - (torch.cumsum(c, 0) - c)[ids]
        out[ids, pos] = self.x[order].float()
        return out


class MeanAbs:
    """Per-channel mean |x| per expert: sum [E, K] and rows [E]."""

    def __init__(self):
        self.sum = self.rows = None

    def add(self, x: torch.Tensor, ids: torch.Tensor | None, E: int = 1) -> None:
        ids = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device) if ids is None else ids.long()
        if self.sum is None:
            self.sum = torch.zeros(E, x.shape[-1], dtype=torch.float32, device=x.device)
            self.rows = torch.zeros(E, dtype=torch.float32, device=x.device)
        self.sum.index_add_(0, ids, x.float().abs())
        self.rows.index_add_(0, ids, torch.ones_like(ids, dtype=torch.float32))

    def mean(self) -> torch.Tensor:
        """[E, K]; experts without rows get ones (their s stays 1)."""
        m = self.sum / self.rows.clamp_min(1)[:, None]
        return torch.where(self.rows[:, None] > 0, m, torch.ones_like(m))


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
    total = _sum_over_ranks(total)
    i = int(torch.argmin(total))  # the first minimum: s = 1 wins ties
    g.result.update(loss_max=float(total[0]), loss=float(total[i]), alpha=cands[i][0])
    return cands[i][1]


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    from ..quantization import _world_size, all_reduce_

    if _world_size() > 1:
        import torch.distributed as dist

        all_reduce_(t, dist.ReduceOp.SUM)
    return t


def _max_over_ranks(x: float) -> float:
    from ..quantization import _world_size, all_reduce_

    if _world_size() == 1:
        return x
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64)
    all_reduce_(t, dist.ReduceOp.MAX)
    return float(t)


def blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Elements of every outermost nn.ModuleList (decoder layers, and those of a vision tower or
    MTP head alike), by name: the units a fold stays within and the safety check runs on. (Not
    `layer_capture.decoder_layers`, which picks the one list the model's forward loops over.)"""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and not any(name.startswith(p + ".") for p in out):
            out.update({f"{name}.{i}" if name else str(i): c for i, c in enumerate(m)})
    return out


def layer_of(name: str, layers: dict) -> str | None:
    return next((p for p in layers if name.startswith(p + ".")), None)


def _tensors(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a


class Collector:
    """Hooks and sinks of the statistics pass. Norms: a decoder layer's direct children whose
    class name holds "Norm" with a 1-D weight the size of their output's last dim. Every other
    module of the layer gets a pre-hook matching its input tensors against the layer's norm
    outputs by storage (`receivers`); the experts and Linear states' sinks give the routed rows."""

    def __init__(self, session, layers: dict[str, nn.Module] | None = None):
        self.session, model = session, session.model
        self.layers = blocks(model) if layers is None else layers
        self.modules = dict(model.named_modules())
        self.norms = {}  # name -> layer
        for lname, layer in self.layers.items():
            for cname, c in layer.named_children():
                w = getattr(c, "weight", None)
                if "norm" in type(c).__name__.lower() and isinstance(w, torch.Tensor) and w.dim() == 1:
                    self.norms[f"{lname}.{cname}"] = lname
        self.live: dict = {}  # (data_ptr, numel) -> (norm name, output): this layer's norm outputs
        self.receivers = defaultdict(set)
        self.blocked: dict[str, str] = {}
        self.norm_stat = defaultdict(MeanAbs)
        self.norm_rows = {n: Sample(1, NORM_ROWS) for n in self.norms}
        self.expert_rows = {st.target.name: Sample(st.target.num_experts, EXPERT_ROWS) for st in session.experts}
        self.down_stat = defaultdict(MeanAbs)
        self.down_rows = {}
        self.handles, self.sinks = [], []

    def attach(self) -> None:
        clear = lambda *a, **k: self.live.clear()  # noqa: E731
        for layer in self.layers.values():
            self.handles += [layer.register_forward_pre_hook(clear), layer.register_forward_hook(clear)]
        for name, layer in self.layers.items():
            for cname, c in layer.named_modules(prefix=name):
                if cname in self.norms:
                    self.handles.append(c.register_forward_hook(lambda m, a, out, n=cname: self._norm_out(n, out)))
                elif cname != name:
                    self.handles.append(c.register_forward_pre_hook(
                        lambda m, a, k, n=cname: self._received(n, a, k), with_kwargs=True, prepend=True))
        for st in self.session.experts:
            self._sink(st, lambda p, x, ids, valid, st=st: self._experts_rows(st, p, x, ids, valid))
        for name, st in self.session.linears.items():
            self._sink(st, lambda p, x, ids, valid, name=name: self._dense_rows(name, x))

    def _sink(self, st, f) -> None:
        st.sinks.append(f)
        self.sinks.append((st, f))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        for st, f in self.sinks:
            st.sinks.remove(f)
        self.handles, self.sinks = [], []
        self.live.clear()

    def reduce(self) -> None:
        """Multi-process: the mean |x| statistics summed over ranks (every rank runs every layer
        on its own batches, so each has the same statistics to reduce, in name order)."""
        for stats in (self.norm_stat, self.down_stat):
            for name in sorted(stats):
                _sum_over_ranks(stats[name].sum)
                _sum_over_ranks(stats[name].rows)

    @torch.no_grad()
    def _norm_out(self, name: str, out) -> None:
        if not isinstance(out, torch.Tensor):
            self.blocked[name] = f"returns {type(out).__name__}, not a tensor"
            return
        if out.shape[-1] != self.modules[name].weight.numel():
            self.blocked[name] = f"its weight ({self.modules[name].weight.numel()}) is not one per output channel"
            return
        if any(n == name for n, _ in self.live.values()):
            self.blocked[name] = "called more than once per layer forward"
        self.live[(out.data_ptr(), out.numel())] = (name, out)  # the reference keeps the address unique
        x = out.reshape(-1, out.shape[-1])
        valid = self.session.batch.valid_rows(out, name)
        x = x if valid is None else x[valid]
        self.norm_stat[name].add(x, None)
        self.norm_rows[name].add(x)

    def _received(self, name: str, args, kwargs) -> None:
        for t in _tensors(args, kwargs):
            hit = self.live.get((t.data_ptr(), t.numel()))
            if hit is not None:
                self.receivers[hit[0]].add(name)

    @torch.no_grad()
    def _experts_rows(self, st, proj, x, ids, valid) -> None:
        if valid is not None:
            x, ids = x[valid], ids[valid]
        if proj == st.target.projs[0]:
            self.expert_rows[st.target.name].add(x, ids)
        elif st.target.has_gate:
            self.down_stat[st.target.name].add(x, ids, st.target.num_experts)
            self.down_rows.setdefault(st.target.name, Sample(st.target.num_experts, EXPERT_ROWS)).add(x, ids)

    @torch.no_grad()
    def _dense_rows(self, name: str, x) -> None:
        if name.endswith("down_proj"):
            self.down_stat[name].add(x, None)
            self.down_rows.setdefault(name, Sample(1, NORM_ROWS)).add(x)


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
        return _max_over_ranks(float(torch.quantile(err.flatten(), 0.9)))


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
