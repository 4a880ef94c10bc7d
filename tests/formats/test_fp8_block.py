"""fp8-block's two schemes (moeq/schemes/fp8_block.py): FP8 weights with a scale per 128 x 128
block and dynamic FP8 inputs with a scale per 128 elements of each token. Known answers
(partial blocks included), bit-exact agreement with compressed-tensors' own FP8_BLOCK
arithmetic (float32), fake_quant == dequantize(quantize), stacks in one call, and the
per-row scale copies the export slices (gate/up halves)."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.utils.helpers import calculate_qparams, compute_dynamic_scales_and_zp

from moeq.formats import fp8_block
from moeq.schemes.fp8_block import INPUT, WEIGHT, fake_quant_per_group

from .test_crosscheck import bits, random_weight

FP8_BLOCK = preset_name_to_scheme("FP8_BLOCK", ["Linear"])
# block-aligned, partial blocks along N and K, a matrix smaller than one block
SHAPES = [("gauss", (256, 384), 0), ("student_t3", (200, 300), 1), ("wide", (130, 129), 2), ("gauss", (5, 32), 3)]


def test_scheme_granularities():
    assert (WEIGHT.granularity, WEIGHT.rows, INPUT.granularity, INPUT.block, INPUT.static) == ("block", 128, "group", 128, False)
    assert (FP8_BLOCK.weights.block_structure, FP8_BLOCK.input_activations.group_size) == ([128, 128], 128)


# ---------------------------------------------------------------- known answers


def test_weight_known_answer_with_partial_blocks():
    """[130, 129]: 2 x 2 blocks, the last row and column blocks 2 rows / 1 column wide. Each block's
    scale is its own amax / 448; a zero block gets scale 1 and codes 0."""
    w = torch.zeros(130, 129)
    w[0, 0], w[127, 127] = 896.0, -1.0  # block (0, 0): amax 896 -> scale 2
    w[3, 128] = 44.8  # block (0, 1): the 1-column partial block, amax 44.8 -> scale 0.1
    w[129, 5] = -0.5  # block (1, 0): the 2-row partial block, amax 0.5 -> scale 0.5/448
    q = fp8_block.quantize(w)
    assert q.scale.shape == (2, 2) and q.scale.dtype == torch.float32
    amax = torch.tensor([896.0, 44.8, 0.5])
    assert torch.equal(q.scale.flatten()[:3], amax / 448) and q.scale[1, 1].item() == 1.0
    c = q.codes.float()
    assert (c[0, 0], c[127, 127], c[3, 128], c[129, 5]) == (448.0, -0.5, 448.0, -448.0)
    assert int((c != 0).sum()) == 4
    assert torch.equal(fp8_block.fake_quant(w)[[0, 127, 3, 129], [0, 127, 128, 5]], torch.tensor([896.0, -1.0, 44.8, -0.5]))


def test_weight_blocks_are_independent():
    """A large value coarsens only its own block: the block to its right keeps an exact grid."""
    w = torch.full((128, 256), 1.0625)
    w[0, 0] = 448.0  # block (0, 0) scale 1: 1.0625 ties to 1.0 there
    fq = fp8_block.fake_quant(w)
    assert fq[1, 1].item() == 1.0 and fq[1, 200].item() == 1.0625


def test_input_known_answer():
    # group 0 of row 0: amax 896 -> scale 2; group 1 of row 0: amax 448 -> scale 1 (ties to even:
    # 1.0625 -> 1, 1.1875 -> 1.25); row 1 all zero
    x = torch.zeros(2, 256)
    x[0, 0], x[0, 1], x[0, 2] = 896.0, 3.0, -1.0
    x[0, 128], x[0, 129], x[0, 130] = 448.0, 1.0625, 1.1875
    fq = fake_quant_per_group(x)
    assert fq[0, :3].tolist() == [896.0, 3.0, -1.0]  # 3 / 2 = 1.5 and -1 / 2 are exact e4m3 values
    assert fq[0, 128:131].tolist() == [448.0, 1.0, 1.25]
    assert torch.equal(fq[1], x[1])


def test_input_scale_follows_each_group():
    x = torch.full((1, 256), 1.0625)
    x[0, 0] = 448.0  # coarsens group 0 only
    fq = fake_quant_per_group(x)
    assert fq[0, 1].item() == 1.0 and fq[0, 129].item() == 1.0625


# ---------------------------------------------------------------- compressed-tensors cross-check


def ct_block_qparams(x: torch.Tensor):
    """compressed-tensors' block qparams, from block min / max of the zero-padded weight."""
    b = fp8_block._blocks(x, 128)
    return calculate_qparams(b.amin(dim=(-3, -1)), b.amax(dim=(-3, -1)), FP8_BLOCK.weights)


@pytest.mark.parametrize("kind,shape,seed", SHAPES)
def test_weight_matches_compressed_tensors(kind, shape, seed):
    x = random_weight(kind, shape, seed)
    args = FP8_BLOCK.weights
    scale, zp = ct_block_qparams(x)
    q = fp8_block.quantize(x)
    assert scale.shape == q.scale.shape and torch.equal(bits(q.scale), bits(scale))
    codes = ct_quantize(x, scale, zp, args, dtype=torch.float8_e4m3fn)
    assert torch.equal(bits(q.codes), bits(codes))
    assert torch.equal(bits(fp8_block.dequantize(q.codes, q.scale)), bits(ct_dequantize(codes, scale, zp, args)))
    assert torch.equal(bits(WEIGHT.fake_quant(x, None, 128)), bits(ct_fake_quantize(x, scale, zp, args)))


@pytest.mark.parametrize("kind,shape,seed", [c for c in SHAPES if c[1][1] % 128 == 0])
def test_input_matches_compressed_tensors_dynamic_group(kind, shape, seed):
    """compressed-tensors' run-time path for a group-strategy dynamic input (what FP8_BLOCK's
    input_activations say): qparams from compute_dynamic_scales_and_zp, then fake_quantize."""
    x = random_weight(kind, shape, seed).unsqueeze(0)  # [1, tokens, K]
    args = FP8_BLOCK.input_activations
    scale, zp = compute_dynamic_scales_and_zp(x, args, module=None)
    assert scale.shape == (1, shape[0], shape[1] // 128)
    assert torch.equal(bits(INPUT.fake_quant(x, None)), bits(ct_fake_quantize(x, scale, zp, args)))


# ---------------------------------------------------------------- contracts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fake_quant_is_dequantize_of_quantize(dtype):
    w = random_weight("student_t3", (3, 200, 256), 5, dtype)
    q = fp8_block.quantize(w)
    assert torch.equal(bits(WEIGHT.fake_quant(w, None, 128)), bits(fp8_block.dequantize(q.codes, q.scale, dtype)))


def test_expert_stack_is_one_call():
    w = random_weight("wide", (4 * 256, 384), 7).reshape(4, 256, 384)
    q = fp8_block.quantize(w)
    for e in range(4):
        qe = fp8_block.quantize(w[e])
        assert torch.equal(bits(q.codes[e]), bits(qe.codes)) and torch.equal(q.scale[e], qe.scale)
    x = random_weight("wide", (3 * 33, 256), 8, torch.bfloat16).reshape(3, 33, 256)
    assert torch.equal(bits(INPUT.fake_quant(x, None)), bits(INPUT.fake_quant(x.reshape(-1, 256), None).reshape(x.shape)))


def test_row_slices_of_a_fused_weight_write_each_half_its_own_blocks():
    """Gate/up halves [I, K] of a fused [2I, K]: the scheme's per-row scale copies, sliced like the codes,
    give each half exactly what quantizing the half alone gives (I % 128 == 0)."""
    w = random_weight("wide", (512, 256), 9)
    q = WEIGHT.quantize(w, None, 128)
    for rows in (slice(0, 256), slice(256, 512)):
        half = type(q)(*(f[rows] for f in q))
        t = WEIGHT.tensors("compressed-tensors", half, None, (256, 256))
        alone = fp8_block.quantize(w[rows])
        assert t["weight_scale"].shape == (2, 2) and t["weight_scale"].is_contiguous()
        assert torch.equal(t["weight_scale"], alone.scale) and torch.equal(bits(t["weight"]), bits(alone.codes))
