"""Every fused-experts MoE in the installed transformers: quantize -> export -> moeq.load round trip.

One sweep per module (see support/sweep.py): each discovered model type, nvfp4 and w4a16-int4, both layouts,
reloaded output bit-identical to the in-memory quantized model. The README's supported-models table must equal
the rendering of this run's results.
"""

from __future__ import annotations

import time

import pytest

from . import sweep, table

MIN_MODEL_TYPES = 60  #: guards against discovery silently breaking (transformers 5.24 has 68)
MIN_PASS_RATE = 0.90


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[sweep.ModelResult]:
    t0 = time.perf_counter()
    out = sweep.run_sweep(tmp_path_factory.mktemp("support"))
    print(f"\nsupport sweep: {len(out)} experts classes in {time.perf_counter() - t0:.1f}s")
    return out


def _describe(results: list[sweep.ModelResult]) -> str:
    return "\n".join(f"  {r.model_type} ({r.experts_class}): {table.notes(r)}" for r in results if not r.passed)


def test_discovery_finds_every_family(results):
    types = {r.model_type for r in results}
    assert len(types) >= MIN_MODEL_TYPES, (
        f"discovery found only {len(types)} model types with fused experts (expected >= {MIN_MODEL_TYPES}): "
        f"{sorted(types)}"
    )
    for r in results:
        if r.skip_reason is None:
            assert set(r.cases) == {(p, lay) for p in sweep.PRESETS for lay in sweep.LAYOUTS}, r.model_type


def test_every_non_pass_has_a_reason(results):
    for r in results:
        if r.skip_reason is not None:
            assert r.skip_reason.strip(), f"{r.model_type}: skipped without a reason"
            continue
        for (preset, layout), c in r.cases.items():
            kind, _, reason = c.status.partition(":")
            assert kind in ("pass", "fail", "n/a"), f"{r.model_type} {preset} {layout}: {c.status!r}"
            if kind != "pass":
                assert reason.strip(), f"{r.model_type} {preset} {layout}: {kind} without a reason"


def test_not_applicable_only_where_refused_by_design(results):
    for r in results:
        for key, c in r.cases.items():
            if key[0] in sweep.ROW_BLOCK_PRESETS and c.status.startswith(sweep.SHAPE_REFUSAL):
                continue  # refused before calibration: the tiny model's rows do not fit the blocks
            if key in sweep.REFUSED:
                assert c.not_applicable or c.status.startswith("fail: quantize"), (
                    f"{r.model_type} {key}: expected moeq.export to refuse it, got {c.status!r}")
            elif r.flags.get("has_bias") and key != ("w4a16-int4", "compressed-tensors"):
                # experts with biases: vLLM 0.33 loads them only with w4a16-int4 compressed-tensors
                assert c.not_applicable and "expert biases" in c.status, f"{r.model_type} {key}: {c.status!r}"
            else:
                assert not c.not_applicable, f"{r.model_type} {key}: {c.status!r}"


def test_pass_rate(results):
    types = {r.model_type for r in results}
    ok = {r.model_type for r in table.passing(results)}
    rate = len(ok) / len(types)
    assert rate >= MIN_PASS_RATE, (
        f"only {len(ok)}/{len(types)} model types ({rate:.0%}) pass nvfp4 x (modelopt, compressed-tensors) and "
        f"w4a16-int4 x compressed-tensors; need >= {MIN_PASS_RATE:.0%}. Not passing:\n{_describe(results)}"
    )


def test_readme_table_is_current(results):
    text = table.README.read_text()
    current = table.read_section(text)
    assert current is not None, (
        f"README.md has no {table.START} ... {table.END} section; run `{table.REGENERATE}`")
    assert current == table.render(results), (
        f"README.md's supported-models table is stale (it differs from this run's results); "
        f"run `{table.REGENERATE}` and commit README.md")
