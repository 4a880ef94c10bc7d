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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_block(dtype):
    from moeq.formats import fp8_block
    from moeq.schemes.fp8_block import INPUT

    x = sample(dtype)  # [3, 32, 512]: one partial 32-row block per expert
    a, b = fp8_block.quantize(x), fp8_block.quantize(x.cuda())
    assert same(a.codes, b.codes) and same(a.scale, b.scale)
    assert same(fp8_block.fake_quant(x), fp8_block.fake_quant(x.cuda()))
    assert same(INPUT.fake_quant(x, None), INPUT.fake_quant(x.cuda(), None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_kernels_match_cpu(monkeypatch, dtype):
    """The Triton kernels (moeq/fused.py) give the CPU eager bits (a NaN's sign aside): IEEE
    division, no flush of denormals, no x / const -> x * (1 / const)."""
    from moeq import fused

    from .test_fused import KERNELS, same
    from .test_fused import sample as edge_sample

    monkeypatch.setenv("MOEQ_COMPILE", "1")
    for k in KERNELS.values():
        monkeypatch.setattr(k, "min_numel", 0)
        monkeypatch.setattr(k, "failed", False)
        monkeypatch.setattr(k, "devices", ("cpu", "cuda"))
    x = torch.cat([edge_sample(dtype, 37, 512), sample(dtype).reshape(-1, 512)])
    gs_t, gs_row = nvfp4.global_scale(torch.tensor(40.0)), nvfp4.global_scale(x.float().abs().amax(-1, keepdim=True).nan_to_num(1.0, 1.0))
    s_t = fp8.scale_from_amax(torch.tensor(30.0))
    cases = {
        "nvfp4": lambda d: nvfp4.fake_quant_with_global_scale(x.to(d), gs_t.to(d)),
        "nvfp4 per row": lambda d: nvfp4.fake_quant_with_global_scale(x.to(d), gs_row.to(d)),
        "fp8": lambda d: fp8.fake_quant_with_scale(x.to(d), s_t.to(d)),
        "fp8-row": lambda d: fp8.fake_quant_per_row(x.to(d)),
        "absmax": lambda d: fused.row_absmax(x.to(d)),
    }
    n = {k: v.compiled_calls for k, v in KERNELS.items()}
    for name, fn in cases.items():
        monkeypatch.setenv("MOEQ_COMPILE", "0")
        ref = fn("cpu")
        monkeypatch.setenv("MOEQ_COMPILE", "1")
        got = fn("cuda")
        assert got.device.type == "cuda" and same(ref, got.cpu()), name
    assert all(KERNELS[k].compiled_calls > n[k] for k in KERNELS)
