"""Bad input is refused with an error that names the problem."""

from __future__ import annotations

import pytest
import torch

from moeq.formats import fp4, fp8, int4, nvfp4

# every public entry point that validates x, as f(x) with a matching per-tensor amax
ENTRY_POINTS = {
    "nvfp4.quantize": lambda x: nvfp4.quantize(x, 1.0),
    "nvfp4.fake_quant": lambda x: nvfp4.fake_quant(x, 1.0),
    "fp8.quantize": lambda x: fp8.quantize(x, 1.0),
    "fp8.fake_quant": lambda x: fp8.fake_quant(x, 1.0),
    "int4.quantize": lambda x: int4.quantize(x),
    "int4.fake_quant": lambda x: int4.fake_quant(x),
}
ALL = pytest.mark.parametrize("fn", list(ENTRY_POINTS.values()), ids=list(ENTRY_POINTS))


def ok_input(**kw) -> torch.Tensor:
    return torch.ones(4, 256, **kw)  # valid for every format (K = 256: 16 | K, 128 | K)


@ALL
def test_valid_input_is_accepted(fn):
    fn(ok_input())  # the baseline the other tests break one thing of


@pytest.mark.parametrize(
    "fn,k,size",
    [
        (lambda x: nvfp4.quantize(x, 1.0), 24, 16),
        (lambda x: nvfp4.fake_quant(x, 1.0), 100, 16),
        (lambda x: int4.quantize(x), 192, 128),
        (lambda x: int4.fake_quant(x), 64, 128),
        (lambda x: int4.quantize(x, group_size=32), 48, 32),
    ],
)
def test_k_not_divisible_by_block(fn, k, size):
    with pytest.raises(ValueError, match=rf"{k} elements in its last \(K\) dim.*not divisible.*size {size}"):
        fn(torch.ones(4, k))


@ALL
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_input(fn, bad, dtype):
    x = ok_input(dtype=dtype)
    x[2, 200] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        fn(x)


@ALL
@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.uint8, torch.int64, torch.bool, torch.float64])
def test_unsupported_dtype(fn, dtype):
    with pytest.raises(TypeError, match=rf"dtype {dtype}.*float32, bfloat16 or float16"):
        fn(ok_input().to(dtype))


@ALL
def test_not_a_tensor(fn):
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        fn([[1.0] * 256])


@ALL
@pytest.mark.parametrize("shape", [(0, 256), (2, 0, 256), (4, 0)])
def test_empty_input(fn, shape):
    with pytest.raises(ValueError, match="empty"):
        fn(torch.empty(shape))


AMAX_FNS = {
    "nvfp4.quantize": nvfp4.quantize,
    "nvfp4.fake_quant": nvfp4.fake_quant,
    "fp8.quantize": fp8.quantize,
    "fp8.fake_quant": fp8.fake_quant,
}
AMAX = pytest.mark.parametrize("fn", list(AMAX_FNS.values()), ids=list(AMAX_FNS))


@AMAX
@pytest.mark.parametrize(
    "amax_shape",
    [
        (4,),  # E + 1 experts
        (8,),  # N: a per-channel amax without the expert dim
        (3, 4),  # wrong N
        (3, 8, 32),  # covers K too
        (1,),  # compressed-tensors' [1]-shaped global scale is not a per-tensor amax
    ],
)
def test_amax_of_wrong_shape(fn, amax_shape):
    x = torch.randn(3, 8, 32)
    with pytest.raises(ValueError, match=r"amax of shape .* must cover a prefix of the leading dims"):
        fn(x, torch.ones(amax_shape))


@AMAX
@pytest.mark.parametrize("amax", [-1.0, float("nan"), float("inf")])
def test_bad_amax_value(fn, amax):
    x = torch.randn(3, 8, 32)
    with pytest.raises(ValueError, match="amax must be finite and >= 0"):
        fn(x, torch.tensor(amax))
    with pytest.raises(ValueError, match="amax must be finite and >= 0"):
        fn(x, torch.tensor([1.0, amax, 2.0]))  # one bad expert among good ones


def test_pack_errors():
    with pytest.raises(ValueError, match="odd number"):
        fp4.pack(torch.zeros(2, 5, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        fp4.pack(torch.zeros(2, 4, dtype=torch.int8))
    with pytest.raises(TypeError, match="uint8"):
        fp4.unpack(torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="uint8"):
        fp4.decode(torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="multiple of 8"):
        int4.pack(torch.zeros(2, 12, dtype=torch.int8))
    with pytest.raises(TypeError, match="int8"):
        int4.pack(torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="int32"):
        int4.unpack(torch.zeros(2, 1, dtype=torch.int64))
