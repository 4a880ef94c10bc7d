"""Issue 9: bad input fails loudly, with a message that says how to fix it, and leaves the
model as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moeq

from .helpers import assert_clean, fresh, logits, tm


@pytest.fixture
def model(pristine):
    return fresh(pristine("qwen3_moe"))


def test_unknown_preset_lists_presets(model):
    with pytest.raises(ValueError) as err:
        moeq.quantize(model, "int3-magic", [tm.random_input_ids(model, 1, 16)], progress=False)
    msg = str(err.value)
    assert "int3-magic" in msg
    for preset in ("fp8", "nvfp4", "w4a16-nvfp4", "w4a16-int4"):
        assert preset in msg
    assert_clean(model)


@pytest.mark.parametrize("recipe", ["nvfp4", "w4a16-int4"])
def test_empty_calibration_data(model, recipe):
    with pytest.raises(ValueError, match="empty"):
        moeq.quantize(model, recipe, [], progress=False)
    assert_clean(model)


@pytest.mark.parametrize("bad", [-1, 256, 10_000])
def test_token_ids_out_of_vocabulary(model, bad):
    ids = tm.random_input_ids(model, 2, 16)
    ids[1, 3] = bad
    with pytest.raises(ValueError) as err:
        moeq.quantize(model, "nvfp4", [ids], progress=False)
    assert f"[0, {model.config.vocab_size})" in str(err.value)
    assert_clean(model)


@pytest.mark.parametrize("bad", ["float", "1d", "empty", "no_input_ids"])
def test_malformed_batches(model, bad):
    item = {
        "float": torch.rand(2, 16),
        "1d": torch.randint(0, 256, (16,)),
        "empty": torch.zeros(2, 0, dtype=torch.long),
        "no_input_ids": {"ids": torch.randint(0, 256, (2, 16))},
    }[bad]
    with pytest.raises((ValueError, TypeError)):
        moeq.quantize(model, "nvfp4", [item], progress=False)
    assert_clean(model)


def test_nothing_quantizable_module():
    class OnlyEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(16, 32)

        def get_input_embeddings(self):
            return self.emb

        def forward(self, input_ids, **_):
            return self.emb(input_ids)

    m = OnlyEmbedding()
    with pytest.raises(ValueError, match="nothing to quantize"):
        moeq.quantize(m, "nvfp4", [torch.zeros(1, 4, dtype=torch.long)], progress=False)
    assert_clean(m)


def test_recipe_excluding_everything(model):
    recipe = moeq.get_recipe("nvfp4").with_exclude(add=["*"])
    with pytest.raises(ValueError, match="nothing to quantize"):
        moeq.quantize(model, recipe, [tm.random_input_ids(model, 1, 16)], progress=False)
    assert_clean(model)


def test_quantizing_twice_raises_and_keeps_the_first_result(model):
    calib = [tm.random_input_ids(model, 2, 16, seed=1)]
    ids = tm.random_input_ids(model, 2, 16, seed=99)
    moeq.quantize(model, "nvfp4", calib, progress=False)
    session, first = model.moeq_session, logits(model, ids)
    n_hooks = sum(len(m._forward_pre_hooks) for m in model.modules())
    for recipe in ("nvfp4", "fp8"):
        with pytest.raises(RuntimeError, match="already quantized"):
            moeq.quantize(model, recipe, calib, progress=False)
    assert model.moeq_session is session
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == n_hooks
    assert torch.equal(logits(model, ids), first)


@pytest.mark.parametrize("recipe", ["nvfp4", "fp8"])
def test_activation_recipe_needs_calibration_data(model, recipe):
    with pytest.raises(ValueError, match="calib_data"):
        moeq.quantize(model, recipe, None, progress=False)
    assert_clean(model)


def test_weight_only_recipe_without_calibration_data_works(model, pristine):
    ids = tm.random_input_ids(model, 2, 16, seed=99)
    report = moeq.quantize(model, "w4a16-nvfp4", None, progress=False)
    assert report.calib_batches == 0
    assert not torch.equal(logits(model, ids), logits(pristine("qwen3_moe"), ids))


def test_offloaded_meta_weights_are_refused(pristine):
    from accelerate.utils import set_module_tensor_to_device

    m = fresh(pristine("qwen3_moe"))
    name = next(n for n, _ in m.named_parameters() if n.endswith("self_attn.q_proj.weight"))
    set_module_tensor_to_device(m, name, "meta")
    with pytest.raises(ValueError, match="offloaded"):
        moeq.quantize(m, "w4a16-int4", None, progress=False)
