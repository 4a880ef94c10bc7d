"""Issue 6: layouts moeq cannot attribute fail loudly, naming the module or weight.

- An experts forward that uses its weight in an op moeq does not recognise (einsum, a
  slice along N) raises `UnsupportedExpertsOp` naming the module.
- A 3-D parameter outside a recognised experts module raises `CoverageError` listing it;
  excluding it via `Recipe.with_exclude(add=[...])` makes quantize pass.
"""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import moeq
from moeq.interception import UnsupportedExpertsOp
from moeq.targets import CoverageError

from .helpers import assert_clean, fresh, hooked_modules, tm


def _einsum_forward(self, hidden_states, top_k_index, top_k_weights):
    h = torch.einsum("th,enh->ten", hidden_states, self.gate_up_proj)  # every expert on every token
    return h[0, :, : hidden_states.shape[-1]]


def _slice_forward(self, hidden_states, top_k_index, top_k_weights):
    w = self.gate_up_proj[:, :4]  # a slice along N of the whole stack
    return hidden_states + w.sum() * 0


BAD_FORWARDS = {"einsum": _einsum_forward, "slice": _slice_forward}


@pytest.mark.parametrize("kind", BAD_FORWARDS)
def test_unsupported_op_during_calibration(pristine, kind):
    m = fresh(pristine("qwen3_moe"))
    name, mod = tm.experts_modules(m)[1]
    mod.forward = types.MethodType(BAD_FORWARDS[kind], mod)
    with pytest.raises(UnsupportedExpertsOp) as err:
        moeq.quantize(m, "nvfp4", [tm.random_input_ids(m, 2, 16, seed=1)], progress=False)
    assert name in str(err.value)
    assert type(mod).__name__ in str(err.value)
    assert_clean(m)


@pytest.mark.parametrize("kind", BAD_FORWARDS)
def test_unsupported_op_without_calibration_fails_in_quantize(pristine, kind):
    """Weight-only, no calibration data: quantize runs one probe forward (issue 11/13: coverage
    is checked on every path), so the error comes from quantize itself, before anything could
    be exported, and leaves the model as it was."""
    m = fresh(pristine("qwen3_moe"))
    name, mod = tm.experts_modules(m)[0]
    mod.forward = types.MethodType(BAD_FORWARDS[kind], mod)
    with pytest.raises(UnsupportedExpertsOp, match=name.replace(".", r"\.")):
        moeq.quantize(m, "w4a16-nvfp4", None, progress=False)
    assert_clean(m)


class _Stray(nn.Module):
    def __init__(self, shape=(2, 16, 16), name="weight"):
        super().__init__()
        self.register_parameter(name, nn.Parameter(torch.randn(shape)))


def test_stray_3d_parameter_is_a_coverage_error(pristine):
    m = fresh(pristine("qwen3_5_moe"))
    m.model.layers[0].mlp.stray = _Stray()
    with pytest.raises(CoverageError) as err:
        moeq.quantize(m, "nvfp4", [tm.random_input_ids(m, 2, 16, seed=1)], progress=False)
    msg = str(err.value)
    assert "model.layers.0.mlp.stray.weight" in msg
    assert "exclude" in msg.lower()
    assert_clean(m)

    recipe = moeq.get_recipe("nvfp4").with_exclude(add=["*.stray"])
    report = moeq.quantize(m, recipe, [tm.random_input_ids(m, 2, 16, seed=1)], progress=False)
    assert "model.layers.0.mlp.stray" in report.excluded
    assert "model.layers.0.mlp.stray" not in report.quantized
    assert "model.layers.0.mlp.experts" in report.quantized


def test_undecorated_experts_lookalike_and_extra_expert_weight(pristine):
    """3-D weights on a module without the transformers experts flags, and an extra 3-D
    parameter on a real experts module, are both listed."""
    m = fresh(pristine("qwen3_moe"))
    look = nn.Module()
    look.gate_up_proj = nn.Parameter(torch.randn(4, 32, 128))
    look.down_proj = nn.Parameter(torch.randn(4, 128, 16))
    m.model.layers[1].mlp.lookalike = look
    name, mod = tm.experts_modules(m)[0]
    mod.extra_proj = nn.Parameter(torch.randn(mod.gate_up_proj.shape[0], 8, 128))
    with pytest.raises(CoverageError) as err:
        moeq.quantize(m, "w4a16-nvfp4", None, progress=False)
    msg = str(err.value)
    for missing in ("model.layers.1.mlp.lookalike.gate_up_proj", "model.layers.1.mlp.lookalike.down_proj",
                    f"{name}.extra_proj"):
        assert missing in msg, f"{missing} not named in: {msg}"
    assert hooked_modules(m) == [] and getattr(m, "moeq_session", None) is None
