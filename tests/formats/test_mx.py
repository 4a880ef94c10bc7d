"""MX formats (moeq/formats/mx.py): E8M0 scales per 32 along K, E2M1 / E4M3 elements.
Known answers (scale bytes, exactly representable values, sign bits), bit-exact agreement
with compressed-tensors' MXFP4 / MXFP8 presets (qparams, fake quant, dynamic group inputs,
its compressors' on-disk tensors), fake_quant == dequantize(quantize), stacks in one call."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
from compressed_tensors.compressors.mxfp8.base import MXFP8QuantizationCompressor
from compressed_tensors.quantization import preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize
from compressed_tensors.quantization.utils.helpers import calculate_qparams, compute_dynamic_scales_and_zp

from moeq.formats import fp4, mx

from .test_crosscheck import CASES, bits, random_weight

PRESET = {"e2m1": "MXFP4", "e4m3": "MXFP8"}
ELEMENTS = list(PRESET)


# ---------------------------------------------------------------- known answers


def test_scale_exponent_rounds_amax_up_from_mantissa_0_75():
    # amax 1.0 -> 2**0 - 2 -> 2**-2 (127 - 2 = 125); 1.74 stays at 2**0; 1.75 rounds up to 2**1
    amax = torch.tensor([1.0, 1.74, 1.75, 1.99, 6.0, 0.0, 1e-45, 3.0e38])
    assert mx.scale_exponent(amax, "e2m1").tolist() == [125, 125, 126, 126, 127, 0, 0, 253]
    assert mx.scale_exponent(amax, "e4m3").tolist() == [119, 119, 120, 120, 121, 0, 0, 247]
    assert mx.scale_value(torch.tensor([0, 1, 127, 254], dtype=torch.uint8)).tolist() == [
        2.0**-127, 2.0**-126, 1.0, 2.0**127]


def test_mxfp4_block_known_answer():
    # amax 6 -> scale 2**(2 - 2) = 1: every E2M1 value is exact; the second block is the first times 2**-10
    vals = torch.tensor(fp4.E2M1_VALUES + (-0.1,) + tuple(-v for v in fp4.E2M1_VALUES[1:]))  # -0.1 -> code 8 (-0.0)
    x = torch.cat([vals, vals]).reshape(1, 32)
    x = torch.cat([x, x * 2.0**-10], dim=-1)
    q = mx.quantize(x, "e2m1")
    assert q.scale.tolist() == [[127, 117]]
    codes = list(range(16)) * 2
    assert q.codes[0, :32].tolist() == codes and q.codes[0, 32:].tolist() == codes
    fq = mx.fake_quant(x, "e2m1")
    want = fp4.decode(q.codes) * torch.tensor([1.0] * 32 + [2.0**-10] * 32)
    assert torch.equal(fq, want) and torch.equal(torch.signbit(fq), torch.signbit(x))  # -0.1 -> -0.0
    assert mx.quantize(-torch.zeros(1, 32)).codes.eq(0).all()  # a -0.0 input gives code 0, as in fp4
    assert mx.pack(q.codes)[0, :2].tolist() == [0x10, 0x32]  # element 2j low nibble


def test_mxfp4_saturates_and_rounds_ties_to_even():
    # amax 6.5 (mantissa 0.625 < 0.75) -> scale 1: 6.5 saturates to 6; 2.5 -> 2, 3.5 -> 4, 0.25 -> 0
    x = torch.zeros(1, 32)
    x[0, :5] = torch.tensor([6.5, 2.5, 3.5, 0.25, -0.75])
    assert mx.fake_quant(x, "e2m1")[0, :5].tolist() == [6.0, 2.0, 4.0, 0.0, -1.0]
    # amax 7.0 (mantissa 0.75) rounds up -> scale 2: 7 -> 3.5 -> 4 (x2 = 8), 2.5 -> 1.25 -> 1 (x2 = 2)
    x[0, 0] = 7.0
    assert mx.quantize(x, "e2m1").scale.item() == 128
    assert mx.fake_quant(x, "e2m1")[0, :2].tolist() == [8.0, 2.0]


def test_mxfp8_known_answer():
    # amax 448 = 1.75 * 2**8 rounds up -> 2**(9 - 8) = 2: 448 / 2 = 224 and 1.125 / 2 = 0.5625 are exact;
    # 1.0625 / 2 = 0.53125 is halfway between e4m3 0.5 and 0.5625 -> 0.5 (ties to even)
    x = torch.zeros(2, 32)
    x[0, :4] = torch.tensor([448.0, -1.125, 3.0, -1.0625])
    x[1, :2] = torch.tensor([1.0, 1.0 + 2.0**-10])  # scale 2**-8: 256 and 256.25 -> 256 (e4m3 step 16 there)
    q = mx.quantize(x, "e4m3")
    assert q.scale[:, 0].tolist() == [128, 119] and q.codes.dtype == torch.float8_e4m3fn
    assert mx.fake_quant(x, "e4m3")[0, :4].tolist() == [448.0, -1.125, 3.0, -1.0]
    assert mx.fake_quant(x, "e4m3")[1, :2].tolist() == [1.0, 1.0]


def test_zero_block_gets_byte_0_and_zero_codes():
    q = mx.quantize(torch.zeros(3, 64), "e2m1")
    assert q.scale.eq(0).all() and q.codes.eq(0).all()


# ---------------------------------------------------------------- compressed-tensors cross-check


def _ct_qparams(x, element):
    args = preset_name_to_scheme(PRESET[element], ["Linear"]).weights
    xb = x.unflatten(-1, (-1, 32))
    return args, *calculate_qparams(xb.amin(-1), xb.amax(-1), args)


@pytest.mark.parametrize("element", ELEMENTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,shape,seed", CASES)
def test_matches_compressed_tensors(element, dtype, kind, shape, seed):
    x = random_weight(kind, shape, seed, dtype)
    args, scale, zp = _ct_qparams(x, element)
    q = mx.quantize(x, element)
    assert torch.equal(mx.scale_value(q.scale).to(dtype), scale)
    assert torch.equal(bits(mx.fake_quant(x, element)), bits(ct_fake_quantize(x, scale, zp, args)))


@pytest.mark.parametrize("element", ELEMENTS)
def test_on_disk_tensors_match_compressed_tensors_compressors(element):
    """weight_packed uint8 [N, K/2] (MXFP4) / weight e4m3 [N, K] (MXFP8) and weight_scale uint8 [N, K/32]."""
    x = random_weight("student_t3", (48, 512), 1)
    scheme = preset_name_to_scheme(PRESET[element], ["Linear"])
    _, scale, zp = _ct_qparams(x, element)
    sd = {"weight": x, "weight_scale": scale, "weight_zero_point": zp}
    q = mx.quantize(x, element)
    if element == "e2m1":
        out = MXFP4PackedCompressor.compress(sd, scheme)
        assert torch.equal(out["weight_packed"], mx.pack(q.codes)) and out["weight_packed"].shape == (48, 256)
    else:
        out = MXFP8QuantizationCompressor.compress(sd, scheme)
        assert torch.equal(bits(out["weight"]), bits(q.codes))
    assert out["weight_scale"].dtype == torch.uint8 and torch.equal(out["weight_scale"], q.scale)
    assert q.scale.shape == (48, 16)


@pytest.mark.parametrize("element", ELEMENTS)
@pytest.mark.parametrize("kind,shape,seed", CASES)
def test_dynamic_group_inputs_match_compressed_tensors(element, kind, shape, seed):
    """The run-time path of MXFP4 / MXFP8 input activations: dynamic qparams per group of 32."""
    x = random_weight(kind, shape, seed).unsqueeze(0)  # [1, tokens, K]
    args = preset_name_to_scheme(PRESET[element], ["Linear"]).input_activations
    scale, zp = compute_dynamic_scales_and_zp(x, args, module=None)
    assert torch.equal(bits(mx.fake_quant(x, element)), bits(ct_fake_quantize(x, scale, zp, args)))


# ---------------------------------------------------------------- contracts


@pytest.mark.parametrize("element", ELEMENTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fake_quant_is_dequantize_of_quantize(element, dtype):
    x = random_weight("wide", (4 * 24, 64), 5, dtype).reshape(4, 24, 64)
    q = mx.quantize(x, element)
    assert torch.equal(bits(mx.fake_quant(x, element)), bits(mx.dequantize(q.codes, q.scale, dtype)))
    if element == "e2m1":
        assert torch.equal(fp4.unpack(mx.pack(q.codes)), q.codes)


@pytest.mark.parametrize("element", ELEMENTS)
def test_expert_stack_is_one_call(element):
    w = random_weight("wide", (6 * 33, 128), 7).reshape(6, 33, 128)
    q = mx.quantize(w, element)
    for e in range(6):
        qe = mx.quantize(w[e], element)
        assert torch.equal(bits(q.codes[e]), bits(qe.codes)) and torch.equal(q.scale[e], qe.scale)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="not divisible by the block/group size 32"):
        mx.quantize(torch.ones(2, 48))
    with pytest.raises(ValueError, match="unknown MX element type 'e3m2'"):
        mx.fake_quant(torch.ones(2, 32), "e3m2")
    with pytest.raises(ValueError, match="NaN or Inf"):
        mx.quantize(torch.full((1, 32), float("inf")))


def test_gpt_oss_blocks_decode_like_transformers():
    """A second, independent reader: transformers' gpt-oss MXFP4 dequantizer (integrations/mxfp4.py,
    lut[nibble] ldexp (scale - 127), low nibble first) turns moeq's `_blocks` / `_scales` of a stack
    [E, N, K] back into its [E, K, N] parameter, equal to the fake quant."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from moeq.schemes.mxfp4 import native_read, native_tensors

    w = random_weight("wide", (2 * 64, 96), 3).reshape(2, 64, 96)
    t = native_tensors(mx.quantize(w, "e2m1"))
    assert t["_blocks"].shape == (2, 64, 3, 16) and t["_scales"].shape == (2, 64, 3)
    got = convert_moe_packed_tensors(t["_blocks"], t["_scales"], dtype=torch.float32)
    assert torch.equal(got.transpose(1, 2), mx.fake_quant(w, "e2m1"))
    assert torch.equal(native_read(t["_blocks"], t["_scales"], torch.float32), mx.fake_quant(w, "e2m1"))
