"""CPU and CUDA give identical results (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from moeq.formats import fp8, int4, nvfp4

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def same(cpu: torch.Tensor, cuda: torch.Tensor) -> bool:
    return cuda.device.type == "cuda" and torch.equal(bits(cpu), bits(cuda.cpu()))


def sample(dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 32, 512, generator=g) * torch.tensor([1e-3, 1.0, 50.0])[:, None, None]
    x[0, 0, :128] = 0.0
    x[2, 1, 16:32] = 1e-30
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nvfp4(dtype):
    x = sample(dtype)
    amax = x.float().abs().amax(dim=(1, 2)) * 0.9
    a, b = nvfp4.quantize(x, amax), nvfp4.quantize(x.cuda(), amax.cuda())
    assert same(a.codes, b.codes) and same(a.block_scale, b.block_scale) and same(a.global_scale, b.global_scale)
    assert same(nvfp4.pack(a.codes), nvfp4.pack(b.codes))
    assert same(nvfp4.fake_quant(x, amax), nvfp4.fake_quant(x.cuda(), amax.cuda()))
    assert same(
        nvfp4.dequantize(a.codes, a.block_scale, a.global_scale, dtype),
        nvfp4.dequantize(b.codes, b.block_scale, b.global_scale, dtype),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per", ["expert", "channel"])
def test_fp8(dtype, per):
    x = sample(dtype)
    amax = x.float().abs().amax(dim=(1, 2) if per == "expert" else 2) * 0.9
    a, b = fp8.quantize(x, amax), fp8.quantize(x.cuda(), amax.cuda())
    assert same(a.codes, b.codes) and same(a.scale, b.scale)
    assert same(fp8.fake_quant(x, amax), fp8.fake_quant(x.cuda(), amax.cuda()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int4(dtype):
    x = sample(dtype)
    a, b = int4.quantize(x), int4.quantize(x.cuda())
    assert same(a.codes, b.codes) and same(a.scale, b.scale)
    assert same(int4.pack(a.codes), int4.pack(b.codes))
    assert same(int4.unpack(int4.pack(a.codes)), int4.unpack(int4.pack(b.codes)))
    assert same(int4.fake_quant(x), int4.fake_quant(x.cuda()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_dynamic(dtype):
    from moeq.schemes.fp8_dynamic import INPUT, WEIGHT

    x = sample(dtype)
    a, b = WEIGHT.quantize(x, None, 1), WEIGHT.quantize(x.cuda(), None, 1)
    assert same(a.codes, b.codes) and same(a.scale, b.scale)
    assert same(WEIGHT.fake_quant(x, None, 1), WEIGHT.fake_quant(x.cuda(), None, 1))
    assert same(INPUT.fake_quant(x, None), INPUT.fake_quant(x.cuda(), None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("element", ["e2m1", "e4m3"])
def test_mx(dtype, element):
    from moeq.formats import mx

    x = sample(dtype)
    a, b = mx.quantize(x, element), mx.quantize(x.cuda(), element)
    assert same(a.codes, b.codes) and same(a.scale, b.scale)
    assert same(mx.fake_quant(x, element), mx.fake_quant(x.cuda(), element))
    assert same(mx.dequantize(a.codes, a.scale, dtype), mx.dequantize(b.codes, b.scale, dtype))
def test_fp8_block(dtype):
    from moeq.formats import fp8_block
    from moeq.schemes.fp8_block import INPUT

    x = sample(dtype)  # [3, 32, 512]: one partial 32-row block per expert
    a, b = fp8_block.quantize(x), fp8_block.quantize(x.cuda())
    assert same(a.codes, b.codes) and same(a.scale, b.scale)
    assert same(fp8_block.fake_quant(x), fp8_block.fake_quant(x.cuda()))
    assert same(INPUT.fake_quant(x, None), INPUT.fake_quant(x.cuda(), None))
