"""Streaming quantization for models larger than memory: one decoder layer at a time.

    report, export_report = quantize_streaming("/models/big", "nvfp4", calib_batches, "/models/big-nvfp4")

The model is built on the meta device; weights are read lazily from the checkpoint's
safetensors shards. A first pass with every decoder layer replaced by a catcher records
each layer's call arguments (position embeddings, masks) and layer 0's input for every
calibration batch. Then, per layer: materialize its weights, run it on the recorded
inputs with moeq's interception collecting statistics (unquantized, as in the in-memory
path), quantize it, write its tensors to the export, free it, and pass its outputs on.
Peak memory is about one layer plus the calibration activations, whatever the model size.
Calibration algorithms (moeq.algorithms) run per layer too: awq before the layer's calibration
(its folded norms and routers are written from memory, `_run_awq`), mse and gptq after it
(gptq on a second, quantized stream of hidden states, `_run_algorithms`).

Resumable: the export is assembled in `.<out>.moeq-partial/` next to the destination
with a checksummed manifest and the activations after the last finished layer
(`resume_state`); running the same command again continues from there, a damaged state is
recomputed, and different options are refused. The directory is renamed to `out` at the
end (`checkpoint.outdir.publish`, the same rules as the in-memory export).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from tqdm.auto import tqdm

from .checkpoint.export import (ExportReport, _check_shared_keys, _copy_source_files, _ignore_list, _write_config,
                            _write_experts, _write_linear, write_sidecar)
from .checkpoint.layouts import check_experts_supported, check_supported
from .checkpoint.load import CheckpointReader
from .checkpoint.outdir import check_out_dir, clean_stale, disk_full_error, is_disk_full, publish
from .checkpoint.plan import checkpoint_plan, fill_from_checkpoint, to_checkpoint
from .checkpoint.writer import DEFAULT_SHARD_BYTES, ShardWriter
from .quantization import QuantReport, Session, _check_coverage, _check_finite, _check_shapes, _world_size
from .recipes import Recipe, get_recipe
from .layer_capture import _Stop, capture_calls, decoder_layers, layer_output
from .resume_state import PartialRun, fingerprint
from .targets import Targets, find_targets

log = logging.getLogger("moeq")


def _meta_model(path: Path, dtype):
    config = transformers.AutoConfig.from_pretrained(path)
    if getattr(config, "quantization_config", None):
        raise ValueError(f"{path} is already quantized")
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    cls = cls or transformers.AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, dtype=dtype or getattr(config, "dtype", None) or torch.float32)
    return model.eval()


def _tied_duplicates(model: nn.Module) -> set[str]:
    seen, dup = {}, set()
    for n, p in model.state_dict(keep_vars=True).items():
        if id(p) in seen:
            dup.add(n)
        seen.setdefault(id(p), n)
    return dup


class _Materializer:
    def __init__(self, model, plan, reader, device, tied):
        self.model, self.plan, self.reader, self.device, self.tied = model, plan, reader, device, tied
        self.shapes = {n: (p.shape, p.dtype) for n, p in model.state_dict(keep_vars=True).items()}

    def load(self, names):
        for n in names:
            if n in self.tied:
                continue
            shape, dtype = self.shapes[n]
            t = torch.empty(shape, dtype=dtype, device=self.device)
            fill_from_checkpoint(t, self.plan[n], self.reader.__getitem__)
            set_module_tensor_to_device(self.model, n, self.device, value=t)
            self.reader.release()  # mapped shard pages count toward RSS: drop them per parameter

    def free(self, names):
        for n in names:
            if n not in self.tied:
                set_module_tensor_to_device(self.model, n, "meta")


def _trim_heap() -> None:
    """Give freed heap memory back to the OS between layers (glibc keeps per-expert-sized
    blocks in its arenas otherwise, and RSS creeps up layer after layer)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _sub_targets(targets: Targets, prefix: str) -> Targets:
    inside = lambda n: n.startswith(prefix)  # noqa: E731
    return Targets([t for t in targets.experts if inside(t.name)], [t for t in targets.linears if inside(t.name)],
                   [n for n in targets.excluded if inside(n)])


@contextlib.contextmanager
def _keep_state_on_failure(run: "PartialRun | None", partial: Path, write: bool):
    """On any exception: remove the unfinished step's files (the committed state stays for a
    resume), unlock, and turn a full disk into a one-line ExportError."""
    try:
        yield
    except BaseException as e:
        if run is not None:
            try:
                run.drop_uncommitted()
            except OSError:
                pass
            run.release()
        if write and is_disk_full(e):
            then = (f"re-run the same command: it resumes after layer {run.manifest['done']}"
                    if run is not None and run.manifest else "re-run")
            raise disk_full_error(e, partial, then) from e
        raise


@torch.no_grad()
def _run_awq(session, name, layer, hidden, token_masks, calls, report, device, own, plan, reader) -> dict:
    """AWQ's statistics, search and folds for one layer (`awq.run_layer`); returns the checkpoint
    tensors of the layer's unquantized parameters it rewrote (norms, routers, biases), which the
    export must take from memory. The quantized ones are written from the module as always."""
    from .algorithms import awq

    edited = {id(p) for p in awq.run_layer(session, name, layer, hidden, token_masks, calls, report, device)}
    quantized = {f"{st.target.name}.{p}" for st in session.experts for p in st.target.projs}
    quantized |= {f"{n}.weight" for n in session.linears}
    sd = session.model.state_dict(keep_vars=True)
    changed = {n: sd[n] for n in own if n not in quantized and id(sd[n]) in edited}
    return to_checkpoint(changed, plan, reader.__getitem__)


@torch.no_grad()
def _run_algorithms(session, steps, report, layer, qhidden: list, token_masks: list, calls: list, device) -> list:
    """The calibration algorithms for one finalized layer (see moeq.algorithms). GPTQ takes its
    Hessians from the quantized stream `qhidden` (the outputs of the already-quantized layers
    before, as moeq.quantize's layer-sequential GPTQ does) and returns that stream one layer on;
    without GPTQ the stream is not used and returned as it is."""
    from .algorithms import gptq, mse

    if "mse" in steps:
        mse.run(session)
    if "gptq" not in steps:
        return qhidden
    states = [*session.experts, *session.linears.values()]
    if states:
        gptq.solve_layer(session, states, layer, qhidden, token_masks, calls, report, device=device)
    return [layer_output(layer(h.to(device), *args, **kwargs)).to("cpu") for h, (_, args, kwargs) in zip(qhidden, calls)]


@torch.no_grad()
def quantize_streaming(model_path, recipe: "str | Recipe", calib_batches, out_dir, layout: str = "modelopt", *,
                       calib_all_experts: bool = False, overwrite: bool = False, device: str = "cpu", dtype=None,
                       max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True, write: bool = True,
                       stop_after_layers: int | None = None,
                       trust_remote_code: bool = False, algorithm: str = "max") -> tuple[QuantReport, ExportReport | None]:
    """Quantize and export a checkpoint directory layer by layer. `write=False` on
    non-zero ranks of a multi-process run (rank 0 writes). `stop_after_layers` simulates
    an interruption (tests). `overwrite` replaces an earlier moeq export (never the source
    model) and discards a partial run made with other options; a partial run made with the
    same options is resumed either way. `trust_remote_code`: as in `moeq.export`."""
    from . import algorithms

    steps = algorithms.parse(algorithm)
    t0 = time.perf_counter()
    path, out = Path(model_path), Path(out_dir)
    recipe = get_recipe(recipe)
    check_supported(layout, recipe)
    algorithms.check_supported(steps, recipe)
    if recipe.kv_cache is not None:
        raise NotImplementedError(f"kv_cache={recipe.kv_cache!r} is not supported by the streaming (layer by layer) path "
                                  f"yet; quantize in memory (moeq.quantize + moeq.export, CLI without --streaming)")
    if write:
        out = check_out_dir(out, source=path, overwrite=overwrite)
    reader = CheckpointReader(path)
    model = _meta_model(path, dtype)
    model.config._name_or_path = str(path)
    targets = find_targets(model, recipe)
    check_experts_supported(layout, recipe, targets.experts, targets.linears)
    _check_shapes(targets, recipe)
    plan = checkpoint_plan(model)
    _check_shared_keys(plan, {f"{t.name}.{p}" for t in targets.experts for p in t.projs} | {f"{t.name}.weight" for t in targets.linears})
    tied = _tied_duplicates(model)
    mat = _Materializer(model, plan, reader, device, tied)
    layers_name, layers = decoder_layers(model)
    prefixes = [f"{layers_name}.{i}." for i in range(len(layers))]
    names = list(plan)
    outer = [n for n in names if not any(n.startswith(p) for p in prefixes)]
    mat.load(outer)

    calib, masks = [], []  # masks[b]: [B, T] bool where batch b has padding, else None
    for b in calib_batches:
        mask = None
        if isinstance(b, dict):
            mask = b.get("attention_mask")
            b = b["input_ids"]
        if mask is not None:
            mask = mask.bool().cpu()
            if mask.shape != b.shape:
                raise ValueError(f"calibration batch {len(calib)}: attention_mask {tuple(mask.shape)} does not match "
                                 f"input_ids {tuple(b.shape)}")
            if not bool(mask.any()):
                log.warning("calibration batch %d is all padding; skipped", len(calib))
                continue
            mask = None if bool(mask.all()) else mask
        calib.append(b)
        masks.append(mask)
    if not calib:
        raise ValueError("calibration data is empty; pass at least one batch of input_ids")
    def run_batches():
        for ids, mask in zip(calib, masks):
            try:  # with the mask, the recorded layer arguments carry the padding-aware attention masks
                model(input_ids=ids.to(device), use_cache=False,
                      **({} if mask is None else {"attention_mask": mask.long().to(device)}))
            except _Stop:
                pass

    calls = capture_calls(layers, run_batches)
    hidden = [c[0] for c in calls[0]]

    # GPTQ is layer-sequential: a second stream of hidden states, the quantized layers' outputs
    sequential = "gptq" in steps
    qhidden = hidden
    partial = out.parent / f".{out.name}.moeq-partial"
    done, tokens_per_expert, run, w = 0, {}, None, None
    if write:
        world = _world_size()
        fp = fingerprint(model_path=path, recipe=recipe, layout=layout, dtype=model.dtype,
                         calib_all_experts=calib_all_experts, max_shard_bytes=max_shard_bytes,
                         calib=[b if m is None else b.masked_fill(~m, -1) for b, m in zip(calib, masks)],
                         device=device, world_size=world, algorithm=algorithms.name(steps))
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out)
        run = PartialRun(partial, fp)
        resumed = run.open(overwrite, len(layers), resume=world == 1)  # other ranks start at layer 0 too
        w = ShardWriter(partial, max_shard_bytes, checksums=True)
        if resumed is not None:
            done, hidden, tokens_per_expert = resumed.done, resumed.hidden, resumed.tokens_per_expert
            if sequential:
                hidden, qhidden = hidden
            w.resume(resumed.shards, resumed.total_bytes)
            if resumed.excluded:  # modules the coverage check moved to the exclude list before the interruption
                dropped = set(resumed.excluded)
                targets.experts = [t for t in targets.experts if t.name not in dropped]
                targets.linears = [t for t in targets.linears if t.name not in dropped]
                targets.excluded = sorted(set(targets.excluded) | dropped)
    with _keep_state_on_failure(run, partial, write):
        report = QuantReport(recipe.name, quantized=[t.name for t in targets.experts] + [t.name for t in targets.linears],
                             excluded=list(targets.excluded), tokens_per_expert=dict(tokens_per_expert),
                             never_routed={}, calib_all_experts=calib_all_experts,
                             calib_tokens=sum(b.numel() if m is None else int(m.sum()) for b, m in zip(calib, masks)),
                             calib_batches=len(calib), algorithm=algorithms.name(steps))
        token_masks = [None if m is None else m.reshape(-1).to(device) for m in masks]
        bar = tqdm(range(done, len(layers)), desc="layers", disable=not progress, unit="layer")
        for i in bar:
            if stop_after_layers is not None and i >= stop_after_layers:
                raise KeyboardInterrupt(f"simulated interruption before layer {i}")
            own = [n for n in names if n.startswith(prefixes[i])]
            mat.load(own)
            reader.release()
            sub = _sub_targets(targets, prefixes[i])
            session = Session(model, recipe, sub)
            session.attach(calib_all_experts)
            folded = {}  # checkpoint key -> tensor: unquantized parameters AWQ rewrote
            try:
                if "awq" in steps:  # before the layer's calibration, on the unquantized stream (see moeq.algorithms)
                    t_alg = time.perf_counter()
                    folded = _run_awq(session, f"{layers_name}.{i}", layers[i], hidden, token_masks, calls[i], report,
                                      device, own, plan, reader)
                    report.algorithm_seconds += time.perf_counter() - t_alg
                new_hidden = []
                for b, (h, (_, args, kwargs)) in enumerate(zip(hidden, calls[i])):
                    # padding never reaches the statistics (as in moeq.quantize)
                    session.batch.token_mask = token_masks[b]
                    try:
                        o = layers[i](h.to(device), *args, **kwargs)
                    finally:
                        session.batch.token_mask = None
                    _check_finite(session, b)
                    new_hidden.append(layer_output(o).to("cpu"))
                session.reduce_stats()
                _check_coverage(session, report, calibrated=True)
                dropped = set(sub.excluded) - set(targets.excluded)
                if dropped:  # modules moved to the exclude list by the coverage check
                    targets.experts = [t for t in targets.experts if t.name not in dropped]
                    targets.linears = [t for t in targets.linears if t.name not in dropped]
                    targets.excluded = sorted(set(targets.excluded) | dropped)
                session.finalize(cache_fake_quant=False)
                if steps:
                    t_alg = time.perf_counter()
                    qhidden = _run_algorithms(session, steps, report, layers[i], qhidden, token_masks, calls[i], device)
                    report.algorithm_seconds += time.perf_counter() - t_alg
            finally:
                session.detach()
            for st in session.experts:
                report.tokens_per_expert[st.target.name] = st.tokens.tolist()
            if write:
                n_shards = len(w.records)
                quantized = {}
                for st in session.experts:
                    for p in st.target.projs:
                        quantized[f"{st.target.name}.{p}"] = (st, p)
                quantized.update({f"{n}.weight": (st, None) for n, st in session.linears.items()})
                for n in own:
                    if n in quantized:
                        st, p = quantized[n]
                        (_write_linear(w, layout, recipe, st, plan[n]) if p is None else
                         _write_experts(w, layout, recipe, st, p, plan[n]))
                    elif n not in tied:
                        for key in dict.fromkeys(piece.key for piece in plan[n]):
                            w.add(key, folded[key] if key in folded else reader[key])
                w.flush()
            mat.free(own)
            reader.release()
            _trim_heap()
            hidden = new_hidden
            if write:
                for rec in w.records[n_shards:]:
                    rec["layer"] = i
                run.commit(i + 1, (hidden, qhidden) if sequential else hidden, w.records, w.total_bytes, report.tokens_per_expert, targets.excluded)
        report.never_routed = {n: [e for e, c in enumerate(v) if c == 0] for n, v in report.tokens_per_expert.items()}
        n_rtn = sum(len(v) for v in report.rtn_fallback.values())
        if n_rtn:
            report.warnings.append(f"GPTQ: {n_rtn} experts/modules saw no calibration rows and are quantized "
                                   f"round-to-nearest (rtn_fallback)")
        report.calib_seconds = time.perf_counter() - t0
        if not write:
            return report, None

        for n in outer:
            if n not in tied:
                for key in dict.fromkeys(piece.key for piece in plan[n]):
                    w.add(key, reader[key])
        w.close(keep_tmp_names=True)  # the shards the manifest names stay valid until finish()
        ignore = _ignore_list(targets, plan)
        _write_config(model, partial, layout, recipe, ignore, trust_remote_code)
        _copy_source_files(model, partial, trust_remote_code)
        write_sidecar(partial, recipe, layout, targets.excluded, report.tokens_per_expert)
        check_out_dir(out, path, overwrite)  # before the resume state is dropped: refuse while it still can resume
        run.finish()
        publish(partial, out, overwrite, source=path)
        run.release()
        n_tensors = sum(len(s) for s in w.shards)
        exp = ExportReport(str(out_dir), layout, recipe.name, time.perf_counter() - t0, w.total_bytes, n_tensors,
                           ignore, report.never_routed)
        return report, exp
