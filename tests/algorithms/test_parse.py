"""The algorithm argument: names, combinations, refusals (never silently ignored)."""

from __future__ import annotations

import pytest

import moeq
from moeq import algorithms

from .helpers import fresh, tm


def test_parse():
    assert algorithms.parse("max") == ()
    assert algorithms.parse("gptq+mse") == algorithms.parse(("mse", "gptq")) == ("mse", "gptq")
    assert algorithms.name(algorithms.parse("GPTQ")) == "gptq"
    for bad in ("", "maxx", "max+gptq", "mse+"):
        with pytest.raises(ValueError):
            algorithms.parse(bad)
    assert algorithms.parse("gptq+awq+mse") == ("awq", "mse", "gptq")  # run order: awq -> mse -> gptq
    assert algorithms.name(algorithms.parse("gptq+awq")) == "awq+gptq"


def test_gptq_needs_data(pristine):
    with pytest.raises(ValueError, match="calib_data"):
        moeq.quantize(fresh(pristine("qwen3_5_moe")), "w4a16-int4", None, progress=False, algorithm="gptq")


def test_report(pristine):
    m = fresh(pristine("qwen3_5_moe"))
    recipe = moeq.get_recipe("w4a16-int4").with_exclude(add=["*.self_attn.*", "*.linear_attn.*", "*.shared_expert.*"])
    rep = moeq.quantize(m, recipe, [tm.random_input_ids(m, 2, 16, seed=1)], progress=False, algorithm="mse+gptq")
    assert rep.algorithm == "mse+gptq" and rep.algorithm_seconds > 0
    assert "algorithm mse+gptq" in rep.summary()


def test_cli_refusals(capsys):
    from moeq.cli import main

    assert main(["quantize", "--algorithm", "awqq"]) != 0
    assert "awqq" in capsys.readouterr().err
