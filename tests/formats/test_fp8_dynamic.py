"""fp8-dynamic's two schemes (moeq/schemes/fp8_dynamic.py): per-channel FP8 weights and
dynamic per-token FP8 inputs. Known answers, bit-exact agreement with compressed-tensors'
own FP8_DYNAMIC arithmetic (float32), fake_quant == dequantize(quantize), vectorization."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.utils.helpers import calculate_qparams, compute_dynamic_scales_and_zp

from moeq.formats import fp8
from moeq.schemes.fp8_dynamic import INPUT, WEIGHT, fake_quant_per_token

from .test_crosscheck import CASES, bits, random_weight

FP8_DYNAMIC = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])


def test_scheme_granularities():
    assert (WEIGHT.granularity, INPUT.granularity, INPUT.static) == ("channel", "token", False)


# ---------------------------------------------------------------- known answers


def test_weight_known_answer():
    w = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.5, 0.25, -0.125, 0.0625]])
    q = WEIGHT.quantize(w, None, 1)
    assert q.scale.dtype == torch.float32 and q.scale.shape == (2, 1)  # [N, 1], as compressed-tensors stores it
    assert torch.equal(q.scale, torch.tensor([[2.0], [0.5]]) / 448)
    assert q.codes.float().tolist() == [[448.0, -224.0, 112.0, 0.0], [448.0, 224.0, -112.0, 56.0]]


def test_weight_scale_is_per_row_not_per_tensor():
    w = torch.tensor([[100.0, 1.0], [1.0, 1.0]])
    fq = WEIGHT.fake_quant(w, torch.tensor(100.0), 1)  # a per-tensor amax is ignored
    assert torch.equal(fq[1], torch.tensor([1.0, 1.0]))  # row 1 has its own scale 1/448: exact
    assert torch.equal(fq, fp8.fake_quant(w, w.abs().amax(-1)))


def test_input_known_answer():
    # row 0: amax 896 -> scale 2; row 1: amax 448 -> scale 1, e4m3 ties to even
    # (1.0625 is halfway between 1 and 1.125 -> 1; 1.1875 between 1.125 and 1.25 -> 1.25); row 2 all zero
    x = torch.tensor([[896.0, -1.0, 0.5, 3.0], [448.0, 1.0625, 1.1875, -3.0], [0.0, 0.0, 0.0, 0.0]])
    fq = fake_quant_per_token(x)
    assert fq.tolist() == [[896.0, -1.0, 0.5, 3.0], [448.0, 1.0, 1.25, -3.0], [0.0, 0.0, 0.0, 0.0]]


def test_input_scale_follows_each_token():
    """A large token does not coarsen the grid of a small one (what a static scale would do)."""
    x = torch.tensor([[448.0, 0.0], [1.0625, 0.0]])  # as one static tensor scale, 1.0625 -> 1.0
    assert fake_quant_per_token(x)[1, 0].item() == 1.0625 * 1  # its own scale 1.0625/448: exact
    assert fp8.fake_quant_with_scale(x, fp8.scale_from_amax(x.abs().amax()))[1, 0].item() == 1.0


# ---------------------------------------------------------------- compressed-tensors cross-check


@pytest.mark.parametrize("kind,shape,seed", CASES)
def test_weight_matches_compressed_tensors(kind, shape, seed):
    x = random_weight(kind, shape, seed)
    args = FP8_DYNAMIC.weights
    scale, zp = calculate_qparams(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), args)
    q = WEIGHT.quantize(x, None, 1)
    assert scale.shape == q.scale.shape and torch.equal(bits(q.scale), bits(scale))
    assert torch.equal(bits(q.codes), bits(ct_quantize(x, scale, zp, args, dtype=torch.float8_e4m3fn)))
    assert torch.equal(bits(WEIGHT.fake_quant(x, None, 1)), bits(ct_fake_quantize(x, scale, zp, args)))


@pytest.mark.parametrize("kind,shape,seed", CASES)
def test_input_matches_compressed_tensors_dynamic_per_token(kind, shape, seed):
    """compressed-tensors' run-time path for a token-strategy dynamic input: qparams from
    compute_dynamic_scales_and_zp over [batch, tokens, K] (it keeps dims 0 and 1), then fake_quantize."""
    x = random_weight(kind, shape, seed).unsqueeze(0)  # [1, tokens, K]
    args = FP8_DYNAMIC.input_activations
    scale, zp = compute_dynamic_scales_and_zp(x, args, module=None)
    assert scale.shape == (1, shape[0], 1)
    assert torch.equal(bits(INPUT.fake_quant(x, None)), bits(ct_fake_quantize(x, scale, zp, args)))


# ---------------------------------------------------------------- contracts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fake_quant_is_dequantize_of_quantize(dtype):
    w = random_weight("student_t3", (4, 24, 64), 5, dtype)
    q = WEIGHT.quantize(w, None, 1)
    assert torch.equal(bits(WEIGHT.fake_quant(w, None, 1)), bits(fp8.dequantize(q.codes, q.scale, dtype)))


def test_expert_stack_is_one_call():
    w = random_weight("wide", (6 * 33, 128), 7).reshape(6, 33, 128)
    q = WEIGHT.quantize(w, None, 1)
    for e in range(6):
        qe = WEIGHT.quantize(w[e], None, 1)
        assert torch.equal(bits(q.codes[e]), bits(qe.codes)) and torch.equal(q.scale[e], qe.scale)
    x = random_weight("wide", (3 * 33, 128), 8, torch.bfloat16).reshape(3, 33, 128)  # [batch, tokens, K]
    assert torch.equal(bits(INPUT.fake_quant(x, None)), bits(INPUT.fake_quant(x.reshape(-1, 128), None).reshape(x.shape)))
