"""Calibration algorithms beyond max: which scales and weights the quantized model gets.

    moeq.quantize(model, "nvfp4", data, algorithm="mse+gptq")

max (the default) takes every scale from the weight's own amax. The others run after max
calibration (`Session.finalize`) and leave exactly two kinds of result, which the
fake-quant forward (`weight_fq`) and `moeq.export` both read, so the in-memory model and
its export stay identical:
- `state.group_amax[proj]` float32 [E, N, K/g] (Linear: [N, K/g]): the amax each
  sub-tensor scale (NVFP4 block, INT4 group, FP8 row) is computed from instead of the
  weight's own; for per-tensor schemes (FP8) `state.w_amax` itself is replaced.
- the module's parameters, rewritten in place (GPTQ): the dequantized GPTQ weights, whose
  round-to-nearest quantization with the fixed scales gives exactly the GPTQ codes.

Steps run in this order whatever order they are named in: awq, mse, gptq.
- awq (activation-aware scaling, needs calibration data) runs BEFORE max calibration: its
  own statistics pass, then per-channel scales folded into the norms, routers, experts and
  Linears (`run_before`), so the model the max statistics see is already scaled and the
  export needs no extra tensor. A third kind of result: rewritten parameters whose
  unquantized function is unchanged.
- mse (clipping search, weights only) then gptq (error compensation with per-expert
  Hessians, needs calibration data; it keeps the scales mse chose) run after.
"""

from __future__ import annotations

ALGORITHMS = ("max", "awq", "mse", "gptq")
_ORDER = ("awq", "mse", "gptq")
_NOT_YET: dict[str, str] = {}


def parse(algorithm) -> tuple[str, ...]:
    """'max' | 'awq' | 'mse' | 'gptq' | 'awq+mse+gptq' | ('mse', 'gptq') -> the steps, in run
    order (() for plain max)."""
    names = algorithm.split("+") if isinstance(algorithm, str) else list(algorithm)
    names = [str(n).strip().lower() for n in names]
    if not names or any(not n for n in names):
        raise ValueError(f"empty calibration algorithm {algorithm!r}; choose from {', '.join(ALGORITHMS)} or a '+' combination")
    for n in names:
        if n in _NOT_YET:
            raise NotImplementedError(_NOT_YET[n])
        if n not in ALGORITHMS:
            raise ValueError(f"unknown calibration algorithm {n!r}; choose from {', '.join(ALGORITHMS)} or a '+' combination "
                             f"such as 'mse+gptq'")
    if "max" in names and len(names) > 1:
        raise ValueError(f"'max' is the plain algorithm and combines with nothing; got {algorithm!r}")
    return tuple(n for n in _ORDER if n in names)


def name(steps: tuple[str, ...]) -> str:
    return "+".join(steps) or "max"


def check_supported(steps: tuple[str, ...], recipe) -> None:
    """Refuse a weight scheme whose sub-tensor scales cannot be fixed (no unit_amax) or that has no
    fixed-scale fake quant (WeightScheme.scales / fake_quant_scaled, which mse and gptq run on)."""
    from ..schemes.table import WEIGHT

    s = WEIGHT[recipe.weight]
    fixable = (s.granularity == "tensor" or s.unit_amax is not None) and s.scales is not None
    if {"mse", "gptq"} & set(steps) and not fixable:
        raise ValueError(f"calibration algorithm {name(steps)!r} needs the weight scheme {s.name!r} to accept fixed "
                         f"per-{s.granularity} scales (WeightScheme.unit_amax, scales); use algorithm='max' for it")


def run_before(session, steps: tuple[str, ...], calibrate, calib_data, report) -> None:
    """Before max calibration: AWQ's statistics pass (calibrate() runs one), scale search and
    folds; the calibration statistics are reset afterwards."""
    if "awq" in steps:
        from . import awq

        awq.run(session, calibrate, calib_data, report)


def needs_data_again(steps: tuple[str, ...]) -> bool:
    """Whether the steps run the calibration batches more than once (so a one-shot iterable
    must be kept as a list): AWQ's statistics pass, GPTQ's layer-sequential passes."""
    return "gptq" in steps or "awq" in steps


def run(session, steps: tuple[str, ...], report, batches: list | None, progress: bool = False) -> None:
    """After `Session.finalize`: run mse and gptq on every quantized module."""
    if "mse" in steps:
        from . import mse

        mse.run(session)
    if "gptq" in steps:
        from . import gptq

        gptq.run(session, report, batches, progress=progress)
