"""`moeq.quantize`: find targets, calibrate through the unmodified forward, fake-quantize.

    report = moeq.quantize(model, "nvfp4", calib_data)   # in place; model(...) is now fake-quant

The model keeps its own forward and experts implementation; interception hooks stay
attached (they are what applies the fake-quant weights and inputs) and the session is
kept on `model.moeq_session` for export.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration_stats import BatchContext, ExpertsState, LinearState, abs_amax, full
from .interception import ExpertsIntercept, Hooks, LinearIntercept
from .kv_cache import AttentionState, KVIntercept, check_call
from .quantizer import input_is_static
from .recipes import Recipe, get_recipe
from .targets import Targets, find_targets

log = logging.getLogger("moeq")
SESSION_ATTR = "moeq_session"


@dataclass
class QuantReport:
    recipe: str
    quantized: list[str]
    excluded: list[str]
    tokens_per_expert: dict[str, list[int]]  # routed calibration tokens, per experts module
    never_routed: dict[str, list[int]]
    calib_tokens: int = 0
    calib_batches: int = 0
    calib_seconds: float = 0.0
    calib_all_experts: bool = False
    warnings: list[str] = field(default_factory=list)
    algorithm: str = "max"  # calibration algorithm (moeq.algorithms): max | awq | mse | gptq | combinations
    algorithm_seconds: float = 0.0  # the algorithm's own time (AWQ: its statistics pass too), not the max calibration
    rtn_fallback: dict[str, list[int]] = field(default_factory=dict)  # GPTQ: experts without rows, left to RTN
    awq: dict[str, dict] = field(default_factory=dict)  # AWQ: folded group -> alpha, loss, loss_max (alpha = 0)
    awq_skipped: dict[str, str] = field(default_factory=dict)  # AWQ: group not folded -> why

    def summary(self) -> str:
        n_never = sum(len(v) for v in self.never_routed.values())
        lines = [
            f"recipe {self.recipe}: {len(self.quantized)} modules quantized, {len(self.excluded)} excluded",
            f"calibration: {self.calib_tokens} tokens in {self.calib_batches} batches, {self.calib_seconds:.2f}s"
            + (" (all-experts statistics)" if self.calib_all_experts else ""),
            f"experts never routed: {n_never}"
            + "".join(f"\n  {k}: {v}" for k, v in self.never_routed.items() if v),
        ]
        return "\n".join(lines + self.algorithm_lines() + [f"warning: {w}" for w in self.warnings])

    def algorithm_lines(self) -> list[str]:
        """What the calibration algorithm did (none for max)."""
        if self.algorithm == "max":
            return []
        n_rtn = sum(len(v) for v in self.rtn_fallback.values())
        lines = [f"algorithm {self.algorithm}: {self.algorithm_seconds:.2f}s"
                 + (f", {n_rtn} round-to-nearest fallbacks (no calibration rows)" if n_rtn else "")]
        if "awq" in self.algorithm:
            folded = sum(g["alpha"] is not None for g in self.awq.values())
            lines.append(f"awq: {folded} scale groups folded, {len(self.awq) - folded} kept s = 1, {len(self.awq_skipped)} "
                         f"not foldable" + "".join(f"\n  {k}: {v}" for k, v in self.awq_skipped.items()))
        return lines


class Session:
    """Everything moeq attached to one model: recipe, targets, per-module state, hooks."""

    def __init__(self, model: nn.Module, recipe: Recipe, targets: Targets):
        self.model, self.recipe, self.targets = model, recipe, targets
        self.experts = [ExpertsState(t, recipe) for t in targets.experts]
        self.linears = {t.name: LinearState(t, recipe) for t in targets.linears}
        self.attention = [AttentionState(n, m) for n, m in targets.attention]  # kv_cache scales
        self.batch = BatchContext()  # the current calibration batch's token mask, seen by every state
        for st in [*self.experts, *self.linears.values(), *self.attention]:
            st.batch = self.batch
        self.hooks = Hooks()
        self.report: QuantReport | None = None
        self.from_checkpoint = False  # True for moeq.load: fake-quant weights only, originals gone
        self.hessians: dict = {}  # GPTQ's per-module Hessian sinks during calibration (moeq.algorithms.gptq)

    def attach(self, calib_all_experts: bool) -> None:
        for st in self.experts:
            self.hooks.attach(st.target.module, lambda info, st=st: ExpertsIntercept(st, info),
                              lambda args, kwargs, st=st: st.before_forward(args, kwargs, calib_all_experts),
                              ExpertsState.restore_output)
        for st in self.linears.values():
            self.hooks.attach(st.target.module, lambda info, st=st: LinearIntercept(st, info))
        impl = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
        for st in self.attention:
            self.hooks.attach(st.module, lambda info, st=st: KVIntercept(st, info), after=check_call(st, impl))

    def detach(self) -> None:
        self.hooks.remove()

    def reset_statistics(self) -> None:
        """Forget every calibration statistic (AWQ: calibration runs again on the scaled model)."""
        for st in [*self.experts, *self.linears.values(), *self.attention]:
            st.reset_statistics()

    def __deepcopy__(self, memo):
        raise TypeError("a moeq-quantized model cannot be deep-copied (its hooks point at this model's state); "
                        "deep-copy the model before moeq.quantize, or export it and moeq.load the export twice")

    def reduce_stats(self) -> None:
        """Multi-process calibration: combine statistics over all ranks (max for amax, sum for
        counts) with the process group's collective library (gloo on CPU, NCCL on GPU)."""
        import torch.distributed as dist

        if _world_size() == 1:
            return
        reduce = all_reduce_
        for st in self.experts:
            for a in st.in_amax.values():
                reduce(a, dist.ReduceOp.MAX)
            reduce(st.tokens, dist.ReduceOp.SUM)
            st.calls = int(reduce(torch.tensor([st.calls], dtype=torch.int64), dist.ReduceOp.SUM)[0])
        for st in self.attention:
            for a in st.amax.values():
                reduce(a, dist.ReduceOp.MAX)
        for st in self.linears.values():
            reduce(st.in_amax, dist.ReduceOp.MAX)
            st.calls = int(reduce(torch.tensor([st.calls], dtype=torch.int64), dist.ReduceOp.SUM)[0])

    def finalize(self, cache_fake_quant: bool = False) -> None:
        for st in self.experts:
            st.finalize(cache_fake_quant)
        # each weight's amax once; sibling groups (q/k/v, gate/up) then share the max
        w_amax = {n: abs_amax(full(st.target.module.weight.detach()), (0, 1)) for n, st in self.linears.items()}
        for st in self.linears.values():
            group = [n for n in st.target.group if n in self.linears]
            shared_w = torch.stack([w_amax[n] for n in group]).max()
            shared_in = torch.stack([self.linears[n].in_amax for n in group]).max()
            st.finalize(shared_w, shared_in, cache_fake_quant)
        for st in self.attention:
            st.finalize()


class ShapeError(ValueError):
    """Weights whose shapes the recipe's blocks do not fit; `modules` names them, `need` says what
    the recipe needs of them."""

    def __init__(self, msg: str, modules: list[str], need: str = ""):
        super().__init__(msg)
        self.modules, self.need = modules, need


def _check_shapes(targets: Targets, recipe: Recipe) -> None:
    bad, modules = [], []
    for t in targets.experts:
        for p in t.projs:
            k = t.nk(p).shape[-1]
            if k % recipe.block:
                bad.append(f"{t.name}.{p} (K={k})")
                modules.append(t.name)
    for t in targets.linears:
        if t.module.in_features % recipe.block:
            bad.append(f"{t.name} (K={t.module.in_features})")
            modules.append(t.name)
    if bad:
        need = f"needs the input dim K of every quantized weight divisible by {recipe.block}"
        raise ShapeError(
            f"recipe {recipe.name} needs the input dim K divisible by {recipe.block}, but these are not: "
            + ", ".join(bad) + ". Exclude them (Recipe.with_exclude(add=[...])) or choose another recipe.",
            list(dict.fromkeys(modules)), need)
    _check_rows(targets, recipe)


def _check_rows(targets: Targets, recipe: Recipe) -> None:
    """Block scales span `rows` rows: a gate/up half of fused experts, and every module an engine
    fuses into one GEMM except the last (q/k/v -> qkv, ...), must end on a block boundary, as
    vLLM 0.33 checks for block FP8 (validate_fp8_block_shape / _moe)."""
    from .schemes.table import WEIGHT

    rows = WEIGHT[recipe.weight].rows
    if rows == 1:
        return
    bad, modules = [], []
    for t in targets.experts:
        n = t.nk(t.projs[0]).shape[-2]
        if t.has_gate and not t.is_concatenated:
            bad.append(f"{t.name}.{t.projs[0]} (gate and up rows interleaved)")
            modules.append(t.name)
        elif t.has_gate and (n // 2) % rows:
            bad.append(f"{t.name}.{t.projs[0]} (gate/up halves of N={n // 2})")
            modules.append(t.name)
    for t in targets.linears:
        if len(t.group) > 1 and t.name != t.group[-1] and t.module.out_features % rows:
            bad.append(f"{t.name} (N={t.module.out_features}, fused with {', '.join(g.rsplit('.', 1)[-1] for g in t.group if g != t.name)})")
            modules += list(t.group)
    if bad:
        need = f"needs the output dim N of fused experts halves and fused sibling projections divisible by {rows}"
        raise ShapeError(
            f"recipe {recipe.name} {need} (its {rows}-row weight blocks must not straddle two modules vLLM loads "
            "separately), but these are not: " + ", ".join(bad) + ". Exclude them, fused siblings together "
            "(Recipe.with_exclude(add=[...])), or choose another recipe.", list(dict.fromkeys(modules)), need)


def _batches(calib_data, model: nn.Module):
    emb = model.get_input_embeddings()
    vocab, device = emb.num_embeddings, emb.weight.device
    for item in calib_data:
        if isinstance(item, torch.Tensor):
            item = {"input_ids": item}
        elif not isinstance(item, dict) or "input_ids" not in item:
            raise TypeError("calibration items must be LongTensors [B, T] or dicts with 'input_ids'")
        ids = item["input_ids"]
        if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2 or ids.numel() == 0:
            raise ValueError(f"calibration input_ids must be a non-empty integer tensor [B, T], got {ids.dtype} {tuple(ids.shape)}")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"calibration token ids must lie in [0, {vocab}) (the model's vocabulary); got {int(ids.min())}..{int(ids.max())}")
        yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in item.items()}


class NonFiniteActivation(ValueError):
    """NaN or inf reached a quantized module's input during calibration."""


def _check_finite(session: Session, batch_index: int) -> None:
    """One device sync per batch; names the first module (in model order) whose input
    statistics stopped being finite, and the batch."""
    stats = [a for st in session.experts for a in st.in_amax.values()] + [st.in_amax for st in session.linears.values()]
    if not stats or bool(torch.stack([torch.isfinite(a).all() for a in stats]).all()):
        return
    states = [*session.experts, *session.linears.values()]
    for st in states:
        amax = st.in_amax.values() if isinstance(st.in_amax, dict) else [st.in_amax]
        if not all(bool(torch.isfinite(a).all()) for a in amax):
            raise NonFiniteActivation(
                f"calibration batch {batch_index}: the input of {st.target.name} holds NaN or inf, so no scale can be "
                f"computed; check the model's weights and dtype (float16 overflows where bfloat16 does not) and the data")


def batch_mask(batch: dict, i: int):
    """The batch's token mask flattened [B*T] bool, None when every token is real, False
    when none is (the batch is skipped)."""
    mask = batch.get("attention_mask")
    if mask is None:
        return None
    mask = mask.to(batch["input_ids"].device).bool()
    if mask.shape != batch["input_ids"].shape:
        raise ValueError(f"calibration batch {i}: attention_mask {tuple(mask.shape)} does not match "
                         f"input_ids {tuple(batch['input_ids'].shape)}")
    if not bool(mask.any()):
        return False
    return None if bool(mask.all()) else mask.reshape(-1)


@torch.no_grad()
def _calibrate(model, session: Session, calib_data, report: QuantReport, progress: bool) -> None:
    """Run the calibration batches. An attention_mask marks padding: padding tokens reach no
    statistic and no token count."""
    t0 = time.perf_counter()
    total = len(calib_data) if hasattr(calib_data, "__len__") else None
    try:
        for i, batch in enumerate(tqdm(_batches(calib_data, model), total=total, desc="calibrating",
                                       disable=not progress, unit="batch")):
            mask = batch_mask(batch, i)
            if mask is False:
                log.warning("calibration batch %d is all padding; skipped", i)
                continue
            session.batch.token_mask = mask
            model(**batch, use_cache=False)
            _check_finite(session, i)
            report.calib_batches += 1
            report.calib_tokens += int(batch["input_ids"].numel() if mask is None else mask.sum())
    finally:
        session.batch.token_mask = None
    report.calib_seconds = time.perf_counter() - t0
    if report.calib_batches == 0:
        raise ValueError("calibration data is empty; pass at least one batch of input_ids")


def quantize(
    model: nn.Module,
    recipe: "str | Recipe" = "nvfp4",
    calib_data: Iterable | None = None,
    *,
    calib_all_experts: bool = False,
    cache_weights: bool | None = None,
    progress: bool = True,
    layout: str | None = None,
    algorithm: "str | tuple[str, ...]" = "max",
) -> QuantReport:
    """Quantize `model` in place (fake-quant) and return a report.

    calib_data: iterable of input_ids LongTensors [B, T] or dicts with input_ids /
    attention_mask (padding never reaches the statistics). Required when the recipe
    quantizes inputs with static scales; optional for weight-only recipes and dynamic input
    scales (fp8-dynamic; then only token coverage is missing from the report).
    cache_weights: keep the fake-quant weights between forwards (True: faster evaluation,
    one extra copy of the quantized weights, recomputed when a parameter changes) or compute
    them from the module's current parameters at every call (False: no second copy). None
    (default) caches only when the copy takes at most a quarter of the free memory of the
    weights' device and the parameters are not sharded (FSDP2).
    layout: the export layout to check before calibration (a combination vLLM cannot load is
    refused here instead of at export).
    algorithm: "max" (default: scales from each weight's amax), "awq" (activation-aware
    per-channel scales folded into norms, routers and weights before calibration; needs
    calib_data, iterated twice), "mse" (clipping search per scale unit), "gptq"
    (error-compensated weights from per-expert Hessians; needs calib_data), or a combination
    "mse+gptq" / ("awq", "gptq"); see moeq.algorithms.
    """
    from . import algorithms

    steps = algorithms.parse(algorithm)
    recipe = get_recipe(recipe)
    model = unwrap(model)
    if getattr(model, SESSION_ATTR, None) is not None:
        raise RuntimeError("this model is already quantized by moeq; load a fresh copy to quantize again")
    targets = find_targets(model, recipe)
    if not targets.experts and not targets.linears:
        raise ValueError(f"nothing to quantize in {type(model).__name__}: no fused experts and no nn.Linear outside the exclude patterns")
    _check_shapes(targets, recipe)
    if layout is not None:
        from .checkpoint.layouts import check_experts_supported, check_supported

        check_supported(layout, recipe)
        check_experts_supported(layout, recipe, targets.experts, targets.linears)
    offloaded = [t.name for t in [*targets.experts, *targets.linears]
                 if any(p.is_meta for p in t.module.parameters(recurse=False))]
    if offloaded:
        raise ValueError(f"{len(offloaded)} modules have offloaded (meta) weights, e.g. {offloaded[0]}; moeq needs the weights "
                         f"on a device. For models larger than memory use moeq.streaming.quantize_streaming / --streaming")
    if calib_data is None and input_is_static(recipe):
        raise ValueError(f"recipe {recipe.name} quantizes activations and needs calib_data for their scales")
    if calib_data is None and recipe.kv_cache is not None:
        raise ValueError(f"kv_cache={recipe.kv_cache!r} needs calib_data: its k/v scales are static, from calibration")
    algorithms.check_supported(steps, recipe)
    if "gptq" in steps and calib_data is None:
        raise ValueError("algorithm 'gptq' needs calib_data (its Hessians come from the calibration activations)")
    if "awq" in steps and calib_data is None:
        raise ValueError("algorithm 'awq' needs calib_data (its scales come from the calibration activations)")
    if steps and _world_size() > 1:
        sharded = [t.name for t in [*targets.experts, *targets.linears]
                   if any(hasattr(p, "full_tensor") for p in t.module.parameters(recurse=False))]
        if sharded:
            raise NotImplementedError(f"algorithm {algorithms.name(steps)!r} rewrites weights, which is not supported "
                                      f"for sharded (FSDP) parameters such as {sharded[0]}; run it on replicated "
                                      f"models (one copy per process) or use algorithm='max'")

    session = Session(model, recipe, targets)
    report = QuantReport(
        recipe.name,
        quantized=[t.name for t in targets.experts] + [t.name for t in targets.linears],
        excluded=list(targets.excluded),
        tokens_per_expert={}, never_routed={}, calib_all_experts=calib_all_experts,
        algorithm=algorithms.name(steps),
    )
    if calib_data is not None and algorithms.needs_data_again(steps):
        calib_data = list(_batches(calib_data, model))  # iterated more than once
    session.attach(calib_all_experts)
    try:
        was_training = model.training
        model.eval()
        before_s = 0.0
        try:
            if "awq" in steps:
                t0 = time.perf_counter()
                scratch = QuantReport(recipe.name, [], [], {}, {})
                algorithms.run_before(session, steps, lambda: _calibrate(model, session, calib_data, scratch, progress),
                                      calib_data, report)
                before_s = time.perf_counter() - t0
            if calib_data is not None:
                _calibrate(model, session, calib_data, report, progress)
            else:
                _probe_forward(model)
        finally:
            model.train(was_training)
        session.reduce_stats()
        report.calib_tokens, report.calib_batches = _sum_over_ranks(report.calib_tokens, report.calib_batches)
        _check_coverage(session, report, calibrated=True)
        session.finalize(cache_fake_quant=_decide_cache(targets, cache_weights))
        if steps:
            t0 = time.perf_counter()
            algorithms.run(session, steps, report, calib_data, progress)
            report.algorithm_seconds = time.perf_counter() - t0 + before_s
    except BaseException:
        session.detach()
        raise
    for st in session.experts if calib_data is not None else ():  # unknown without calibration
        counts = st.tokens.tolist()
        report.tokens_per_expert[st.target.name] = counts
        report.never_routed[st.target.name] = [e for e, c in enumerate(counts) if c == 0]
    n_never = sum(len(v) for v in report.never_routed.values())
    if n_never and calib_data is not None:
        if calib_all_experts:
            why = " (their statistics come from calibrate-all-experts mode)"
        elif recipe.input is None:
            why = " (weight-only recipe: their weights are quantized from the weights alone)"
        elif not input_is_static(recipe):
            why = " (dynamic activation scales: nothing of theirs is calibrated)"
        else:
            why = "; their input scales fall back to the layer maximum. Use more data or calib_all_experts=True"
        msg = f"{n_never} experts saw no calibration tokens" + why
        report.warnings.append(msg)
        log.warning(msg)
    session.report = report
    setattr(model, SESSION_ATTR, session)
    return report


def free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _decide_cache(targets: Targets, requested: bool | None) -> bool:
    """Whether the fake-quant weights are kept between forwards (see quantize's cache_weights)."""
    if requested is not None:
        return bool(requested)
    params = [t.param(p) for t in targets.experts for p in t.projs] + [t.module.weight for t in targets.linears]
    if not params or any(hasattr(p, "full_tensor") for p in params):
        return False  # sharded parameters: a full copy on every rank would undo the sharding
    need = sum(p.numel() * p.element_size() for p in params)
    free = free_bytes(params[0].device)
    cache = free is not None and need <= free // 4
    log.info("fake-quant weights %s (%.2f GiB; %s GiB free)", "cached" if cache else "computed per call",
             need / 2**30, "?" if free is None else f"{free / 2**30:.1f}")
    return cache


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside whatever wraps it (torch.compile's OptimizedModule, a
    user's parent module, PEFT-style wrappers): recipe patterns and export keys are names
    relative to it, and calibration runs its own (eager) forward."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model
    found = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    outer = [m for m in found if not any(m is not o and any(m is c for c in o.modules()) for o in found)]
    if len(outer) == 1:
        return outer[0]
    if not outer:
        return model  # a plain nn.Module: names are relative to it
    raise ValueError(f"{type(model).__name__} holds {len(outer)} transformers models; pass the one to quantize")


@torch.no_grad()
def _probe_forward(model: nn.Module) -> None:
    """Without calibration data (weight-only recipes), one short forward still shows which
    quantized weights are used by an op moeq recognizes, so coverage is checked on every path
    (a Linear whose weight is multiplied outside its own forward would otherwise be exported
    quantized while the in-memory model never fake-quantizes it)."""
    emb = model.get_input_embeddings()
    n = min(16, emb.num_embeddings)
    ids = torch.arange(n, device=emb.weight.device).unsqueeze(0)
    try:
        model(input_ids=ids, use_cache=False)
    except Exception as e:
        if type(e).__name__ == "UnsupportedExpertsOp":
            raise
        raise ValueError(f"weight-only quantization without calibration data runs one probe forward on {n} token ids to "
                         f"check that every quantized weight is used; it failed ({type(e).__name__}: {e}). "
                         f"Pass calib_data") from e


def all_reduce_(t: torch.Tensor, op) -> torch.Tensor:
    """t reduced in place over all ranks, through the collective library's device (gloo: CPU,
    NCCL: the current GPU)."""
    import torch.distributed as dist

    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = t.to(dev)
    dist.all_reduce(buf, op=op)
    t.copy_(buf.to(t.device))
    return t


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _sum_over_ranks(*counts: int) -> tuple[int, ...]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return counts
    t = torch.tensor(counts, dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return tuple(int(v) for v in t.tolist())


def _check_coverage(session: Session, report: QuantReport, calibrated: bool) -> None:
    """Every quantized module must have been seen by its interceptor during calibration.

    A module whose weight never went through a recognized op (e.g. Jamba's dt_proj, whose
    weight is multiplied outside its own forward) cannot be fake-quantized in memory, so it
    is moved to the excluded list (and the export's exclude list) with a warning: the
    in-memory model and the export stay identical, and nothing is skipped silently."""
    if not calibrated:
        return
    unseen = [st for st in session.experts if st.calls == 0]
    unseen += [st for st in session.linears.values() if st.calls == 0]
    if not unseen:
        return
    names = [st.target.name for st in unseen]
    for st in unseen:
        session.hooks.remove(st.target.module)
    session.experts = [st for st in session.experts if st.calls]
    session.linears = {n: st for n, st in session.linears.items() if st.calls}
    t = session.targets
    t.experts = [x for x in t.experts if x.name not in names]
    t.linears = [x for x in t.linears if x.name not in names]
    t.excluded = sorted(set(t.excluded) | set(names))
    report.quantized = [n for n in report.quantized if n not in names]
    report.excluded = sorted(set(report.excluded) | set(names))
    msg = ("these modules never used their weight in a recognized op during calibration and stay unquantized "
           "(listed in the export's exclude list): " + ", ".join(names))
    report.warnings.append(msg)
    log.warning(msg)
