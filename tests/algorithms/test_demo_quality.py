"""GPTQ beats max on the trained demo model (held-out KL against the unquantized model),
quantizing the fused experts only to keep the test short. Plain "mse" is not here: it
lowers the weight reconstruction error (tests/algorithms/test_mse.py), and the KL of the
whole-model table in the README, but in this short experts-only setting it did not
(measured: nvfp4 0.00204 vs max 0.00184, int4 0.00120 vs 0.00107): too close to call. Plain
"awq" on int4 neither (0.00119 vs 0.00107; 64 eval windows: 0.00119 vs 0.00117); on nvfp4
(W4A4: the scales also flatten the quantized inputs) it does, 0.00173 vs 0.00184, and
awq+gptq on int4 0.00103."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import transformers

import moeq
from moeq import data as D
from moeq.evaluate import compare

EXPERTS_ONLY = ["*.self_attn.*", "*.linear_attn.*", "*.shared_expert.*"]


@functools.cache
def _demo():
    tok = transformers.AutoTokenizer.from_pretrained(D.DEMO_MODEL)
    base = transformers.AutoModelForCausalLM.from_pretrained(D.DEMO_MODEL, dtype=torch.float32).eval()
    calib = D.batches(D.token_windows(tok, D.read_text(D.DEMO_CALIB), 128, 32), 16)
    evalb = D.batches(D.token_windows(tok, D.read_text(D.DEMO_EVAL), 128, 8), 8)
    return base, calib, evalb


@functools.cache
def _kl(preset: str, algorithm: str) -> float:
    base, calib, evalb = _demo()
    m = copy.deepcopy(base)
    recipe = moeq.get_recipe(preset).with_exclude(add=EXPERTS_ONLY)
    moeq.quantize(m, recipe, calib, progress=False, algorithm=algorithm)
    return compare(base, m, evalb).kl


@pytest.mark.parametrize("preset,algorithm", [("w4a16-int4", "gptq"), ("nvfp4", "mse+gptq"), ("nvfp4", "awq"),
                                              ("w4a16-int4", "awq+gptq")])
def test_algorithm_beats_max_on_demo(preset, algorithm):
    assert _kl(preset, algorithm) < _kl(preset, "max")
