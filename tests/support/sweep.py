"""The supported-models sweep: every fused-experts MoE in the installed transformers, end to end.

For each model type that :func:`tiny_models.discover_experts_classes` finds (no hard-coded list), build the tiny
random model, and for each preset in :data:`PRESETS`:

1. quantize it under transformers' default experts implementation with :data:`CALIB_BATCHES` small batches;
2. export it in each layout of :data:`LAYOUTS` (a preset/layout pair moeq refuses by design is checked to be
   refused with ``ValueError`` and recorded as ``n/a``);
3. reload the export with ``moeq.load`` and require its output (logits, or the last hidden state of the text
   backbones ``tiny_models`` builds for multimodal families) to be *bit-identical* (``torch.equal``) to the
   in-memory quantized model's on fresh token ids.

Nothing is worked around: any exception in quantize / export / load / forward is recorded as ``fail: <stage>:
<error>``. ``scripts/support_table.py`` renders the results into the README's supported-models table.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
import re
import sys
import time
import traceback
from pathlib import Path

import torch

import moeq
from moeq.checkpoint.layouts import UnsupportedExport
from moeq.quantization import ShapeError

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
import tiny_models as tm  # noqa: E402
from export.helpers import ignored_but_quantized  # noqa: E402

PRESETS = ("nvfp4", "w4a16-int4", "mxfp4", "fp8-block")
LAYOUTS = ("modelopt", "compressed-tensors")

#: (preset, layout) pairs moeq refuses on purpose; the sweep checks the refusal (ValueError) and records n/a.
REFUSED = {
    ("w4a16-int4", "modelopt"): "by design: vLLM's modelopt loader has no INT4 scheme (export raises ValueError)",
    ("mxfp4", "modelopt"): "by design: vLLM's modelopt loader has no MXFP4 scheme (export raises ValueError)",
    ("fp8-block", "modelopt"): "by design: vLLM's modelopt FP8 MoE method reads per-tensor scales (export raises ValueError)",
}
#: presets whose blocks span rows: a tiny model whose fused siblings / gate-up halves do not end on a block boundary
#: is refused before calibration (moeq.quantization.ShapeError), as vLLM would refuse the checkpoint
ROW_BLOCK_PRESETS = ("fp8-block",)
SHAPE_REFUSAL = "n/a: shapes: "

#: transformers' own default (``get_correct_experts_implementation(None)`` picks grouped_mm when it can dispatch,
#: which it always can on CPU); moeq.load is called without ``experts_implementation`` so it gets the same default.
EXPERTS_IMPLEMENTATION = "grouped_mm"

CALIB_BATCHES = 2  #: calibration batches of CALIB_SHAPE tokens each (distinct seeds)
CALIB_SHAPE = (2, 8)
EVAL_SHAPE = (2, 8)  #: token ids the reloaded and in-memory models are compared on (a seed not used to calibrate)
EVAL_SEED = 100


@dataclasses.dataclass
class CaseResult:
    """One (model type, preset, layout) outcome."""

    preset: str
    layout: str
    status: str  #: "pass", "fail: <stage>: <error>" or "n/a: <reason>"
    detail: str = ""  #: full traceback / numbers for failures

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    @property
    def not_applicable(self) -> bool:
        return self.status.startswith("n/a")


@dataclasses.dataclass
class ModelResult:
    """Everything the sweep learned about one discovered model type."""

    model_type: str
    experts_class: str
    model_class: str | None
    flags: dict[str, bool]
    cases: dict[tuple[str, str], CaseResult] = dataclasses.field(default_factory=dict)
    skip_reason: str | None = None  #: set when the tiny model cannot be built / run on token ids
    notes: list[str] = dataclasses.field(default_factory=list)  #: how it was tested, when not the plain causal LM
    seconds: float = 0.0

    def status(self, preset: str, layout: str) -> str:
        if self.skip_reason is not None:
            return f"skipped: {self.skip_reason}"
        return self.cases[(preset, layout)].status

    @property
    def passed(self) -> bool:
        """Every applicable (preset, layout) passed."""
        return self.skip_reason is None and all(c.passed or c.not_applicable for c in self.cases.values())

    @property
    def failures(self) -> list[CaseResult]:
        return [c for c in self.cases.values() if not (c.passed or c.not_applicable)]

    @property
    def flags_text(self) -> str:
        return flags_text(self.flags)


def flags_text(flags: dict[str, bool]) -> str:
    """``use_experts_implementation`` flags in words: "gated, concatenated", "no gate", "transposed, ..."."""
    parts = []
    if flags.get("is_transposed"):
        parts.append("transposed")
    if flags.get("has_gate", True):
        parts += ["gated", "concatenated" if flags.get("is_concatenated", True) else "interleaved"]
    else:
        parts.append("no gate")
    if flags.get("has_bias"):
        parts.append("bias")
    if flags.get("has_post_expert_norm"):
        parts.append("post-expert norm")
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------------------------


class _StageError(Exception):
    def __init__(self, stage: str, err: BaseException):
        super().__init__(stage)
        self.stage, self.err = stage, err
        self.tb = "".join(traceback.format_exception(err))


def _stage(stage: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - every failure is recorded, never swallowed
        raise _StageError(stage, err) from err


def _one_line(text: str, tmp_dir: Path | None = None, limit: int = 400) -> str:
    """A deterministic one-line error: temp paths and object addresses removed, whitespace collapsed."""
    if tmp_dir is not None:
        text = text.replace(str(tmp_dir), "<tmp>")
    text = re.sub(r"/tmp/[^\s'\"]*", "<tmp>", text)
    text = re.sub(r"0x[0-9a-fA-F]{6,}", "0x…", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fail(preset: str, layout: str, e: _StageError, tmp_dir: Path) -> CaseResult:
    msg = _one_line(f"{type(e.err).__name__}: {e.err}", tmp_dir)
    return CaseResult(preset, layout, f"fail: {e.stage}: {msg}", e.tb)


def extra_inputs(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Integer inputs besides ``input_ids`` that route tokens to a modality's experts.

    Ernie-4.5-VL's text backbone sends tokens marked 1 in ``moe_mm_token_type_ids`` to its vision experts: on
    text alone they never run and their NVFP4 input scales cannot be calibrated. Any ``forward`` argument named
    ``*token_type_ids`` gets the second half of every sequence marked 1 (only ids: no pixels are involved).
    """
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    tt = torch.zeros_like(ids)
    tt[:, ids.shape[1] // 2:] = 1
    return {name: tt for name in params if name.endswith("token_type_ids")}


def calib_batches(model) -> list:
    b, t = CALIB_SHAPE
    out = []
    for s in range(CALIB_BATCHES):
        ids = tm.random_input_ids(model, batch=b, seq=t, seed=s)
        extra = extra_inputs(model, ids)
        out.append({"input_ids": ids, **extra} if extra else ids)
    return out


def eval_ids(model) -> torch.Tensor:
    b, t = EVAL_SHAPE
    return tm.random_input_ids(model, batch=b, seq=t, seed=EVAL_SEED)


def output(model) -> torch.Tensor:
    """The compared tensor on eval_ids: ``tm.forward_output`` (logits, or the last hidden state of text backbones),
    with :func:`extra_inputs` when the model takes them."""
    ids = eval_ids(model)
    extra = extra_inputs(model, ids)
    if not extra:
        return tm.forward_output(model, ids)
    out = model(input_ids=ids, use_cache=False, **extra)
    for attr in ("logits", "last_hidden_state"):
        val = getattr(out, attr, None)
        if isinstance(val, torch.Tensor):
            return val
    return out[0]


def build(case: tm.ExpertsCase):
    """-> (tiny fp32 model, its unquantized output on eval_ids). Raises _StageError('build' / 'plain forward')."""
    model = _stage("build", tm.tiny_model, case.model_type, experts_implementation=EXPERTS_IMPLEMENTATION)
    out = _stage("plain forward", output, model)
    return model, out


def quantized(base, plain_out: torch.Tensor, preset: str):
    """-> (fake-quantized copy of `base`, its output on eval_ids). Raises _StageError."""
    model = copy.deepcopy(base)
    report = _stage("quantize", moeq.quantize, model, preset, calib_batches(model), progress=False)
    experts = {n for n, _ in tm.experts_modules(model)}
    missing = sorted(experts - set(report.quantized))
    if missing:
        raise _StageError("quantize", AssertionError(f"experts modules not quantized: {missing}"))
    out = _stage("quantized forward", output, model)
    if torch.equal(out, plain_out):
        raise _StageError("quantize", AssertionError("fake-quant changed nothing: output equals the unquantized one"))
    return model, out


def check_layout(qmodel, ref: torch.Tensor, preset: str, layout: str, out_dir: Path) -> CaseResult:
    """Export `qmodel` in `layout` to `out_dir`, reload with moeq.load, compare with `ref` exactly."""
    if (preset, layout) in REFUSED:
        try:
            moeq.export(qmodel, out_dir, layout, progress=False)
        except ValueError:
            return CaseResult(preset, layout, f"n/a: {REFUSED[(preset, layout)]}")
        except Exception as err:  # noqa: BLE001
            e = _StageError("export", err)
            return CaseResult(preset, layout, f"fail: export: expected ValueError (refused by design), got "
                              f"{_one_line(f'{type(err).__name__}: {err}', out_dir)}", e.tb)
        return CaseResult(preset, layout, "fail: export: expected ValueError (refused by design), but it exported")
    try:
        moeq.export(qmodel, out_dir, layout, progress=False)
    except UnsupportedExport as err:  # this model's experts have no vLLM path in this combination
        return CaseResult(preset, layout, f"n/a: {_one_line(str(err), out_dir)}")
    except Exception as err:  # noqa: BLE001
        return _fail(preset, layout, _StageError("export", err), out_dir)
    covered = ignored_but_quantized(out_dir, layout)
    if covered:
        return CaseResult(preset, layout, f"fail: export: the exclude list covers quantized modules {covered[:3]} "
                          f"(vLLM would build them unquantized)")
    try:
        loaded = _stage("load", moeq.load, out_dir)
        out = _stage("reloaded forward", output, loaded)
    except _StageError as e:
        return _fail(preset, layout, e, out_dir)
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return CaseResult(preset, layout, f"fail: compare: reloaded output {tuple(out.shape)} {out.dtype} vs "
                          f"in-memory {tuple(ref.shape)} {ref.dtype} ({type(loaded).__name__})")
    if not torch.equal(out, ref):
        diff = (out.double() - ref.double()).abs()
        rel = float(diff.max() / ref.double().abs().max().clamp_min(1e-30))
        n_bad = int((diff > 0).sum())
        impl = (getattr(qmodel.config, "_experts_implementation", None), getattr(loaded.config, "_experts_implementation", None))
        return CaseResult(preset, layout, "fail: compare: reloaded output differs from the in-memory quantized model",
                          f"{n_bad}/{diff.numel()} elements differ; max abs {float(diff.max()):.3e}, max rel {rel:.3e}; loaded as {type(loaded).__name__}; "
                          f"experts implementation in-memory/loaded {impl}")
    return CaseResult(preset, layout, "pass")


def run_case(case: tm.ExpertsCase, preset: str, layout: str, tmp_dir) -> CaseResult:
    """Build, quantize, export in one layout, reload and compare: one (model type, preset, layout) outcome."""
    tmp_dir = Path(tmp_dir)
    if case.model_class is None:
        return CaseResult(preset, layout, f"n/a: {case.skip_reason}")
    try:
        base, plain = build(case)
        qmodel, ref = quantized(base, plain, preset)
    except _StageError as e:
        return _fail(preset, layout, e, tmp_dir)
    return check_layout(qmodel, ref, preset, layout, tmp_dir / f"{case.model_type}-{preset}-{layout}")


def run_model(case: tm.ExpertsCase, tmp_dir) -> ModelResult:
    """All presets x layouts of one model type; one tiny model built, quantized once per preset, exported per layout."""
    tmp_dir = Path(tmp_dir)
    t0 = time.perf_counter()
    res = ModelResult(case.model_type, case.experts_class_name, case.model_class_name, dict(case.flags))
    name = case.model_class_name or ""
    if name and not name.endswith("ForCausalLM"):
        what = "logits" if name.endswith("ForTokenClassification") else "last hidden state"
        res.notes.append(f"tested as `{name}` ({what})")
    if case.model_class is None:
        res.skip_reason = case.skip_reason or "no text-only model class"
        return res
    try:
        base, plain = build(case)
    except _StageError as e:
        # The tiny model itself does not build / run on token ids: not moeq's doing, but it still counts as not
        # supported (a skip with the stated error, never a silent one).
        res.skip_reason = f"tiny model does not {'build' if e.stage == 'build' else 'run a plain forward'}: " + \
            _one_line(f"{type(e.err).__name__}: {e.err}", tmp_dir)
        res.seconds = time.perf_counter() - t0
        return res
    extra = extra_inputs(base, eval_ids(base))
    if extra:
        res.notes.append(f"calibrated and compared with {', '.join(f'`{k}`' for k in extra)} "
                         "(second half of each sequence marked 1: routed to the vision experts)")
    for preset in PRESETS:
        try:
            qmodel, ref = quantized(base, plain, preset)
        except _StageError as e:
            shapes = preset in ROW_BLOCK_PRESETS and isinstance(e.err, ShapeError)
            for layout in LAYOUTS:
                res.cases[(preset, layout)] = (CaseResult(preset, layout, SHAPE_REFUSAL + _one_line(str(e.err), tmp_dir))
                                               if shapes else _fail(preset, layout, e, tmp_dir))
            continue
        for layout in LAYOUTS:
            res.cases[(preset, layout)] = check_layout(
                qmodel, ref, preset, layout, tmp_dir / f"{case.model_type}-{preset}-{layout}"
            )
        del qmodel
    res.seconds = time.perf_counter() - t0
    return res


def discover_cases() -> list[tm.ExpertsCase]:
    """Every discovered experts class with the model type containing it, sorted by (model type, experts class)."""
    return sorted(tm.discover_experts_classes(), key=lambda c: (c.model_type, c.experts_class_name))


def run_sweep(tmp_dir, cases=None, log=None) -> list[ModelResult]:
    """Run :func:`run_model` over `cases` (default: every discovered model type), single-threaded, sorted by type.

    `log`: optional callable receiving each finished ModelResult (progress output).
    """
    tmp_dir = Path(tmp_dir)
    cases = discover_cases() if cases is None else list(cases)
    results = []
    with tm.single_thread(), torch.no_grad():
        for case in sorted(cases, key=lambda c: (c.model_type, c.experts_class_name)):
            r = run_model(case, tmp_dir)
            results.append(r)
            if log is not None:
                log(r)
    return results
