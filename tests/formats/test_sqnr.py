"""SQNR floors per format on Gaussian and heavy-tailed (Student-t, df=3) data.

SQNR = 10 log10(|x|^2 / |x - fake_quant(x)|^2), x drawn in float64 (the reference),
quantized as float32 and as bfloat16 (same floors: bf16 rounding of the input costs
under 0.2 dB at these levels). Floors sit about 1 dB below the measured values (docs/formats.md);
re-measure with `python -m tests.formats.test_sqnr` from the repository root.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from moeq.formats import fp8, int4, mx, nvfp4
from moeq.schemes import fp8_block, fp8_dynamic

SHAPE = (128, 1024)
SEED = 0


@functools.cache  # read-only: callers never modify it
def data(dist: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED)
    z = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    if dist == "gaussian":
        return z
    # Student-t, df = 3: z / sqrt(chi2_3 / 3)
    chi2 = torch.randn((*SHAPE, 3), generator=g, dtype=torch.float64).pow(2).sum(-1)
    return z / (chi2 / 3).sqrt()


FORMATS = {
    "nvfp4": lambda x: nvfp4.fake_quant(x, x.abs().amax()),
    "fp8 per-tensor": lambda x: fp8.fake_quant(x, x.abs().amax()),
    "fp8 per-channel": lambda x: fp8.fake_quant(x, x.abs().amax(-1)),
    "int4 g128": lambda x: int4.fake_quant(x, 128),
    # fp8-dynamic's schemes, through the scheme objects (rows = output channels / tokens)
    "fp8-dynamic weight": lambda x: fp8_dynamic.WEIGHT.fake_quant(x, None, 1),
    "fp8-dynamic input": lambda x: fp8_dynamic.INPUT.fake_quant(x, None),
    "mxfp4": lambda x: mx.fake_quant(x, "e2m1"),
    "mxfp8": lambda x: mx.fake_quant(x, "e4m3"),
    # fp8-block's schemes: 128 x 128 weight blocks, input groups of 128 along each row
    "fp8-block weight": lambda x: fp8_block.WEIGHT.fake_quant(x, None, 128),
    "fp8-block input": lambda x: fp8_block.INPUT.fake_quant(x, None),
}

# dB: min(float32, bfloat16) measured, minus 1, rounded down; measured values in docs/formats.md
FLOORS = {
    ("nvfp4", "gaussian"): 19.4,
    ("nvfp4", "student_t3"): 19.8,
    ("fp8 per-tensor", "gaussian"): 30.5,
    ("fp8 per-tensor", "student_t3"): 30.4,
    ("fp8 per-channel", "gaussian"): 30.5,
    ("fp8 per-channel", "student_t3"): 31.1,
    ("int4 g128", "gaussian"): 18.0,
    ("int4 g128", "student_t3"): 12.3,
    ("fp8-dynamic weight", "gaussian"): 30.5,
    ("fp8-dynamic weight", "student_t3"): 31.1,
    ("fp8-dynamic input", "gaussian"): 30.5,
    ("fp8-dynamic input", "student_t3"): 31.1,
    ("mxfp4", "gaussian"): 18.0,
    ("mxfp4", "student_t3"): 16.1,
    ("mxfp8", "gaussian"): 30.4,
    ("mxfp8", "student_t3"): 30.4,
    ("fp8-block weight", "gaussian"): 30.5,
    ("fp8-block weight", "student_t3"): 30.7,
    ("fp8-block input", "gaussian"): 30.7,
    ("fp8-block input", "student_t3"): 31.9,
}


def sqnr(fmt: str, dist: str, dtype=torch.float32) -> float:
    ref = data(dist)
    fq = FORMATS[fmt](ref.to(dtype))
    assert fq.dtype == dtype
    fq = fq.double()
    return 10 * math.log10(ref.pow(2).sum().item() / (ref - fq).pow(2).sum().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt,dist", list(FLOORS))
def test_sqnr_floor(fmt, dist, dtype):
    assert sqnr(fmt, dist, dtype) >= FLOORS[(fmt, dist)]


if __name__ == "__main__":
    print(f"shape {SHAPE}, seed {SEED}, torch {torch.__version__}")
    print("| format | data | float32 (dB) | bfloat16 (dB) | floor (dB) |\n| --- | --- | --- | --- | --- |")
    for fmt, dist in FLOORS:
        f32, bf16 = sqnr(fmt, dist), sqnr(fmt, dist, torch.bfloat16)
        print(f"| {fmt} | {dist} | {f32:.2f} | {bf16:.2f} | {FLOORS[(fmt, dist)]} |")
