"""The scheme table (moeq/schemes/table.py) is consistent: every preset's (weight, input)
pair has configs, every config names known schemes, each scheme's fields hold what the
pipeline relies on, and fake_quant == dequantize(quantize) through each scheme's own
tensors and reader (write -> read, for both layouts)."""

from __future__ import annotations

import pytest
import torch

from moeq.checkpoint.layouts import LAYOUTS
from moeq.recipes import PRESETS
from moeq.schemes.spec import InputScheme, WeightScheme
from moeq.schemes.table import CONFIGS, INPUT, WEIGHT

INPUT_GRANULARITIES = {"tensor", "token", "group"}
GRANULARITIES = {"tensor", "channel", "group", "tensor_group", "block"}


def test_every_preset_pair_has_configs_and_every_config_names_known_schemes():
    for name, r in PRESETS.items():
        assert (r.weight, r.input) in CONFIGS, name
    for (w, i), c in CONFIGS.items():
        assert w in WEIGHT and (i is None or i in INPUT), (w, i)
        assert c.compressed_tensors, (w, i)
        assert (c.modelopt is None) == bool(c.why_not_modelopt), f"{(w, i)}: say why it is not written as ModelOpt"


def test_scheme_fields():
    for name, s in WEIGHT.items():
        assert isinstance(s, WeightScheme) and s.name == name and s.granularity in GRANULARITIES, name
    for name, s in INPUT.items():
        assert isinstance(s, InputScheme) and s.name == name, name
        assert s.granularity in INPUT_GRANULARITIES and s.static == (s.param is not None), name
        assert s.static == (s.granularity == "tensor"), name  # token and group inputs are dynamic


class _Reader(dict):
    """What a scheme's reader sees: r[key] -> tensor."""


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_written_tensors_read_back_to_the_fake_quant(name, layout):
    r = PRESETS[name]
    if layout == "modelopt" and CONFIGS[(r.weight, r.input)].modelopt is None:
        pytest.skip("not written in this layout")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 32, 256, generator=g) * torch.tensor([0.01, 3.0])[:, None, None]  # [E, N, K]
    amax = w.abs().amax(dim=(1, 2))
    s = WEIGHT[r.weight]
    q = s.quantize(w, amax, r.group_size)
    fq = s.fake_quant(w, amax, r.group_size)
    for e in range(2):
        qe = type(q)(*(f[e] for f in q))
        reader = _Reader({f"m.{k}": v for k, v in s.tensors(layout, qe, amax[e], (32, 256)).items()})
        assert torch.equal(s.read(reader, layout, "m.", torch.float32), fq[e]), e
    if r.input is not None:
        inp = INPUT[r.input]
        x = torch.randn(5, 256, generator=g)
        x_amax = x.abs().amax()
        reader = _Reader({f"m.{k}": v for k, v in inp.tensors(layout, x_amax).items()})
        prm = inp.read(reader, layout, "m.")
        want = inp.fake_quant(x, inp.param(x_amax) if inp.static else None)
        assert torch.equal(inp.fake_quant(x, prm), want)
        assert (prm is None) == (not inp.static) == (not reader)


def test_recipe_format_names_are_the_table_keys():
    """moeq.recipes names the formats without importing the table (torch): the names must agree."""
    from moeq import recipes

    assert recipes.FORMATS == tuple(WEIGHT) and recipes.INPUT_FORMATS == tuple(INPUT)
