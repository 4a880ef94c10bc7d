"""Combinations vLLM 0.33 cannot load are refused with one line naming them and the way out, before any
calibration data is read (moeq.quantize(layout=...), quantize_streaming, the CLI) and again at export."""

from __future__ import annotations

import pytest
import torch

import moeq
from moeq.checkpoint.layouts import UnsupportedExport

from .helpers import BIASED_EXPERTS, LAYOUTS, PRESETS, UNWRITABLE, refused, tm

# the combinations refused for the experts' biases (not those no model can be written in)
CASES = [(m, p, lay) for m in sorted(BIASED_EXPERTS) for p in PRESETS for lay in LAYOUTS
         if refused(m, p, lay) and (p, lay) not in UNWRITABLE]


def _never():
    raise AssertionError("calibration data was read before the refusal")
    yield torch.zeros(1, 1, dtype=torch.long)  # pragma: no cover


def test_biased_experts_are_gpt_oss():
    assert BIASED_EXPERTS == {"gpt_oss"}
    assert len(CASES) == 2 * (len(PRESETS) - 1) - 1  # every preset x layout but int4 / ct, and fp8-dynamic / modelopt


@pytest.mark.parametrize("model_type,preset,layout", CASES)
def test_refused_before_calibration(model_type, preset, layout):
    model = tm.tiny_model(model_type)
    with pytest.raises(UnsupportedExport) as err:
        moeq.quantize(model, preset, _never(), progress=False, layout=layout)
    msg = str(err.value)
    assert "\n" not in msg and preset in msg and layout in msg and "w4a16-int4" in msg and "compressed-tensors" in msg
    assert getattr(model, "moeq_session", None) is None


@pytest.mark.parametrize("model_type,preset,layout", CASES[:2])
def test_refused_at_export(model_type, preset, layout, tmp_path):
    model = tm.tiny_model(model_type)
    moeq.quantize(model, preset, [tm.random_input_ids(model, batch=1, seq=8)], progress=False)  # no layout: allowed
    with pytest.raises(UnsupportedExport, match=f"{preset} in the {layout} layout"):
        moeq.export(model, tmp_path / "out", layout, progress=False)
    assert not (tmp_path / "out").exists()


def test_excluding_the_experts_lifts_the_refusal(tmp_path):
    model = tm.tiny_model("gpt_oss")
    recipe = moeq.get_recipe("fp8").with_exclude(add=["*.mlp.experts"])
    moeq.quantize(model, recipe, [tm.random_input_ids(model, batch=1, seq=8)], progress=False, layout="modelopt")
    moeq.export(model, tmp_path / "out", "modelopt", progress=False)


def test_supported_combination_is_not_refused():
    model = tm.tiny_model("gpt_oss")
    moeq.quantize(model, "w4a16-int4", None, progress=False, layout="compressed-tensors")
