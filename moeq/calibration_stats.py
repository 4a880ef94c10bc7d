"""Per-module calibration statistics and the quantized state derived from them.

Per-expert state is stacked: `in_amax[proj]` is [E] float32, `tokens` is [E] int64,
updated with vectorized scatter ops (no Python loop over experts). Statistics are
collected on the unquantized model (max calibration); `finalize` then computes the
weight amax per expert (gate and up halves separately, shared by the pair) and fixes the
static input scale parameters. Fake-quant weights are computed from the module's current
parameters at each call (`weight_fq`), so no second copy of the weights is kept and the
model can be moved, cast or sharded after quantization.
"""

from __future__ import annotations

import torch

from .fused import row_absmax
from .quantizer import fake_quant_input, fake_quant_weight, input_scale_param
from .recipes import Recipe
from .targets import ExpertsTarget, LinearTarget

# Elements of a fake-quant chunk of experts in finalize (fp32 temporaries ~ 4 x this).
_FQ_CHUNK_ELEMS = 1 << 23
# Bound on the [experts, tokens, N] intermediate of calibrate-all-experts mode.
_ALL_EXPERTS_CHUNK_ELEMS = 1 << 25


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of the whole parameter: a DTensor (FSDP2 keeps parameters sharded
    outside the forward) is gathered, a collective every rank runs in the same order."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def abs_amax(x: torch.Tensor, dims) -> torch.Tensor:
    """max |x| over dims, in float32, without materializing |x| (weights can be GBs)."""
    return torch.maximum(x.amax(dim=dims), -x.amin(dim=dims)).float()


class BatchContext:
    """What the current calibration batch says about its tokens, shared by all states of a
    session. token_mask: [tokens] bool (the batch's attention_mask flattened), or None when
    every token is real. Padding tokens never reach the statistics."""

    def __init__(self):
        self.token_mask: torch.Tensor | None = None

    def valid_rows(self, x: torch.Tensor, who: str) -> torch.Tensor | None:
        """The token mask for x [..., K] whose leading dims are the batch's tokens."""
        m = self.token_mask
        if m is None:
            return None
        rows = x.numel() // max(x.shape[-1], 1)
        if rows != m.numel():
            raise ValueError(f"{who}: its input has {rows} rows but the batch has {m.numel()} tokens, so moeq cannot tell "
                             f"which rows are padding; calibrate with unpadded batches (no attention_mask zeros)")
        return m


def _rows_to_ids(rows, n_rows: int, num_experts: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-mm offsets -> (expert id per row, valid mask); rows past offs[-1] are invalid."""
    offs = rows[1].to(torch.int64)
    ids = torch.searchsorted(offs, torch.arange(n_rows, device=device), right=True)
    valid = ids < num_experts
    return ids.clamp(max=num_experts - 1), valid


def _cached(cache: dict | None, proj: str, w: torch.Tensor, compute):
    """compute() (the fake quant of parameter `w`), kept in `cache` while w's storage, version,
    dtype, device and shape stay the same (cache None: computed at every call)."""
    if cache is None:
        return compute()
    key = (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))
    hit = cache.get(proj)
    if hit is not None and hit[0] == key:
        return hit[1]
    cache[proj] = (key, compute())
    return cache[proj][1]


class ExpertsState:
    def __init__(self, target: ExpertsTarget, recipe: Recipe):
        self.target, self.recipe = target, recipe
        w = target.param(target.projs[1])
        E = target.num_experts
        self.in_amax = {p: torch.zeros(E, dtype=torch.float32, device=w.device) for p in target.projs}
        self.tokens = torch.zeros(E, dtype=torch.int64, device=w.device)
        self.calls = 0
        # "calibrate": statistics, unquantized; "quantize": fake-quant weights and inputs;
        # "inputs": fake-quant inputs, weights as they are (GPTQ's Hessian pass, moeq.algorithms.gptq)
        self.mode = "calibrate"
        self.batch = BatchContext()  # replaced by the session's shared one
        self.stored_kn = target.is_transposed
        self.w_amax: dict[str, torch.Tensor] = {}
        self.gate_amax = self.up_amax = None
        self.weights_are_fake_quant = False  # moeq.load: the parameters already hold dequantized weights
        self.cache: dict | None = None
        self.in_param: dict[str, torch.Tensor] = {}
        # set by calibration algorithms (moeq.algorithms): fixed per-unit scale amax [E, N, K/g]
        self.group_amax: dict[str, torch.Tensor] = {}
        # callables (proj, x [S, K], expert ids [S], valid [S] | None) fed every routed row (GPTQ Hessians)
        self.sinks: list = []

    def reset_statistics(self) -> None:
        """Forget what calibration observed (AWQ's statistics pass before the real one)."""
        for a in self.in_amax.values():
            a.zero_()
        self.tokens.zero_()
        self.calls = 0

    @torch.no_grad()
    def observe(self, proj: str, xk: torch.Tensor, rows, valid_rows: torch.Tensor | None = None) -> None:
        """xk: the matmul input with K last; rows: ("one", e) | ("ids", [S]) | ("offs", offsets).
        valid_rows: [S] mask of real (token, expert) rows for "ids" (False = EP sentinel)."""
        kind, r = rows
        amax, first = self.in_amax[proj], proj == self.target.projs[0]
        if self.sinks:
            self.feed_rows(proj, xk, rows, valid_rows)
        if kind == "one":
            amax[r] = torch.maximum(amax[r], row_absmax(xk).amax())
            if first:
                self.tokens[r] += xk.numel() // max(xk.shape[-1], 1)
        else:
            per_row = row_absmax(xk.flatten(1)) if kind == "ids" else row_absmax(xk)
            if kind == "ids":
                ids = r.long()
                valid = valid_rows if valid_rows is not None and valid_rows.numel() == ids.numel() else None
                if valid is not None:  # where, not *: rows of EP sentinels may hold NaN garbage
                    per_row = torch.where(valid, per_row, 0.0)
            else:
                ids, valid = _rows_to_ids(rows, xk.shape[0], self.target.num_experts, xk.device)
                per_row = torch.where(valid, per_row, 0.0)
            amax.scatter_reduce_(0, ids, per_row, "amax")
            if first:
                ones = torch.ones_like(ids) if valid is None else valid.long()
                self.tokens.scatter_add_(0, ids, ones)
        self.calls += 1

    def feed_rows(self, proj: str, xk: torch.Tensor, rows, valid_rows) -> None:
        """The matmul's input rows [S, K] with their expert ids, to every sink."""
        kind, r = rows
        K = xk.shape[-1]
        valid = None
        if kind == "one":
            x = xk.reshape(-1, K)
            ids = torch.full((x.shape[0],), int(r), dtype=torch.int64, device=x.device)
        elif kind == "ids":
            ids = r.long()
            x = xk.reshape(ids.numel(), -1, K)
            per = x.shape[1]
            if valid_rows is not None and valid_rows.numel() == ids.numel():
                valid = valid_rows.repeat_interleave(per)
            x, ids = x.reshape(-1, K), ids.repeat_interleave(per)
        else:
            x = xk.reshape(-1, K)
            ids, valid = _rows_to_ids(rows, x.shape[0], self.target.num_experts, x.device)
        for sink in self.sinks:
            sink(proj, x, ids, valid)

    def _inputs(self, args, kwargs):
        """(hidden_states, routing indices or None) of an experts forward call."""
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        idx = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
        if not isinstance(hidden, torch.Tensor):
            return None, None
        tokens = hidden.numel() // hidden.shape[-1]
        ok = (isinstance(idx, torch.Tensor) and not idx.is_floating_point() and idx.dim() == 2
              and idx.shape[0] == tokens)
        return hidden, idx if ok else None

    @torch.no_grad()
    def before_forward(self, args, kwargs, calib_all_experts: bool):
        """Pre-hook work on the module's own inputs. Every row the first projection multiplies
        is a copy of a token of hidden_states (gathered per routed expert), so its statistics
        come from the tokens and the routing, and, with one layer-wide input scale, its fake
        quant is done once per token instead of once per (token, expert) pair: identical
        results, top_k times less work. Returns (args, kwargs, info for the intercept)."""
        hidden, idx = self._inputs(args, kwargs)
        info = {}
        if hidden is None:
            return args, kwargs, info
        first = self.target.projs[0]
        collecting = self.mode == "calibrate" or bool(self.sinks)  # sinks outside calibration: sequential GPTQ
        if collecting and self.batch.token_mask is not None:
            args, kwargs, info = self._drop_padding(args, kwargs, hidden, idx)
            hidden, idx = self._inputs(args, kwargs)
        if self.sinks and idx is not None and self.mode != "calibrate":
            info["valid_rows"] = (idx < self.target.num_experts).reshape(-1)
        if self.mode == "calibrate":
            if calib_all_experts:
                self.observe_all_experts(hidden)
            if idx is not None:
                self.observe_routed_tokens(hidden, idx)
                info["observed"] = True
                # expert-parallel sentinel ids (>= E): batched_mm clamps them to E - 1, so rows it
                # gathers per (token, k) carry this mask into the down projection's statistics
                info["valid_rows"] = (idx < self.target.num_experts).reshape(-1)
        elif self.recipe.input is not None and (self.in_param.get(first) is None or self.in_param[first].dim() == 0):
            prm = self.in_param.get(first)  # None: dynamic per-token scales (a row's copies quantize alike)
            xq = fake_quant_input(self.recipe, hidden, None if prm is None else prm.to(hidden.device))
            if "hidden_states" in kwargs:
                kwargs = {**kwargs, "hidden_states": xq}
            else:
                args = (xq,) + tuple(args[1:])
            info["quantized"] = True
        return args, kwargs, info

    def _drop_padding(self, args, kwargs, hidden, idx):
        """Calibration with an attention_mask: the experts run on the real tokens only (every
        per-token argument is indexed by the mask), so no implementation can mix padding into
        the statistics; `restore_output` puts the outputs back at their positions (zeros at
        padding, whose outputs the mask discards anyway)."""
        name = self.target.name
        mask = self.batch.valid_rows(hidden, name)
        if idx is None or hidden.dim() != 2:
            raise ValueError(f"{name}: cannot drop padding tokens from this experts call (hidden_states "
                             f"{tuple(hidden.shape)}, no [tokens, top_k] routing); calibrate with unpadded batches")
        T = hidden.shape[0]
        pick = lambda v: v[mask] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == T else v  # noqa: E731
        return tuple(pick(a) for a in args), {k: pick(v) for k, v in kwargs.items()}, {"restore": (mask, hidden)}

    @staticmethod
    def restore_output(output, info):
        """Post-hook counterpart of `_drop_padding`: outputs of the real tokens scattered back."""
        if "restore" not in info:
            return output
        mask, hidden = info["restore"]
        if not isinstance(output, torch.Tensor) or output.shape[0] != int(mask.sum()):
            raise ValueError("experts output does not have one row per real token; calibrate with unpadded batches")
        full = output.new_zeros((hidden.shape[0],) + tuple(output.shape[1:]))
        full[mask] = output
        return full

    @torch.no_grad()
    def observe_routed_tokens(self, hidden: torch.Tensor, idx: torch.Tensor) -> None:
        """First-projection statistics from the tokens and their routing (sentinel ids >= E,
        as expert parallelism uses, are ignored)."""
        E, first = self.target.num_experts, self.target.projs[0]
        x = hidden.reshape(-1, hidden.shape[-1])
        ids = idx.reshape(x.shape[0], -1).long()
        valid = ids < E
        per = (row_absmax(x).unsqueeze(1) * valid).flatten()
        ids = ids.clamp(max=E - 1).flatten()
        self.in_amax[first].scatter_reduce_(0, ids, per, "amax")
        self.tokens.scatter_add_(0, ids, valid.flatten().long())
        if self.sinks:  # every (token, routed expert) pair is one row of the first projection's input
            k = valid.shape[1]
            rows = x.unsqueeze(1).expand(x.shape[0], k, x.shape[1]).reshape(-1, x.shape[1])
            for sink in self.sinks:
                sink(first, rows, ids, valid.flatten())

    @torch.no_grad()
    def observe_all_experts(self, hidden: torch.Tensor) -> None:
        """Every expert's input statistics see every token (the routed output is unchanged)."""
        t, m = self.target, self.target.module
        first, down = t.projs
        x = hidden.reshape(-1, hidden.shape[-1])
        self.in_amax[first].clamp_(min=row_absmax(x).amax())
        w = t.nk(first)  # [E, N, K]
        bias = getattr(m, f"{first}_bias", None) if getattr(m, "has_bias", False) else None
        step = max(1, _ALL_EXPERTS_CHUNK_ELEMS // max(1, x.shape[0] * w.shape[1]))
        for s in range(0, t.num_experts, step):
            h = torch.matmul(x, w[s:s + step].transpose(-1, -2))  # [c, T, N]
            if bias is not None:
                h = h + bias[s:s + step].unsqueeze(1)
            h = m._apply_gate(h) if t.has_gate else m.act_fn(h)
            cur = self.in_amax[down][s:s + step]
            torch.maximum(cur, row_absmax(h.flatten(1)), out=cur)

    @torch.no_grad()
    def finalize(self, cache_fake_quant: bool = False) -> None:
        """Weight amax per expert (gate and up halves share the max) and the static input
        parameters. No weight copy is kept: the fake-quant forward computes each call's
        weights from the module's CURRENT parameters (so .to(), FSDP unsharding and in-place
        edits are followed); cache_fake_quant=True keeps them between calls (faster, one
        extra copy of the weights, recomputed when a parameter changes)."""
        t, r = self.target, self.recipe
        self.cache = {} if cache_fake_quant else None
        for p in t.projs:
            w = t.nk(p, full(t.param(p).detach()))
            amax = abs_amax(w, (1, 2))
            if p == t.projs[0] and t.has_gate:
                g, u = t.gate_up_rows(w.shape[1])
                self.gate_amax = abs_amax(w[:, g], (1, 2))
                self.up_amax = abs_amax(w[:, u], (1, 2))
                amax = torch.maximum(self.gate_amax, self.up_amax)  # one global scale per pair
            self.w_amax[p] = amax
            if r.input is not None:
                self.in_param[p] = input_scale_param(r, self.input_amax(p))
        self.mode = "quantize"

    @property
    def fq_weight(self) -> dict[str, torch.Tensor]:
        """The fake-quant weights of the module's current parameters (computed now; a view
        for inspection and tests, not something the forward keeps)."""
        return {p: self.weight_fq(p, self.target.param(p)) for p in self.target.projs} if self.w_amax else {}

    @torch.no_grad()
    def weight_fq(self, proj: str, w: torch.Tensor, expert=None) -> torch.Tensor:
        """Fake-quant of the stored weight `w` (the module's layout: [E, N, K], or [E, K, N]
        when transposed), or of its expert `expert` only; amax from calibration. Computed in
        expert chunks so fp32 temporaries stay bounded (bit-identical to one call)."""
        if self.weights_are_fake_quant:
            return w if expert is None else w[expert]
        t, r = self.target, self.recipe
        amax = self.w_amax[proj].to(w.device)
        ga = self.group_amax.get(proj)
        ga = None if ga is None else ga.to(w.device)
        if expert is not None:
            w_nk = w[expert].transpose(-2, -1) if t.is_transposed else w[expert]
            fq = fake_quant_weight(r, w_nk, amax[expert], None if ga is None else ga[expert]).to(w.dtype)
            return (fq.transpose(-2, -1) if t.is_transposed else fq).contiguous()

        def compute():
            w_nk = t.nk(proj, w.detach())
            fq = torch.empty_like(w_nk)
            step = max(1, _FQ_CHUNK_ELEMS // max(1, w_nk[0].numel()))
            for s in range(0, w_nk.shape[0], step):
                fq[s:s + step] = fake_quant_weight(r, w_nk[s:s + step], amax[s:s + step],
                                                   None if ga is None else ga[s:s + step])
            return t.from_nk(fq)

        return _cached(self.cache, proj, w, compute)

    def input_amax(self, proj: str) -> torch.Tensor:
        """Layer-shared input amax (max over experts), or per expert with the layer max
        filled in for experts that saw no tokens (never 0)."""
        a = self.in_amax[proj]
        layer = a.max()
        if not self.recipe.per_expert_input_scales:
            return layer
        return torch.where(a > 0, a, layer)

    def fake_quant_input(self, proj: str, xk: torch.Tensor, rows) -> torch.Tensor:
        if self.recipe.input is None:
            return xk
        prm = self.in_param.get(proj)
        if prm is None:  # dynamic input scheme: scales from the rows themselves
            return fake_quant_input(self.recipe, xk, None)
        prm = prm.to(xk.device)
        if prm.dim() > 0:
            kind, r = rows
            if kind == "one":
                prm = prm[r]
            else:
                ids = r.long() if kind == "ids" else _rows_to_ids(rows, xk.shape[0], self.target.num_experts, xk.device)[0]
                prm = prm[ids].reshape((-1,) + (1,) * (xk.dim() - 1))
        return fake_quant_input(self.recipe, xk, prm)


class LinearState:
    def __init__(self, target: LinearTarget, recipe: Recipe):
        self.target, self.recipe = target, recipe
        w = target.module.weight
        self.in_amax = torch.zeros((), dtype=torch.float32, device=w.device)
        self.calls = 0
        self.mode = "calibrate"
        self.batch = BatchContext()  # replaced by the session's shared one
        self.stored_kn = False
        self.w_amax: torch.Tensor | None = None
        self.weights_are_fake_quant = False
        self.cache: dict | None = None
        self.in_param: torch.Tensor | None = None
        self.shared_in_amax: torch.Tensor | None = None
        self.group_amax: torch.Tensor | None = None  # see ExpertsState.group_amax; [N, K/g]
        self.sinks: list = []  # see ExpertsState.sinks; called with proj "weight", ids None

    def reset_statistics(self) -> None:
        """See ExpertsState.reset_statistics."""
        self.in_amax.zero_()
        self.calls = 0

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        valid = self.batch.valid_rows(x, self.target.name)
        if valid is not None:
            x = x.reshape(-1, x.shape[-1])[valid]
        if x.numel():
            torch.maximum(self.in_amax, row_absmax(x).amax(), out=self.in_amax)
            for sink in self.sinks:
                sink("weight", x.reshape(-1, x.shape[-1]), None, None)
        self.calls += 1

    def feed(self, x: torch.Tensor) -> None:
        """The rows of x (padding dropped) to every sink, without statistics (quantize mode)."""
        valid = self.batch.valid_rows(x, self.target.name)
        x = x.reshape(-1, x.shape[-1])
        if valid is not None:
            x = x[valid]
        for sink in self.sinks:
            sink("weight", x, None, None)

    @torch.no_grad()
    def finalize(self, w_amax: torch.Tensor, in_amax: torch.Tensor, cache_fake_quant: bool = False) -> None:
        """w_amax / in_amax: shared over the sibling group (q/k/v, gate/up). No weight copy
        unless cache_fake_quant (see ExpertsState.finalize)."""
        self.w_amax, self.shared_in_amax = w_amax, in_amax
        self.cache = {} if cache_fake_quant else None
        if self.recipe.input is not None:
            self.in_param = input_scale_param(self.recipe, in_amax)
        self.mode = "quantize"

    @property
    def fq_weight(self) -> dict[str, torch.Tensor]:
        """See ExpertsState.fq_weight."""
        return {"weight": self.weight_fq("weight", self.target.module.weight)} if self.w_amax is not None else {}

    @torch.no_grad()
    def weight_fq(self, proj: str, w: torch.Tensor, expert=None) -> torch.Tensor:
        if self.weights_are_fake_quant:
            return w
        ga = None if self.group_amax is None else self.group_amax.to(w.device)
        return _cached(self.cache, proj, w, lambda: fake_quant_weight(self.recipe, w.detach(), self.w_amax.to(w.device),
                                                                      ga).to(w.dtype))

    def fake_quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.recipe.input is None:
            return x
        return fake_quant_input(self.recipe, x, None if self.in_param is None else self.in_param.to(x.device))
