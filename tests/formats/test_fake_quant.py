"""fake_quant(x) == dequantize(quantize(x)) bit-exactly, in x's dtype.

fake_quant has its own hot path (nvfp4.fake_quant_with_global_scale,
fp8.fake_quant_with_scale), so the inputs include the edge cases that path handles
separately: all-zero blocks, blocks under the scale floor, values saturating past amax,
tiny negatives that round to -0.0.
"""

from __future__ import annotations

import pytest
import torch

from moeq.formats import fp8, int4, nvfp4

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def sample(dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 256, generator=g) * 3
    x[0, 0, :128] = 0.0  # all-zero blocks and a zero group
    x[0, 1, 16:32] = 1e-4  # far below the tensor's amax
    x[1, 2, :4] = torch.tensor([-1e-3, 1e-3, -0.0, 1e-3])
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("amax_factor", [1.0, 0.25])
def test_nvfp4(dtype, amax_factor):
    x = sample(dtype)
    amax = x.float().abs().amax() * amax_factor
    q = nvfp4.quantize(x, amax)
    fq = nvfp4.fake_quant(x, amax)
    assert fq.dtype == dtype and fq.shape == x.shape
    assert torch.equal(bits(fq), bits(nvfp4.dequantize(q.codes, q.block_scale, q.global_scale, dtype=dtype)))
    assert fq[1, 2, 0] == 0 and torch.signbit(fq[1, 2, 0])  # -1e-3 -> code 8 -> -0.0
    assert (fq[0, 0, :128] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per", ["tensor", "channel"])
@pytest.mark.parametrize("amax_factor", [1.0, 0.25])
def test_fp8(dtype, per, amax_factor):
    x = sample(dtype)
    amax = x.float().abs().amax() if per == "tensor" else x.float().abs().amax(-1)
    amax = amax * amax_factor
    q = fp8.quantize(x, amax)
    fq = fp8.fake_quant(x, amax)
    assert fq.dtype == dtype and fq.shape == x.shape
    assert torch.equal(bits(fq), bits(fp8.dequantize(q.codes, q.scale, dtype=dtype)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [128, 32])
def test_int4(dtype, group_size):
    x = sample(dtype)
    q = int4.quantize(x, group_size)
    fq = int4.fake_quant(x, group_size)
    assert fq.dtype == dtype and fq.shape == x.shape
    assert torch.equal(bits(fq), bits(int4.dequantize(q.codes, q.scale, dtype=dtype)))
