"""Bit-exact cross-checks against the `compressed-tensors` package, the reference
implementation of the compressed-tensors checkpoint format (its CPU torch paths run here;
on GPU it may pick Triton kernels instead).

Random float32 tensors, avoiding only the documented ModelOpt edge cases where moeq
deliberately differs (an all-zero NVFP4 block gets scale 1, not compressed-tensors' 0.125;
block scales are floored at 2**-9 instead of rounding to 0).
"""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.entrypoints.convert.converters.modelopt_nvfp4 import ModelOptNvfp4Converter
from compressed_tensors.quantization import preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.utils.helpers import calculate_qparams

from moeq.formats import fp4, fp8, int4, nvfp4

NVFP4_SCHEME = preset_name_to_scheme("NVFP4", ["Linear"])
W4A16_SCHEME = preset_name_to_scheme("W4A16", ["Linear"])  # int4, group 128, symmetric
FP8_ARGS = preset_name_to_scheme("FP8", ["Linear"]).weights  # per-tensor
FP8_CHANNEL_ARGS = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"]).weights  # per-channel


def random_weight(kind: str, shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g)
    if kind == "gauss":
        x = z * 0.02
    elif kind == "student_t3":  # heavy tails: a few large outliers per tensor
        x = z / (torch.randn((*shape, 3), generator=g).pow(2).sum(-1) / 3).sqrt()
    elif kind == "wide":  # row magnitudes spanning three decades (not so wide as to hit the floor)
        x = z * 10.0 ** torch.randint(-1, 3, (shape[0], 1), generator=g)
    else:
        raise ValueError(kind)
    return x.to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


CASES = [("gauss", (64, 256), 0), ("student_t3", (48, 512), 1), ("wide", (33, 128), 2), ("gauss", (5, 32), 3)]


# ---------------------------------------------------------------- NVFP4


def ct_nvfp4(x: torch.Tensor, gs: torch.Tensor):
    """compressed-tensors: block qparams with our global scale, quantize, pack."""
    args = NVFP4_SCHEME.weights
    xb = x.float().unflatten(-1, (-1, args.group_size))
    scale, zp = calculate_qparams(xb.amin(-1), xb.amax(-1), args, global_scale=gs)
    q = ct_quantize(x, scale, zp, args, global_scale=gs)
    return pack_fp4_to_uint8(q), scale.to(torch.float8_e4m3fn), q


@pytest.mark.parametrize("kind,shape,seed", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nvfp4_matches_compressed_tensors(kind, shape, seed, dtype):
    x = random_weight(kind, shape, seed, dtype)
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    amax = x.abs().amax().float()
    ours = nvfp4.quantize(x, amax)
    gs = nvfp4.global_scale(amax).reshape(1)  # compressed-tensors stores shape [1]
    packed, block_scale, q_values = ct_nvfp4(x, gs)
    assert torch.equal(bits(ours.block_scale), bits(block_scale))
    assert torch.equal(nvfp4.pack(ours.codes), packed)
    # and their unpack decodes our codes to the same values, signs of zeros included
    values = unpack_fp4_from_uint8(nvfp4.pack(ours.codes), *shape, dtype=torch.float32)
    assert torch.equal(bits(values), bits(fp4.decode(ours.codes)))
    assert torch.equal(q_values.float(), values)
    assert (ours.codes == 8).any()  # the sample exercises -0.0 codes


def test_nvfp4_compressor_state_dict_matches():
    """NVFP4PackedCompressor: what a compressed-tensors export writes, and how it loads."""
    x = random_weight("student_t3", (32, 256), 7)
    amax = x.abs().amax()
    q = nvfp4.quantize(x, amax)
    gs = q.global_scale.reshape(1)
    xb = x.unflatten(-1, (-1, 16))
    scale, _ = calculate_qparams(xb.amin(-1), xb.amax(-1), NVFP4_SCHEME.weights, global_scale=gs)
    sd = NVFP4PackedCompressor.compress({"weight": x, "weight_scale": scale, "weight_global_scale": gs}, NVFP4_SCHEME)
    assert torch.equal(sd["weight_packed"], nvfp4.pack(q.codes))
    assert torch.equal(bits(sd["weight_scale"]), bits(q.block_scale))
    # decompressing our tensors gives our dequantization (bf16, its default)
    sd = NVFP4PackedCompressor.decompress(
        {"weight_packed": nvfp4.pack(q.codes), "weight_scale": q.block_scale, "weight_global_scale": gs}, NVFP4_SCHEME
    )
    ours = nvfp4.dequantize(q.codes, q.block_scale, q.global_scale, dtype=sd["weight"].dtype)
    assert torch.equal(sd["weight"], ours)


def test_nvfp4_modelopt_converter_gives_our_global_scale():
    """The ModelOpt layout (weight_scale_2 = scale_2) converted by compressed-tensors'
    own converter carries exactly our compressed-tensors global scale."""
    x = random_weight("gauss", (16, 64), 5)
    amax = x.abs().amax()
    q = nvfp4.quantize(x, amax)
    act_amax = torch.tensor(3.0)
    tensors = {
        "m.proj.weight": nvfp4.pack(q.codes),
        "m.proj.weight_scale": q.block_scale,
        "m.proj.weight_scale_2": nvfp4.scale_2(amax).reshape(1),
        "m.proj.input_scale": nvfp4.scale_2(act_amax).reshape(1),
    }
    out = ModelOptNvfp4Converter(targets=["re:.*proj$"]).process(dict(tensors))
    assert torch.equal(bits(out["m.proj.weight_global_scale"]), bits(q.global_scale.reshape(1)))
    assert torch.equal(bits(out["m.proj.input_global_scale"]), bits(nvfp4.global_scale(act_amax).reshape(1)))
    assert torch.equal(out["m.proj.weight_packed"], nvfp4.pack(q.codes))


@pytest.mark.parametrize("kind,shape,seed", CASES)
def test_fp4_pack_matches_compressed_tensors(kind, shape, seed):
    codes = torch.randint(0, 16, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    values = fp4.decode(codes)
    assert torch.equal(pack_fp4_to_uint8(values), fp4.pack(codes))
    assert torch.equal(bits(unpack_fp4_from_uint8(fp4.pack(codes), *shape, dtype=torch.float32)), bits(values))


# ---------------------------------------------------------------- FP8


@pytest.mark.parametrize("kind,shape,seed", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_per_tensor_matches_compressed_tensors(kind, shape, seed, dtype):
    x = random_weight(kind, shape, seed, dtype)
    amax = x.abs().amax().float()
    scale, zp = calculate_qparams(x.amin().float(), x.amax().float(), FP8_ARGS)
    ours = fp8.quantize(x, amax)
    assert torch.equal(bits(ours.scale.reshape(1)), bits(scale))
    codes = ct_quantize(x, scale, zp, FP8_ARGS, dtype=torch.float8_e4m3fn)
    assert torch.equal(bits(ours.codes), bits(codes))


@pytest.mark.parametrize("kind,shape,seed", CASES)
def test_fp8_per_channel_matches_compressed_tensors(kind, shape, seed):
    x = random_weight(kind, shape, seed)
    scale, zp = calculate_qparams(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), FP8_CHANNEL_ARGS)
    ours = fp8.quantize(x, x.abs().amax(-1))
    assert torch.equal(bits(ours.scale), bits(scale.squeeze(-1)))
    codes = ct_quantize(x, scale, zp, FP8_CHANNEL_ARGS, dtype=torch.float8_e4m3fn)
    assert torch.equal(bits(ours.codes), bits(codes))


# ---------------------------------------------------------------- INT4 pack-quantized


def ct_int4(x: torch.Tensor):
    args = W4A16_SCHEME.weights
    xg = x.unflatten(-1, (-1, args.group_size))
    scale, zp = calculate_qparams(xg.amin(-1), xg.amax(-1), args)
    return scale, zp, ct_quantize(x, scale, zp, args, dtype=torch.int8)


@pytest.mark.parametrize("kind,shape", [("gauss", (64, 256)), ("student_t3", (48, 512)), ("wide", (33, 128))])
def test_int4_matches_compressed_tensors(kind, shape):
    x = random_weight(kind, shape, 11)
    ours = int4.quantize(x)  # group 128
    scale, zp, codes = ct_int4(x)
    assert torch.equal(bits(ours.scale), bits(scale))
    assert torch.equal(ours.codes, codes)
    assert torch.equal(int4.pack(ours.codes), pack_to_int32(codes, 4))
    assert torch.equal(unpack_from_int32(int4.pack(ours.codes), 4, torch.Size(shape)), ours.codes)
    # the compressor (what a pack-quantized export writes) agrees too
    sd = PackedQuantizationCompressor.compress({"weight": x, "weight_scale": scale, "weight_zero_point": zp}, W4A16_SCHEME)
    assert torch.equal(sd["weight_packed"], int4.pack(ours.codes))
    assert sd["weight_shape"].tolist() == list(shape)
    assert "weight_zero_point" not in sd  # symmetric


def test_int4_stacked_experts_pack_matches_compressed_tensors():
    codes = torch.randint(-8, 8, (3, 4, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    assert torch.equal(int4.pack(codes), pack_to_int32(codes, 4))
    assert torch.equal(int4.unpack(pack_to_int32(codes, 4)), codes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_half_inputs_divide_in_float32(dtype):
    """Documented divergence: compressed-tensors divides x / scale in x's dtype, moeq in
    float32. Scales agree bit-exactly; codes differ by at most 1, only where the
    half-precision quotient landed on the other side of a .5."""
    x = random_weight("gauss", (64, 512), 13, dtype)
    ours = int4.quantize(x)
    scale, _, codes = ct_int4(x)
    assert torch.equal(bits(ours.scale), bits(scale))
    xg = x.float().unflatten(-1, (-1, 128))
    exact = torch.round(xg / scale.float().unsqueeze(-1)).clamp(-8, 7).flatten(-2).to(torch.int8)
    assert torch.equal(ours.codes, exact)
    diff = (ours.codes.int() - codes.int()).abs()
    assert int(diff.max()) <= 1
    assert diff.float().mean() < 0.02
