"""`moeq.export`: write a quantized model as a checkpoint serving engines load.

Streams one parameter at a time: a fused expert stack is quantized once ([E, N, K] in one
vectorized call), split into the original checkpoint's per-expert keys, and written to
bounded shards; peak extra memory is about one layer. Everything lands in a temporary
directory that is renamed into place at the end.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.core_model_loading import revert_weight_conversion

from ..calibration_stats import full
from ..quantization import SESSION_ATTR, Session, unwrap
from ..quantizer import quantize_weight
from ..schemes import mxfp4
from ..schemes.table import WEIGHT
from .layouts import (NATIVE, UnsupportedExport, check_experts_supported, check_supported, input_tensors, kv_cache_tensors,
                      quant_configs,
                      weight_tensors)
from .plan import Piece, checkpoint_plan
from .outdir import MARKER, AtomicDir
from .writer import DEFAULT_SHARD_BYTES, ShardWriter

log = logging.getLogger("moeq")

SIDECAR = MARKER  # moeq_export.json: also what marks a directory as moeq's own (overwrite replaces only those)
_SKIP_SOURCE = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_SKIP_NAMES = {"config.json", "hf_quant_config.json", "model.safetensors.index.json", SIDECAR}


@dataclass
class ExportReport:
    out_dir: str
    layout: str
    recipe: str
    seconds: float
    bytes_written: int
    tensors: int
    ignore: list[str]
    never_routed: dict[str, list[int]] = field(default_factory=dict)

    def summary(self) -> str:
        n = sum(len(v) for v in self.never_routed.values())
        return (f"exported {self.recipe} ({self.layout}) to {self.out_dir}: {self.tensors} tensors, "
                f"{self.bytes_written / 2**20:.1f} MiB in {self.seconds:.2f}s"
                + (f"; {n} never-routed experts got the layer's input scale" if n else ""))


def _slice(q, expert: int | None, rows, align: int = 1):
    """Slice every field of a quantized tensor tuple to one expert / some rows. align: the row
    blocks of the scheme's scales (fp8-block: 128); a piece must be consecutive rows starting on one."""
    if align > 1 and rows is not None and not _starts_block(rows, align):
        raise NotImplementedError(f"a checkpoint module holds rows of a weight that do not start on a {align}-row block "
                                  f"of its scales; exclude this module (Recipe.with_exclude) or choose another recipe")
    out = []
    for f in q:
        if expert is not None:
            f = f[expert]
        if rows is not None and f.dim() >= 2:
            f = f[rows]
        out.append(f)
    return type(q)(*out)


def _emit(w: ShardWriter, layout, recipe, stem: str, q, amax, in_amax, k: int, shape: bool = True):
    """Write one module's tensors as stem + name ('...experts.3.gate_proj.' + 'weight_scale')."""
    n = q[0].shape[0]
    for name, t in weight_tensors(layout, recipe, q, amax, (n, k)).items():
        if shape or name != "weight_shape":
            w.add(f"{stem}{name}", t)
    if in_amax is not None:
        for name, t in input_tensors(layout, recipe, in_amax).items():
            w.add(f"{stem}{name}", t)


def _starts_block(rows, align: int) -> bool:
    if isinstance(rows, slice):
        return rows.step in (None, 1) and (rows.start or 0) % align == 0
    first = int(rows[0])
    return first % align == 0 and torch.equal(rows.cpu(), torch.arange(first, first + len(rows)))


# Experts are quantized in chunks of whole experts so transient fp32 copies stay bounded
# (quantizing a chunk is bit-identical to quantizing the whole stack: the formats are
# vectorized over leading dims).
_CHUNK_BYTES = 32 << 20


class ExpertUnit(NamedTuple):
    """One quantized per-expert module in the checkpoint: its tensors are `stem + name`; `rows` of the
    [N, K] view of expert `expert`; `vllm_fused`: written under vLLM's fused-experts parameter names."""

    stem: str
    expert: int
    rows: "torch.Tensor | slice"
    vllm_fused: bool = False


def _w13_rows(t, n: int) -> "torch.Tensor | slice":
    """Rows of the gate/up [N, K] view in vLLM's w13 order for swigluoai models: gate/up interleaved."""
    if not t.has_gate:
        return slice(None)
    g, u = t.gate_up_rows(n)
    idx = torch.arange(n)
    order = torch.stack([idx[g], idx[u]], dim=1).reshape(-1)
    return slice(None) if torch.equal(order, idx) else order


def expert_units(t, proj: str, pieces: list[Piece]) -> list[ExpertUnit]:
    """The per-expert checkpoint modules of one fused projection.

    Checkpoints that split experts (`...experts.{e}.gate_proj.weight`, Mixtral `w1/w3/w2`) keep their own
    names. When the original checkpoint keeps the stack fused, experts with biases (gpt-oss
    `mlp.experts.gate_up_proj`) are written the way vLLM 0.33's loader for such models reads them (gpt_oss.py,
    `GptOssRoutedExperts`: one expert at a time): `...experts.{e}.w13_weight_packed` / `w13_weight_scale`
    [2I, ...] with gate/up rows interleaved, `...experts.{e}.w2_*` for down; the biases stay under their
    fused original names (`gate_up_proj_bias`, `down_proj_bias`), which vLLM maps to w13_bias / w2_bias;
    other fused stacks are split into per-expert `gate_proj` / `up_proj` / `down_proj` modules."""
    if any(piece.rows is None for piece in pieces):
        if len(pieces) != 1:
            raise NotImplementedError(f"{t.name}.{proj}: mixed fused and split checkpoint keys")
        prefix = pieces[0].key.rsplit(".", 1)[0]
        first = proj == t.projs[0]
        if getattr(t.module, "has_bias", False):
            # expert biases: vLLM 0.33's gpt-oss loader family (GptOss, OpenAIPrivacyFilter), the only one with them
            rows = _w13_rows(t, t.nk(proj).shape[1]) if first else slice(None)
            leaf = "w13_" if first else "w2_"
            return [ExpertUnit(f"{prefix}.{e}.{leaf}", e, rows, True) for e in range(t.num_experts)]
        # other fused checkpoints: per-expert gate_proj / up_proj / down_proj, which vLLM's generic expert
        # mapping (FusedMoE.make_expert_params_mapping) reads for quantized experts
        if first and t.has_gate:
            g, u = t.gate_up_rows(t.nk(proj).shape[1])
            leaves = (("gate_proj", g), ("up_proj", u))
        else:
            leaves = (("up_proj" if first else "down_proj", slice(None)),)
        return [ExpertUnit(f"{prefix}.{e}.{leaf}.", e, rows) for e in range(t.num_experts) for leaf, rows in leaves]
    for piece in pieces:
        if not piece.key.endswith(".weight"):
            raise NotImplementedError(f"checkpoint key {piece.key} for {piece.param} does not end in .weight")
    return [ExpertUnit(piece.key[: -len("weight")], piece.expert, piece.rows) for piece in pieces]


def _write_native(w, recipe, st, proj: str, pieces: list[Piece]):
    """gpt-oss's own format: the whole stack under the fused key + '_blocks' / '_scales' (rows as in memory)."""
    t = st.target
    if len(pieces) != 1 or pieces[0].rows is not None:
        raise UnsupportedExport(f"{t.name}.{proj} is stored per expert in the original checkpoint; the {NATIVE} layout "
                                f"writes fused expert stacks only (gpt-oss): use layout='compressed-tensors'")
    w_nk = t.nk(proj, full(t.param(proj).detach()))
    E, N, K = w_nk.shape
    step = max(1, _CHUNK_BYTES // max(1, N * K * 4))
    parts = [quantize_weight(recipe, w_nk[s:s + step], st.w_amax[proj][s:s + step]) for s in range(0, E, step)]
    q = type(parts[0])(*(torch.cat(f) for f in zip(*parts)))
    for suffix, tensor in mxfp4.native_tensors(q).items():
        w.add(pieces[0].key + suffix, tensor.contiguous())


def _write_experts(w, layout, recipe, st, proj: str, pieces: list[Piece]):
    if layout == NATIVE:
        return _write_native(w, recipe, st, proj, pieces)
    t = st.target
    w_nk = t.nk(proj, full(t.param(proj).detach()))
    amax = st.w_amax[proj]
    ga = st.group_amax.get(proj)  # fixed by a calibration algorithm (mse, gptq), else None
    in_amax = st.input_amax(proj) if recipe.input is not None else None
    E, N, K = w_nk.shape
    units = expert_units(t, proj, pieces)
    step = max(1, _CHUNK_BYTES // max(1, N * K * 4))
    for s in range(0, E, step):
        q = quantize_weight(recipe, w_nk[s:s + step], amax[s:s + step], None if ga is None else ga[s:s + step])
        for u in units:
            if s <= u.expert < s + step:
                e = u.expert
                ia = None if in_amax is None else (in_amax if in_amax.dim() == 0 else in_amax[e])
                # vLLM has no loader path for a weight_shape of fused experts (and never reads one)
                _emit(w, layout, recipe, u.stem, _slice(q, e - s, u.rows, WEIGHT[recipe.weight].rows), amax[e], ia, K,
                      shape=not u.vllm_fused)


def _write_linear(w, layout, recipe, st, pieces: list[Piece]):
    weight = full(st.target.module.weight.detach())
    q = quantize_weight(recipe, weight, st.w_amax, st.group_amax)
    in_amax = st.shared_in_amax if recipe.input is not None else None
    for piece in pieces:
        if not piece.key.endswith(".weight"):
            raise NotImplementedError(f"checkpoint key {piece.key} for {piece.param} does not end in .weight")
        _emit(w, layout, recipe, piece.key[: -len("weight")], _slice(q, None, piece.rows, WEIGHT[recipe.weight].rows),
              st.w_amax, in_amax, weight.shape[1])


def _module_key(plan: dict[str, list[Piece]], module: str) -> str:
    """The checkpoint name of a module stored whole under `<name>.weight`."""
    pieces = plan.get(f"{module}.weight", [])
    if len(pieces) != 1 or pieces[0].rows is not None or not pieces[0].key.endswith(".weight"):
        raise NotImplementedError(f"{module}.weight is not one checkpoint tensor, so moeq cannot name its kv cache "
                                  f"scale; quantize without kv_cache")
    return pieces[0].key[: -len(".weight")]


class _Discard:
    """A writer that drops what it is given (ranks other than 0 of a sharded export)."""

    def add(self, key: str, tensor: torch.Tensor) -> None:
        pass


def _sharded_rank(model: nn.Module) -> int:
    """This process's rank when the parameters are sharded over processes (FSDP2 DTensors):
    export is then a collective every rank calls; 0 otherwise."""
    import torch.distributed as dist

    if any(hasattr(p, "full_tensor") for p in model.parameters()) and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def _check_shared_keys(plan: dict[str, list[Piece]], quantized) -> None:
    """A checkpoint key that holds rows of several parameters (e.g. one fused in_proj on disk,
    split in memory) can only be written when none of them is quantized."""
    owners: dict[str, set[str]] = {}
    for name, pieces in plan.items():
        for p in pieces:
            owners.setdefault(p.key, set()).add(name)
    for key, names in owners.items():
        if len(names) > 1 and names & set(quantized):
            raise NotImplementedError(
                f"checkpoint key {key} holds the parameters {sorted(names)}, which moeq would quantize separately; "
                f"exclude all of {sorted(n.rsplit('.', 1)[0] for n in names)} (Recipe.with_exclude) to export this model")


def _ignore_list(targets, plan: dict[str, list[Piece]]) -> list[str]:
    """Checkpoint module names of the excluded modules (what the exclude/ignore list holds).

    A name that would cover a quantized module is left out: an excluded router's parameter can
    live under its parent's prefix in the checkpoint (exaone_moe saves `mlp.gate`'s
    `e_score_correction_bias` as `mlp.e_score_correction_bias`), and vLLM's ModelOpt exclude
    matching is by prefix, so `model.layers.1.mlp` would load the experts below it unquantized."""
    quantized = [f"{t.name}.{p}" for t in targets.experts for p in t.projs] + [f"{t.name}.weight" for t in targets.linears]
    q_modules = {p.key.rsplit(".", 1)[0] for n in quantized for p in plan.get(n, ())}
    names = set()
    for m in targets.excluded:
        for pname, pieces in plan.items():
            if pname.startswith(m + ".") and "." not in pname[len(m) + 1:]:
                names.update(p.key.rsplit(".", 1)[0] for p in pieces)
    return sorted(n for n in names if not any(k == n or k.startswith(n + ".") for k in q_modules))


def write_sidecar(out: Path, recipe, layout: str, excluded: list[str], tokens_per_expert: dict) -> None:
    """moeq_export.json: the recipe, what was excluded and the calibration coverage."""
    r = asdict(recipe)
    if r.get("kv_cache") is None:  # absent rather than null: exports without a KV cache scheme read as before
        r.pop("kv_cache", None)
    (out / SIDECAR).write_text(json.dumps({
        "recipe": r, "layout": layout, "excluded_modules": sorted(excluded),
        "tokens_per_expert": tokens_per_expert,
        "never_routed": {n: [e for e, c in enumerate(v) if c == 0] for n, v in tokens_per_expert.items()},
    }, indent=1) + "\n")


def _write_config(model: nn.Module, out: Path, layout, recipe, ignore, trust_remote_code: bool = False):
    from .. import __version__

    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    if not cfg.get("architectures"):
        # the transformers class, not a wrapper class made on the fly (FSDP2's fully_shard makes FSDP<Name>)
        cls = next((c for c in type(model).__mro__ if c.__module__.startswith("transformers.")), type(model))
        cfg["architectures"] = [cls.__name__]
    if cfg.get("auto_map") and not trust_remote_code:
        # The model was calibrated with transformers' own class (without trust_remote_code transformers
        # ignores auto_map whenever it has the model_type). Keeping auto_map would make a loader that passes
        # trust_remote_code run other code, or fail on .py files the export does not carry.
        log.warning("dropping auto_map (remote code %s) from the exported config.json: the model was quantized with "
                    "transformers' own %s; pass trust_remote_code=True to keep it and carry the .py files",
                    sorted(cfg["auto_map"]), cfg["architectures"][0])
        cfg.pop("auto_map")
    cfg["dtype"] = str(model.dtype).removeprefix("torch.")  # the weights' dtype now, not at load time
    qc, nested = quant_configs(layout, recipe, ignore, __version__)
    cfg["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
    if nested is not None:
        (out / "hf_quant_config.json").write_text(json.dumps(nested, indent=2) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out)


def source_dir(model: nn.Module) -> "Path | None":
    """The local directory the model was loaded from, or None (built from a config, hub id)."""
    name = str(getattr(model.config, "_name_or_path", "") or "")
    return Path(name) if name and (Path(name) / "config.json").is_file() else None


def _allowed_roots(src: Path) -> list[Path]:
    root = src.resolve()
    # a hub cache snapshot (models--org--name/snapshots/<rev>) holds links into ../../blobs
    return [root, root.parent.parent] if root.parent.name == "snapshots" else [root]


def _copy_source_files(model: nn.Module, out: Path, trust_remote_code: bool = False):
    """Carry the source directory's other files (tokenizer, chat template, ...): regular files
    inside the model folder only (a link that leads outside it is skipped with a warning), and
    Python files (remote code) only with `trust_remote_code`. Copies get normal permissions."""
    src = source_dir(model)
    if src is None:
        return  # built from a config, or from the hub cache: nothing to carry over
    roots = _allowed_roots(src)
    for f in sorted(src.iterdir()):
        if f.name in _SKIP_NAMES or f.name.endswith(_SKIP_SOURCE) or (out / f.name).exists():
            continue
        real = f.resolve()
        if not any(real == r or r in real.parents for r in roots):
            log.warning("not carrying %s into the export: it links to %s, outside the model folder", f, real)
            continue
        if not real.is_file():
            log.debug("not carrying %s into the export: not a regular file", f)
            continue
        if f.suffix == ".py" and not trust_remote_code:
            log.warning("not carrying %s into the export: remote code is carried only with trust_remote_code=True", f)
            continue
        shutil.copyfile(real, out / f.name)


def export(model: nn.Module, out_dir, layout: str = "modelopt", *, overwrite: bool = False,
           max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True,
           trust_remote_code: bool = False) -> ExportReport:
    """Write the quantized `model` to `out_dir` in the `layout` convention.

    `overwrite` replaces only an earlier moeq export, never the source model or a folder
    holding it (`outdir.check_out_dir`). `trust_remote_code` carries the source's .py files
    and config.json's auto_map; without it both are left out (with a warning)."""
    model = unwrap(model)
    session: Session | None = getattr(model, SESSION_ATTR, None)
    if session is None:
        raise ValueError("this model was never quantized; run moeq.quantize(model, recipe, calib_data) before moeq.export")
    if session.from_checkpoint:
        raise ValueError("this model was loaded from an export (moeq.load); its original weights are gone, so it cannot be "
                         "exported again: copy the checkpoint directory, or quantize the original model")
    recipe = session.recipe
    check_supported(layout, recipe)
    check_experts_supported(layout, recipe, session.targets.experts, session.targets.linears)
    t0 = time.perf_counter()
    sources = {f"{st.target.name}.{p}": (st, p) for st in session.experts for p in st.target.projs}
    sources.update({f"{n}.weight": (st, None) for n, st in session.linears.items()})
    plan = checkpoint_plan(model)
    _check_shared_keys(plan, sources)
    ignore = _ignore_list(session.targets, plan)
    sd = model.state_dict(keep_vars=True)
    plain = revert_weight_conversion(model, {n: full(sd[n].detach()) for n in plan if n not in sources})
    rank = _sharded_rank(model)

    def write_tensors(w) -> None:
        for pname in tqdm(list(sources), desc="exporting", disable=not progress or rank != 0, unit="tensor"):
            st, proj = sources[pname]
            if proj is None:
                _write_linear(w, layout, recipe, st, plan[pname])
            else:
                _write_experts(w, layout, recipe, st, proj, plan[pname])
        for key, t in plain.items():
            w.add(key, t)
        for st in session.attention:  # kv_cache: the static k/v scales
            k_proj, v_proj = (_module_key(plan, f"{st.name}.{p}") for p in ("k_proj", "v_proj"))
            for key, t in kv_cache_tensors(layout, st.scale, k_proj, v_proj).items():
                w.add(key, t)

    if rank != 0:  # FSDP2: gather every parameter with rank 0 (the same collectives, same order); rank 0 writes
        write_tensors(_Discard())
        return ExportReport(str(out_dir), layout, recipe.name, time.perf_counter() - t0, 0, 0, ignore)
    n_tensors = 0
    with AtomicDir(out_dir, overwrite, source=source_dir(model)) as tmp:
        w = ShardWriter(tmp, max_shard_bytes)
        write_tensors(w)
        w.close()
        n_tensors = sum(len(s) for s in w.shards)
        _write_config(model, tmp, layout, recipe, ignore, trust_remote_code)
        _copy_source_files(model, tmp, trust_remote_code)
        rep = session.report
        report = ExportReport(str(out_dir), layout, recipe.name, 0.0, w.total_bytes, n_tensors, ignore,
                              dict(rep.never_routed) if rep else {})
        write_sidecar(tmp, recipe, layout, session.targets.excluded, rep.tokens_per_expert if rep else {})
    report.seconds = time.perf_counter() - t0
    return report
