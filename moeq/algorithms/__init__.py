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

Steps run in this order whatever order they are named in: mse (clipping search, weights
only) then gptq (error compensation with per-expert Hessians, needs calibration data;
it keeps the scales mse chose). "awq" is not implemented yet and is refused.
"""

from __future__ import annotations

ALGORITHMS = ("max", "mse", "gptq")
_ORDER = ("mse", "gptq")
_NOT_YET = {"awq": "AWQ-style scaling is not implemented yet (issue #15, part 4); use 'mse', 'gptq' or 'mse+gptq'"}


def parse(algorithm) -> tuple[str, ...]:
    """'max' | 'mse' | 'gptq' | 'mse+gptq' | ('mse', 'gptq') -> the steps to run after max
    calibration, in run order (() for plain max)."""
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
    """Refuse a weight scheme whose sub-tensor scales cannot be fixed (no unit_amax)."""
    from ..schemes.table import WEIGHT

    s = WEIGHT[recipe.weight]
    if steps and s.granularity != "tensor" and s.unit_amax is None:
        raise ValueError(f"calibration algorithm {name(steps)!r} needs the weight scheme {s.name!r} to accept fixed "
                         f"per-{s.granularity} scales (WeightScheme.unit_amax); use algorithm='max' for it")


def needs_data_again(steps: tuple[str, ...]) -> bool:
    """Whether the steps run the calibration batches again after calibration (so a one-shot
    iterable must be kept as a list)."""
    return "gptq" in steps


def run(session, steps: tuple[str, ...], report, batches: list | None, progress: bool = False) -> None:
    """After `Session.finalize`: run the steps on every quantized module."""
    if "mse" in steps:
        from . import mse

        mse.run(session)
    if "gptq" in steps:
        from . import gptq

        gptq.run(session, report, batches, progress=progress)
