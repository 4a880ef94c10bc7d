"""AWQ's statistics pass (see awq.py): which norm feeds which modules, found by storage, and
the per-channel mean |x| and row samples of every group's inputs, per expert where routed.

`Collector` hooks the decoder layers (or the one layer streaming passes) and the states'
sinks; `reduce` sums the statistics over ranks in a multi-process run. `Sample` keeps a
uniform random sample of rows per expert (each rank samples its own rows).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

NORM_ROWS = 256  # sampled norm-output rows per norm
EXPERT_ROWS = 32  # sampled routed rows per expert (and per dense down_proj: NORM_ROWS)


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


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    from ..quantization import _world_size, all_reduce_

    if _world_size() > 1:
        import torch.distributed as dist

        all_reduce_(t, dist.ReduceOp.SUM)
    return t


def max_over_ranks(x: float) -> float:
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
                sum_over_ranks(stats[name].sum)
                sum_over_ranks(stats[name].rows)

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
