"""Small export contracts: a model loaded from an export cannot be exported again (its
original weights are gone), and NVFP4 inputs use blocks of 16 whatever the weight format."""

from __future__ import annotations

import pytest
import torch

import moeq
from moeq.formats import nvfp4
from moeq.quantizer import fake_quant_input, input_scale_param

from .helpers import tm


def test_reexporting_a_loaded_model_is_refused(tmp_path):
    m = tm.tiny_model("qwen3_moe")
    moeq.quantize(m, "w4a16-int4", [tm.random_input_ids(m, 2, 8)], progress=False)
    moeq.export(m, tmp_path / "a", "compressed-tensors", progress=False)
    loaded = moeq.load(tmp_path / "a")
    with pytest.raises(ValueError, match="loaded from an export"):
        moeq.export(loaded, tmp_path / "b", "compressed-tensors", progress=False)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("group_size,block", [(32, 32), (8, 16), (128, 128)])
def test_nvfp4_inputs_use_blocks_of_16(group_size, block):
    r = moeq.Recipe("int4-a-nvfp4", weight="int4", input="nvfp4", group_size=group_size)
    assert r.block == block
    x = torch.randn(4, 128)
    gs = input_scale_param(r, x.abs().amax())
    assert torch.equal(fake_quant_input(r, x, gs), nvfp4.fake_quant_with_global_scale(x, gs, 16))
    if group_size != 16:
        assert not torch.equal(fake_quant_input(r, x, gs), nvfp4.fake_quant_with_global_scale(x, gs, group_size))
