"""Known answers for the number formats, worked out by hand from the on-disk conventions
(see docs/formats.md and the moeq/formats module docstrings)."""

from __future__ import annotations

import pytest
import torch

from moeq.formats import fp4, fp8, int4, nvfp4

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def next_up(v: float) -> float:
    return torch.nextafter(f32(v), f32(float("inf"))).item()


def next_down(v: float) -> float:
    return torch.nextafter(f32(v), f32(float("-inf"))).item()


# ---------------------------------------------------------------- FP4 E2M1 codes


def test_fp4_decodes_all_16_codes():
    vals = fp4.decode(torch.arange(16, dtype=torch.uint8))
    assert vals.tolist() == list(E2M1) + [-v for v in E2M1]
    # code 8 is -0.0, code 0 is +0.0; all of 8..15 carry the sign bit
    assert torch.signbit(vals).tolist() == [False] * 8 + [True] * 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp4_decode_dtype(dtype):
    vals = fp4.decode(torch.tensor([7, 8, 15], dtype=torch.uint8), dtype=dtype)
    assert vals.dtype == dtype
    assert vals.tolist() == [6.0, -0.0, -6.0]
    assert torch.signbit(vals).tolist() == [False, True, True]


def test_fp4_representable_values_round_to_themselves():
    for code, v in enumerate(E2M1):
        assert fp4.round_to_codes(f32(v)).item() == code
        if v:
            assert fp4.round_to_codes(f32(-v)).item() == code | 8


# value -> code; ties go to the even code (0.0, 1.0, 2.0, 4.0 have even codes 0, 2, 4, 6)
TIES = [(0.25, 0), (0.75, 2), (1.25, 2), (1.75, 4), (2.5, 4), (3.5, 6), (5.0, 6)]


@pytest.mark.parametrize("value,code", TIES)
def test_fp4_ties_round_to_even_code(value, code):
    assert fp4.round_to_codes(f32(value)).item() == code
    # negatives mirror with the sign bit; -0.25 rounds to code 8 (-0.0)
    assert fp4.round_to_codes(f32(-value)).item() == code | 8


# just off each tie, the nearer neighbour wins
OFF_TIES = [
    (next_up(0.25), 1), (next_down(0.75), 1), (next_up(1.25), 3), (next_down(1.75), 3),
    (next_up(2.5), 5), (next_down(3.5), 5), (next_up(5.0), 7),
]


@pytest.mark.parametrize("value,code", OFF_TIES)
def test_fp4_just_off_ties_round_to_nearest(value, code):
    assert fp4.round_to_codes(f32(value)).item() == code
    assert fp4.round_to_codes(f32(-value)).item() == code | 8


def test_fp4_saturates_and_signs():
    x = torch.tensor([6.0, 6.5, 100.0, 1e30, -6.0, -7.0, -1e30, -0.1, -0.0, 0.1])
    assert fp4.round_to_codes(x).tolist() == [7, 7, 7, 7, 15, 15, 15, 8, 0, 0]


# ---------------------------------------------------------------- packing, by hand


def test_fp4_pack_hand_computed_bytes():
    codes = torch.tensor([[0x1, 0x2, 0xF, 0x8, 0x7, 0x0, 0x3, 0xC]], dtype=torch.uint8)
    # element 2j in the low nibble, 2j+1 in the high nibble
    assert fp4.pack(codes).tolist() == [[0x21, 0x8F, 0x07, 0xC3]]
    assert fp4.unpack(torch.tensor([[0x21, 0x8F, 0x07, 0xC3]], dtype=torch.uint8)).tolist() == codes.tolist()


INT4_WORDS = [
    ([0, 1, 2, 3, 4, 5, 6, 7], 0xFEDCBA98 - 2**32),  # stored q + 8 = 8..15, LSB first
    ([-8, -7, -6, -5, -4, -3, -2, -1], 0x76543210),
    ([-8] * 8, 0),
    ([7] + [-8] * 7, 0xF),
    ([-8] * 7 + [0], -(2**31)),  # top nibble 8 -> negative int32
    ([-8] * 7 + [-1], 0x70000000),  # top nibble 7 -> still positive
    ([0] * 8, 0x88888888 - 2**32),
]


@pytest.mark.parametrize("codes,word", INT4_WORDS)
def test_int4_pack_hand_computed_words(codes, word):
    packed = int4.pack(torch.tensor([codes], dtype=torch.int8))
    assert packed.dtype == torch.int32
    assert packed.tolist() == [[word]]
    assert int4.unpack(torch.tensor([[word]], dtype=torch.int32)).tolist() == [codes]


# ---------------------------------------------------------------- NVFP4

# one row of 4 blocks of 16, amax 2688 = 6 * 448, so global scale 1 (scale_2 1)
_B0 = [448.0 * v for v in (6, -3, 1, 0.5, -0.5, 2, 4, 1.5)] + [0.0] * 8  # block scale 448
_B1 = [12.0, -8.0, 3.0, 1.0, -5.0, 0.5, 7.0, -7.0] + [0.0] * 8  # block scale 12 / 6 = 2
_B2 = [0.0] * 16  # all-zero block: block scale 1, codes 0
_B3 = [2.0**-9, -(2.0**-10)] + [0.0] * 14  # 2**-9 / 6 is below the E4M3 denormal floor
NV_X = torch.tensor([_B0 + _B1 + _B2 + _B3])
NV_CODES = (
    [7, 13, 2, 1, 9, 4, 6, 3] + [0] * 8
    # 12/2=6, -4, 1.5, 0.5, -2.5 (tie -> 2), 0.25 (tie -> 0), 3.5 (tie -> 4), -3.5
    + [7, 14, 3, 1, 12, 0, 6, 14] + [0] * 8
    + [0] * 16
    + [2, 9] + [0] * 14  # 2**-9 / 2**-9 = 1.0 -> code 2, -0.5 -> code 9
)
NV_BLOCK_SCALES = [448.0, 2.0, 1.0, 2.0**-9]


def test_nvfp4_hand_computed_block():
    q = nvfp4.quantize(NV_X, torch.tensor(2688.0))
    assert q.global_scale.item() == 1.0
    assert q.block_scale.dtype == torch.float8_e4m3fn
    assert q.block_scale.float().tolist() == [NV_BLOCK_SCALES]
    assert q.codes.tolist() == [NV_CODES]
    packed = nvfp4.pack(q.codes)
    assert packed.shape == (1, 32)
    assert packed[0, :8].tolist() == [0xD7, 0x12, 0x49, 0x36, 0, 0, 0, 0]
    assert packed[0, 8:12].tolist() == [0xE7, 0x13, 0x0C, 0xE6]
    assert packed[0, 24].item() == 0x92
    deq = nvfp4.dequantize(q.codes, q.block_scale, q.global_scale)
    expected = _B0 + [12.0, -8.0, 3.0, 1.0, -4.0, 0.0, 8.0, -8.0] + [0.0] * 8 + _B2 + _B3
    assert deq.tolist() == [expected]


def test_nvfp4_tiny_block_gets_denormal_floor_not_zero():
    x = torch.zeros(2, 32)
    x[0, :16] = torch.linspace(-100.0, 100.0, 16)
    x[1, 16] = 1e-30  # a tiny non-zero block next to large ones
    x[1, 17] = -1e-30
    q = nvfp4.quantize(x, x.abs().amax())
    assert q.block_scale[1, 1].float().item() == 2.0**-9
    assert q.block_scale[0, 1].float().item() == 1.0  # all-zero block
    assert q.codes[1, 16:].tolist() == [0, 8] + [0] * 14  # tiny values round to +-0
    fq = nvfp4.fake_quant(x, x.abs().amax())
    assert torch.isfinite(fq).all()


def test_nvfp4_all_zero_tensor():
    q = nvfp4.quantize(torch.zeros(3, 32), torch.tensor(0.0))
    assert q.global_scale.item() == 1.0
    assert (q.block_scale.float() == 1.0).all()
    assert (q.codes == 0).all()
    assert (nvfp4.fake_quant(torch.zeros(3, 32), 0.0) == 0).all()


def test_nvfp4_saturates_beyond_6x_effective_scale():
    # amax (calibrated) far below the actual values: the block scale clamps at 448
    x = torch.zeros(1, 16)
    x[0, :5] = torch.tensor([100.0, -100.0, 50.0, 1.0, -17.0])
    amax = torch.tensor(10.0)
    q = nvfp4.quantize(x, amax)
    assert q.block_scale.float().item() == 448.0
    eff = 448.0 / q.global_scale.item()  # = amax / 6
    assert q.codes[0, :5].tolist() == [7, 15, 7, 1, 15]  # 1.0 / (10/6) = 0.6 -> 0.5
    fq = nvfp4.fake_quant(x, amax)
    assert fq[0, 0].item() == pytest.approx(6 * eff) and fq[0, 0].item() == pytest.approx(10.0)
    assert fq[0, 1].item() == -fq[0, 0].item()


@pytest.mark.parametrize("amax", [2688.0, 1344.0, 1.0, 3.0, 0.1234567, 7.77e-5, 6.5e4])
def test_nvfp4_scale_2_and_global_scale(amax):
    a = f32(amax)
    # float64 division of float32 operands, rounded once to float32, is the correctly
    # rounded float32 quotient: an independent reference for amax / 2688
    s2 = torch.tensor(a.item() / 2688.0, dtype=torch.float32)
    assert nvfp4.scale_2(a).dtype == torch.float32
    assert nvfp4.scale_2(a).item() == s2.item()
    assert nvfp4.global_scale(a).item() == torch.tensor(1.0 / s2.item(), dtype=torch.float32).item()
    assert nvfp4.quantize(torch.ones(1, 16), a).global_scale.item() == nvfp4.global_scale(a).item()


def test_nvfp4_global_scale_is_inverse_of_scale_2_not_2688_over_amax():
    # The compressed-tensors ModelOpt converter writes 1 / weight_scale_2; for this amax
    # that differs from 2688 / amax in the last bit, and we must match the converter.
    a = f32(3.0)
    assert nvfp4.global_scale(a).item() == 895.9999389648438  # 1 / f32(3 / 2688)
    assert (2688.0 / a).item() == 896.0


def test_nvfp4_zero_amax_scales_are_one():
    assert nvfp4.scale_2(f32(0.0)).item() == 1.0
    assert nvfp4.global_scale(f32(0.0)).item() == 1.0


# ---------------------------------------------------------------- FP8


def test_fp8_scale_is_amax_over_448():
    for amax in (448.0, 3.0, 0.1234567, 1e-4, 1e4):
        expected = torch.tensor(f32(amax).item() / 448.0, dtype=torch.float32).item()
        assert fp8.scale_from_amax(f32(amax)).item() == expected
        assert fp8.quantize(torch.ones(2, 4), f32(amax)).scale.item() == expected
    assert fp8.scale_from_amax(f32(0.0)).item() == 1.0


def test_fp8_known_codes_with_unit_scale():
    x = torch.tensor([448.0, -448.0, 500.0, -1e4, 1.0, 0.0, 240.0, 2.0**-9, 17.0, 19.0, 2.0**-11])
    q = fp8.quantize(x[None], f32(448.0))
    assert q.scale.item() == 1.0
    assert q.codes.dtype == torch.float8_e4m3fn
    # 17 and 19 are ties between E4M3 neighbours 16/18 and 18/20: round to even mantissa
    assert q.codes.float().tolist() == [[448.0, -448.0, 448.0, -448.0, 1.0, 0.0, 240.0, 2.0**-9, 16.0, 20.0, 0.0]]
    assert q.codes[0, 0].view(torch.uint8).item() == 0x7E  # max finite E4M3
    assert q.codes[0, 1].view(torch.uint8).item() == 0xFE


def test_fp8_saturates_beyond_448x_scale():
    x = torch.tensor([[3.0, -3.0, 2.0, 1.0]])
    amax = f32(2.0)
    q = fp8.quantize(x, amax)
    assert q.codes.float().tolist()[0][:3] == [448.0, -448.0, 448.0]
    fq = fp8.fake_quant(x, amax)
    assert fq[0, 0].item() == pytest.approx(2.0) and fq[0, 1].item() == pytest.approx(-2.0)


def test_fp8_per_channel_scale_shape():
    x = torch.tensor([[1.0, -2.0], [0.0, 0.0], [448.0, 4.0]])
    q = fp8.quantize(x, x.abs().amax(-1))
    assert q.scale.shape == (3,)
    assert q.scale.tolist() == [f32(2.0 / 448).item(), 1.0, 1.0]
    assert q.codes.float().tolist() == [[224.0, -448.0], [0.0, 0.0], [448.0, 4.0]]


# ---------------------------------------------------------------- INT4


def test_int4_hand_computed_groups():
    # group_size 32, K = 96: groups with amax 7.5 (scale 1), 15 (scale 2), 0 (scale 1)
    x = torch.zeros(1, 96)
    x[0, :8] = torch.tensor([7.5, -7.5, 0.5, 1.5, 2.5, -0.5, -1.5, 3.4])
    x[0, 32:37] = torch.tensor([15.0, -15.0, 3.0, -5.0, 1.0])
    q = int4.quantize(x, group_size=32)
    assert q.scale.tolist() == [[1.0, 2.0, 1.0]]
    # round half to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2; 7.5 -> 8 clamps to 7; -7.5 -> -8
    assert q.codes[0, :8].tolist() == [7, -8, 0, 2, 2, 0, -2, 3]
    assert q.codes[0, 32:37].tolist() == [7, -8, 2, -2, 0]
    assert (q.codes[0, 64:] == 0).all() and (q.codes[0, 8:32] == 0).all()
    assert int4.pack(q.codes)[0, 0].item() == 0xB68A_A80F - 2**32  # codes + 8 = F,0,8,A,A,8,6,B (nibble 0 first)


def test_int4_default_group_is_128_and_scale_is_group_amax_over_7_5():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 384, generator=g)
    q = int4.quantize(x)
    assert q.scale.shape == (4, 3)
    assert q.scale.dtype == torch.float32
    expected = x.unflatten(-1, (3, 128)).abs().amax(-1) / 7.5
    assert torch.equal(q.scale, expected)
    assert q.codes.dtype == torch.int8
    assert int(q.codes.min()) >= -8 and int(q.codes.max()) <= 7
    # the element at -amax of a group maps to -8 or -7, the one at +amax to 7
    assert set(q.codes.unflatten(-1, (3, 128)).abs().amax(-1).flatten().tolist()) <= {7, 8}


def test_int4_scale_dtype_follows_input():
    x = torch.ones(2, 128, dtype=torch.bfloat16) * 3
    q = int4.quantize(x)
    assert q.scale.dtype == torch.bfloat16
    assert q.scale.tolist() == [[0.400390625], [0.400390625]]  # bf16(3 / 7.5)
    assert int4.quantize(x, scale_dtype=torch.float32).scale.dtype == torch.float32


# ---------------------------------------------------------------- tiny (denormal) amax

# positive, finite amax values (accepted by the amax check) at the bottom of float32's range


@pytest.mark.parametrize("amax", [1e-44, 1e-43])
def test_fp8_tiny_amax_keeps_a_usable_scale(amax):
    x = torch.tensor([[amax, 0.0, -amax, 0.0]])
    q = fp8.quantize(x, f32(amax))
    assert q.scale.item() > 0 and torch.isfinite(q.scale).all()
    assert not torch.isnan(q.codes.float()).any()
    assert torch.isfinite(fp8.fake_quant(x, f32(amax))).all()


@pytest.mark.parametrize("amax", [1e-44, 1e-40, 1e-37])
def test_nvfp4_tiny_amax_keeps_finite_scales(amax):
    a = f32(amax)
    assert nvfp4.scale_2(a).item() > 0
    assert torch.isfinite(nvfp4.global_scale(a)).all()
    x = torch.full((1, 16), amax)
    assert torch.isfinite(nvfp4.quantize(x, a).global_scale).all()
