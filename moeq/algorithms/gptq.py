"""GPTQ on fused experts, vectorized over experts: per-expert Hessians from exactly the rows
routed to each expert, and error-compensated column-wise quantization of the stacked weight.

Hessians: H_e = X_e^T X_e (float32 [E, K, K] per projection) where X_e are the rows the
expert's QUANTIZED matmul multiplies (for gate_up the fake-quant hidden states of the tokens
routed to e, for down the fake-quant activated intermediate of e), so W4A4 weights are
fitted to the inputs they will see. Layer-sequential (`run`): after max calibration and
finalize, decoder layer i runs on the outputs of layers 0..i-1, already GPTQ-quantized, so
each layer corrects the error that reaches it (the layer inputs are recorded once by
`layer_capture`; two runs of each layer in all). Within the layer being solved, weights
stay unquantized (its states' mode "inputs": inputs fake-quantized, weights as they are),
as in the reference sequential pipelines: a down projection is fitted to the activations
of the gate/up projection GPTQ is about to approximate, not to its round-to-nearest ones. The rows come from the interception
(`ExpertsState.sinks`, fed in quantize mode), which knows each row's expert under eager,
batched_mm and grouped_mm alike; padding tokens are dropped as in calibration. A dense
Linear is the same code with E = 1.

Quantization (Frantar et al. 2022, the reference implementation's order of operations):
dead input channels (H_kk = 0) are zeroed, dampening PERCDAMP * mean(diag H) per expert, the
upper Cholesky factor of H^-1, blocks of 128 columns with lazy batch updates, optional
act-order (columns by decreasing H_kk, per expert). Scales are fixed BEFORE the column
loop, from the original weight (or the ratios `mse` chose): `state.group_amax` /
`state.w_amax`. Each column is fake-quantized with its unit's fixed scale in the
parameter's dtype, so the dequantized result written back into the parameter quantizes,
round-to-nearest with the same scales, to exactly the GPTQ codes: fake quant in memory
and export both reproduce them (tests/algorithms/test_gptq.py checks this bit-exactly).
Experts that saw no calibration rows keep their weights (round-to-nearest) and are listed
in `QuantReport.rtn_fallback`.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from ..calibration_stats import full
from ..layer_capture import _Stop, capture_calls, decoder_layers, layer_output
from ..quantizer import fake_quant_weight_scaled, unit_amax, weight_granularity, weight_scales

log = logging.getLogger("moeq")

BLOCK = 128
PERCDAMP = 0.1  # of mean(diag H); 0.01 (the paper's) overfits experts that see few rows, see design.md
_HESSIAN_CHUNK_ELEMS = 1 << 24  # padded [experts, rows, K] buffer per accumulation step
_SOLVE_CHUNK_ELEMS = 1 << 24  # experts per solve: ~ (N*K + 3*K*K) floats each


@torch.no_grad()
def add_rows(H: torch.Tensor, count: torch.Tensor, x: torch.Tensor, ids: torch.Tensor | None,
             valid: torch.Tensor | None = None) -> None:
    """H [E, K, K] += X_e^T X_e for the rows x [S, K] with expert ids [S] (None: all rows
    belong to expert 0, a dense Linear); count [E] += rows per expert. Rows are sorted by
    expert and padded into [experts, max rows, K] so one bmm serves a chunk of experts."""
    x = x.float()
    if ids is None:
        H[0].addmm_(x.T, x)
        count[0] += x.shape[0]
        return
    if valid is not None:
        x, ids = x[valid], ids[valid]
    if x.shape[0] == 0:
        return
    E, K = H.shape[0], H.shape[-1]
    c = torch.bincount(ids, minlength=E)
    count += c
    order = torch.argsort(ids, stable=True)
    ids_s, xs = ids[order], x[order]
    pos = torch.arange(ids_s.numel(), device=x.device) - (torch.cumsum(c, 0) - c)[ids_s]
    c_cpu = c.cpu()
    M = int(c_cpu.max())
    step = max(1, _HESSIAN_CHUNK_ELEMS // max(1, M * K))
    for s in range(0, E, step):
        if int(c_cpu[s:s + step].sum()) == 0:
            continue
        sel = (ids_s >= s) & (ids_s < s + step)
        buf = x.new_zeros(min(step, E - s), M, K)
        buf[ids_s[sel] - s, pos[sel]] = xs[sel]
        H[s:s + step].baddbmm_(buf.transpose(1, 2), buf)


class Hessians:
    """The sink one state feeds: H[proj] [E, K, K] and rows[proj] [E]."""

    def __init__(self, dims: dict[str, tuple[int, int]], device):
        self.H = {p: torch.zeros(E, K, K, dtype=torch.float32, device=device) for p, (E, K) in dims.items()}
        self.rows = {p: torch.zeros(E, dtype=torch.int64, device=device) for p, (E, K) in dims.items()}

    def __call__(self, proj, x, ids, valid):
        add_rows(self.H[proj], self.rows[proj], x, None if ids is None else ids.to(x.device), valid)


def attach_hessians(session, states) -> None:
    """A Hessians sink on each state (ExpertsState / LinearState), kept in session.hessians."""
    for st in states:
        t = st.target
        if hasattr(t, "projs"):
            h = Hessians({p: (t.num_experts, t.nk(p).shape[-1]) for p in t.projs}, t.param(t.projs[0]).device)
        else:
            w = t.module.weight
            h = Hessians({"weight": (1, w.shape[1])}, w.device)
        st.sinks.append(h)
        session.hessians[t.name] = h


def _inverse_cholesky(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 per expert; dampening raised x10 (up to 3 times) for an
    expert whose H is not positive definite after the standard 1%."""
    damp = PERCDAMP * H.diagonal(dim1=1, dim2=2).mean(1)
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    for attempt in range(4):
        L, info = torch.linalg.cholesky_ex(H + damp[:, None, None] * eye)
        if not bool((info != 0).any()):
            break
        damp = torch.where(info != 0, damp * 10, damp)
    else:
        raise RuntimeError("GPTQ: a Hessian stayed singular after 1000x dampening; use algorithm='mse' or 'max'")
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def solve(w: torch.Tensor, H: torch.Tensor, quant_col, block: int = BLOCK, act_order: bool = False) -> torch.Tensor:
    """GPTQ for a stack of experts. w [E, N, K] float32, H [E, K, K] float32 (each with some
    rows), quant_col(col [E, N], j [E] original column index) -> fake-quant col [E, N].
    Returns the fake-quant weights [E, N, K] (float32 holding the quantized values)."""
    E, N, K = w.shape
    W, H = w.clone(), H.clone()
    diag = H.diagonal(dim1=1, dim2=2)
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)
    W.masked_fill_(dead[:, None, :], 0.0)
    perm = torch.arange(K, device=w.device).expand(E, K)
    if act_order:
        perm = torch.argsort(diag, dim=1, descending=True, stable=True)
        W = W.gather(2, perm[:, None, :].expand(E, N, K))
        H = H.gather(1, perm[:, :, None].expand(E, K, K)).gather(2, perm[:, None, :].expand(E, K, K))
    Hinv = _inverse_cholesky(H)
    Q = torch.zeros_like(W)
    finite = torch.ones((), dtype=torch.bool, device=w.device)  # every column (quant_col checks nothing)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, :, i1:i2].transpose(1, 2).contiguous()  # [E, B, N]: each column contiguous
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = W1[:, i]
            q = quant_col(col, perm[:, i1 + i])
            Q1[:, i] = q
            err = (col - q) / Hinv1[:, i, i][:, None]
            W1[:, i + 1:] -= Hinv1[:, i, i + 1:, None] * err[:, None, :]  # (column i itself is done)
            Err1[:, i] = err
        finite &= torch.isfinite(W1).all()  # each column as it was quantized (not updated after)
        Q[:, :, i1:i2] = Q1.transpose(1, 2)
        W[:, :, i2:] -= torch.bmm(Err1.transpose(1, 2), Hinv[:, i1:i2, i2:])
    if not bool(finite):
        raise ValueError("GPTQ: a column to quantize holds NaN or Inf (non-finite weights or calibration inputs); "
                         "check the model's weights, or use algorithm='max'")
    if act_order:
        Q = Q.gather(2, torch.argsort(perm, dim=1)[:, None, :].expand(E, N, K))
    return Q


def column_quantizer(recipe, dtype, amax: torch.Tensor, group_amax: torch.Tensor | None, k: int):
    """quant_col for `solve`: one column [E, N] fake-quantized in `dtype` with the fixed
    scale of its unit. The scales of every unit are computed once (`weight_scales` from
    group_amax [E, N, K/g], or amax [E] for per-tensor schemes) and gathered at column j's
    unit: bit for bit the whole-tensor fake quant's values (tests/algorithms/test_gptq.py)."""
    s = weight_scales(recipe, amax, group_amax, dtype)  # [E, N, U] or [E, 1, 1]
    g = k // s.shape[-1]
    s_t = s.transpose(1, 2).contiguous()  # [E, U, N|1]: one unit's scales contiguous
    experts = torch.arange(s.shape[0], device=s.device)

    def quant_col(col: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        sc = s_t[experts, j // g]  # [E, N|1]
        return fake_quant_weight_scaled(recipe, col.to(dtype), sc).float()

    return quant_col


def quantize_stack(recipe, w_nk: torch.Tensor, H: torch.Tensor, rows: torch.Tensor, amax: torch.Tensor,
                   group_amax: torch.Tensor | None, act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ over the experts of w_nk [E, N, K] that saw rows (rows [E] > 0), in expert
    chunks. Returns (new weights [E, N, K] in w_nk's dtype: the others unchanged, ids of the
    experts left to round-to-nearest)."""
    E, N, K = w_nk.shape
    out = w_nk.clone()
    seen = torch.nonzero(rows > 0).flatten().tolist()
    step = max(1, _SOLVE_CHUNK_ELEMS // max(1, N * K + 3 * K * K))
    for s in range(0, len(seen), step):
        ids = torch.tensor(seen[s:s + step], device=w_nk.device)
        ga = None if group_amax is None else group_amax[ids].to(w_nk.device)
        qc = column_quantizer(recipe, w_nk.dtype, amax[ids].to(w_nk.device), ga, K)
        out[ids] = solve(w_nk[ids].float(), H[ids].to(w_nk.device), qc, act_order=act_order).to(w_nk.dtype)
    unseen = torch.nonzero(rows == 0).flatten().tolist()
    return out, unseen


@torch.no_grad()
def solve_attached(session, states, report, act_order: bool = False) -> None:
    """GPTQ for `states` from the Hessians their sinks collected; the sinks are removed."""
    from ..quantization import _world_size, all_reduce_

    recipe = session.recipe
    per_tensor = weight_granularity(recipe) == "tensor"
    linears = []
    for st in states:
        t = st.target
        h = session.hessians.pop(t.name)
        st.sinks.remove(h)
        if _world_size() > 1:  # torchrun: every rank saw its own batches; all solve the summed Hessians alike
            import torch.distributed as dist

            for x in [*h.H.values(), *h.rows.values()]:
                all_reduce_(x, dist.ReduceOp.SUM)
        if st.cache is not None:  # fake-quant weights cached by the passes before (param.data hides the edit)
            st.cache.clear()
        if hasattr(t, "projs"):
            fallback = set()
            for p in t.projs:
                param = t.param(p)
                w = t.nk(p, full(param.detach()))
                if not per_tensor and p not in st.group_amax:
                    st.group_amax[p] = unit_amax(recipe, w)  # scales fixed from the original weight
                new, unseen = quantize_stack(recipe, w, h.H[p], h.rows[p], st.w_amax[p], st.group_amax.get(p), act_order)
                t.nk(p, param.data).copy_(new)
                fallback.update(unseen)
            if fallback:
                report.rtn_fallback[t.name] = sorted(fallback)
        else:
            w = full(t.module.weight.detach())
            if not per_tensor and st.group_amax is None:
                st.group_amax = unit_amax(recipe, w)
            linears.append((st, h, w))
    solve_linears(recipe, linears, report, act_order)


def solve_linears(recipe, linears: list, report, act_order: bool = False) -> None:
    """GPTQ for Linears, (state, Hessians, full weight [N, K]) each: those of one shape, dtype and
    device as one stack (E = their number), so one column loop serves them all (on the demo 25 of
    the 33 solves are Linears, each ~50 ms of per-column overhead alone). The solve is independent
    along E (elementwise ops, per-matrix Cholesky and bmm), so the weights are those of one solve
    per Linear (tests/algorithms/test_gptq.py checks it bit for bit)."""
    per_tensor = weight_granularity(recipe) == "tensor"
    groups: dict[tuple, list] = {}
    for st, h, w in linears:
        groups.setdefault((tuple(w.shape), w.dtype, w.device), []).append((st, h, w))
    fallback = set()
    for group in groups.values():
        n, k = group[0][2].shape
        step = max(1, _SOLVE_CHUNK_ELEMS // max(1, n * k + 3 * k * k))  # stacks bounded as quantize_stack's chunks
        for c in range(0, len(group), step):
            members = group[c:c + step]
            dev = members[0][2].device
            w = _stack([m[2][None] for m in members])
            H = _stack([h.H["weight"].to(dev) for _, h, _ in members])
            rows = _stack([h.rows["weight"].to(dev) for _, h, _ in members])
            amax = _stack([st.w_amax.reshape(1).to(dev) for st, _, _ in members])
            ga = None if per_tensor else _stack([st.group_amax[None].to(dev) for st, _, _ in members])
            new, unseen = quantize_stack(recipe, w, H, rows, amax, ga, act_order)
            for (st, _, _), q in zip(members, new):
                st.target.module.weight.data.copy_(q)
            fallback.update(members[i][0].target.name for i in unseen)
    for st, _, _ in linears:  # in the states' order
        if st.target.name in fallback:
            report.rtn_fallback[st.target.name] = [0]


def _stack(ts: list) -> torch.Tensor:
    """[1, ...] tensors -> [len, ...] (a lone one as it is: no copy of a large weight)."""
    return ts[0] if len(ts) == 1 else torch.cat(ts)


@torch.no_grad()
def collect_and_solve(session, states, forwards, report, act_order: bool = False) -> None:
    """GPTQ for the finalized `states`: Hessian sinks attached and the states in mode "inputs"
    (inputs fake-quantized, weights as they are) while forwards() runs the calibration batches
    through them, then the solve. forwards() sets session.batch.token_mask per batch."""
    attach_hessians(session, states)
    for st in states:
        st.mode = "inputs"
    try:
        forwards()
    finally:
        session.batch.token_mask = None
        for st in states:
            st.mode = "quantize"
    solve_attached(session, states, report, act_order)


def solve_layer(session, states, layer, hidden: list, masks: list, calls: list, report, act_order: bool = False,
                device=None) -> None:
    """`collect_and_solve` for the states of one decoder layer, run on `hidden` (one tensor per
    batch; masks: its token mask or None; calls: the layer's recorded (_, args, kwargs) per
    batch; device: where to move each hidden tensor, None = where it is). Shared by `run` and
    streaming quantization."""
    def forwards():
        for h, m, (_, args, kwargs) in zip(hidden, masks, calls):
            session.batch.token_mask = m
            layer(h if device is None else h.to(device), *args, **kwargs)

    collect_and_solve(session, states, forwards, report, act_order)


@torch.no_grad()
def run(session, report, batches: list, act_order: bool = False, progress: bool = False) -> None:
    """Layer-sequential GPTQ on the finalized (fake-quant) model. Decoder layer by layer, in
    order: its modules' Hessians from the rows their quantized matmuls multiply when the
    layer runs on the outputs of the layers before it (already GPTQ-quantized), then GPTQ
    for them, then the layer runs again to give the next layer its inputs. Modules outside
    the decoder layers (or every module, where no layer list is found) get theirs from one
    pass of the whole quantized model at the end."""
    model = session.model
    was_training = model.training
    model.eval()
    try:
        _run(session, report, batches, act_order, progress)
    finally:
        model.train(was_training)
    n = sum(len(v) for v in report.rtn_fallback.values())
    if n:
        msg = f"GPTQ: {n} experts/modules saw no calibration rows and are quantized round-to-nearest (rtn_fallback)"
        report.warnings.append(msg)
        log.warning(msg)


def _run(session, report, batches, act_order, progress) -> None:
    from ..quantization import batch_mask

    model = session.model
    states = [*session.experts, *session.linears.values()]
    masks = [batch_mask(b, i) for i, b in enumerate(batches)]
    batches = [b for b, m in zip(batches, masks) if m is not False]
    masks = [m for m in masks if m is not False]
    try:
        lname, layers = decoder_layers(model)
    except ValueError:
        lname, layers = "", []
    groups = [[st for st in states if st.target.name.startswith(f"{lname}.{i}.")] for i in range(len(layers))]
    in_layers = {id(st) for g in groups for st in g}
    rest = [st for st in states if id(st) not in in_layers]
    last = max((i for i, g in enumerate(groups) if g), default=-1)
    if last >= 0:
        def run_batches():
            for b in batches:
                try:
                    model(**b, use_cache=False)
                except _Stop:
                    pass

        calls = capture_calls(layers, run_batches)
        hidden = [c[0] for c in calls[0]]
        for i in tqdm(range(last + 1), desc="GPTQ layers", disable=not progress, unit="layer"):
            if groups[i]:
                solve_layer(session, groups[i], layers[i], hidden, masks, calls[i], report, act_order)
            if i < last:
                hidden = [layer_output(layers[i](h, *args, **kwargs)) for h, (_, args, kwargs) in zip(hidden, calls[i])]
    if rest:
        def forwards():
            for b, m in zip(batches, masks):
                session.batch.token_mask = m
                model(**b, use_cache=False)

        collect_and_solve(session, rest, forwards, report, act_order)
