"""One call over stacked experts [E, N, K] == E separate calls, bit-exactly.

amax covers a prefix of x's dims: [E] per expert, [E, N] per channel. E != N on purpose,
so an amax broadcast along the wrong dim fails loudly instead of passing by accident.
"""

from __future__ import annotations

import pytest
import torch

from moeq.formats import fp8, int4, nvfp4

E, N, K = 3, 8, 256


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def experts(dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(E, N, K, generator=g) * torch.tensor([1e-3, 1.0, 50.0])[:, None, None]
    x[1, 2, 16:32] = 0.0  # an all-zero block/group
    x[2, 3, 32:48] = 1e-30  # a block far below its expert's amax (denormal floor)
    return x.to(dtype)


# amax_factor < 1: a calibrated amax below the weights' own, so values saturate
@pytest.mark.parametrize("amax_factor", [1.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_per_expert(amax_factor, dtype):
    x = experts(dtype)
    amax = x.float().abs().amax(dim=(1, 2)) * amax_factor
    q = nvfp4.quantize(x, amax)
    assert q.global_scale.shape == (E,)
    fq = nvfp4.fake_quant(x, amax)
    for e in range(E):
        qe = nvfp4.quantize(x[e], amax[e])
        assert torch.equal(q.codes[e], qe.codes)
        assert torch.equal(bits(q.block_scale[e]), bits(qe.block_scale))
        assert torch.equal(bits(q.global_scale[e]), bits(qe.global_scale))
        assert torch.equal(bits(fq[e]), bits(nvfp4.fake_quant(x[e], amax[e])))
    deq = nvfp4.dequantize(q.codes, q.block_scale, q.global_scale, dtype=dtype)
    assert torch.equal(bits(deq), bits(fq))
    # per-expert scales really differ: one shared amax would give other block scales
    assert not torch.equal(bits(q.block_scale), bits(nvfp4.quantize(x, amax.max()).block_scale))


@pytest.mark.parametrize("amax_factor", [1.0, 0.5])
@pytest.mark.parametrize("per", ["expert", "channel"])
def test_fp8_per_expert_and_per_channel(amax_factor, per):
    x = experts()
    amax = x.abs().amax(dim=(1, 2) if per == "expert" else 2) * amax_factor
    q = fp8.quantize(x, amax)
    assert q.scale.shape == amax.shape
    fq = fp8.fake_quant(x, amax)
    for e in range(E):
        qe = fp8.quantize(x[e], amax[e])
        assert torch.equal(bits(q.codes[e]), bits(qe.codes))
        assert torch.equal(bits(q.scale[e]), bits(qe.scale))
        assert torch.equal(bits(fq[e]), bits(fp8.fake_quant(x[e], amax[e])))
    if per == "channel":  # and each channel is its own per-tensor call
        for e in range(E):
            for n in range(N):
                qn = fp8.quantize(x[e, n : n + 1], amax[e, n])
                assert torch.equal(bits(q.codes[e, n : n + 1]), bits(qn.codes))
    assert torch.equal(bits(fp8.dequantize(q.codes, q.scale)), bits(fq))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_per_expert(dtype):
    x = experts(dtype)
    q = int4.quantize(x)
    assert q.scale.shape == (E, N, K // 128)
    packed = int4.pack(q.codes)
    fq = int4.fake_quant(x)
    for e in range(E):
        qe = int4.quantize(x[e])
        assert torch.equal(q.codes[e], qe.codes)
        assert torch.equal(bits(q.scale[e]), bits(qe.scale))
        assert torch.equal(packed[e], int4.pack(qe.codes))
        assert torch.equal(bits(fq[e]), bits(int4.fake_quant(x[e])))


def test_nvfp4_per_row_activation_amax():
    # activations [S, K] with a per-row amax [S] (dynamic per-token style)
    x = experts()[1]
    amax = x.abs().amax(-1)
    q = nvfp4.quantize(x, amax)
    assert q.global_scale.shape == (N,)
    fq = nvfp4.fake_quant(x, amax)
    for s in range(N):
        qs = nvfp4.quantize(x[s : s + 1], amax[s])
        assert torch.equal(q.codes[s : s + 1], qs.codes)
        assert torch.equal(bits(q.block_scale[s : s + 1]), bits(qs.block_scale))
        assert torch.equal(bits(fq[s : s + 1]), bits(nvfp4.fake_quant(x[s : s + 1], amax[s])))
