"""A streaming run's resume state that is damaged (truncated by a full disk, altered,
deleted) is never trusted: the run starts over and writes the right bytes, and overwrite
always recovers. A partial run made with other options is refused, naming the option."""

from __future__ import annotations

import dataclasses
import json

import pytest

import moeq

from .inject import assert_same_files

PARTIAL = ".out.moeq-partial"


def interrupted(setup, out, **kw):
    with pytest.raises(KeyboardInterrupt):
        setup.stream(out, stop_after_layers=1, **kw)
    partial = out.parent / PARTIAL
    assert json.loads((partial / "progress.json").read_text())["done"] == 1
    return partial


def state_file(partial, which):
    if which == "progress.json":
        return partial / which
    if which == "activations":
        (f,) = partial.glob("activations-*.pt")
        return f
    shards = sorted(partial.glob("shard-*.tmp"))
    assert len(shards) >= 2
    return shards[0] if which == "first shard" else shards[-1]


def damage(f, how):
    data = f.read_bytes()
    if how == "truncated":
        f.write_bytes(data[: len(data) // 2])
    elif how == "altered":  # same size, one byte flipped in the middle
        f.write_bytes(data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 1]) + data[len(data) // 2 + 1:])
    else:
        f.unlink()


@pytest.mark.parametrize("how", ["truncated", "altered", "deleted"])
@pytest.mark.parametrize("which", ["progress.json", "activations", "first shard", "last shard"])
def test_damaged_state_is_recomputed(setup, tmp_path, which, how, caplog):
    out = tmp_path / "out"
    partial = interrupted(setup, out)
    f = state_file(partial, which)
    damage(f, how)
    with caplog.at_level("WARNING", logger="moeq"):
        setup.stream(out)
    assert_same_files(out, setup.ref_stream)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert "resuming" not in caplog.text
    if which != "progress.json" or how != "deleted":  # without a manifest there is nothing to call damaged
        assert "damaged" in caplog.text and (f.name if which != "progress.json" else "progress.json") in caplog.text


def test_uncommitted_files_are_not_trusted(setup, tmp_path, caplog):
    """Files the manifest does not name (a step that never committed) are removed, not used."""
    out = tmp_path / "out"
    partial = interrupted(setup, out)
    (partial / "activations-00002.pt").write_bytes(b"junk")
    (partial / "shard-00099.tmp").write_bytes(b"junk")
    with caplog.at_level("WARNING", logger="moeq"):
        setup.stream(out)
    assert "after layer 1 of 2" in caplog.text
    assert_same_files(out, setup.ref_stream)


OTHER_OPTIONS = {  # option named in the refusal -> keyword arguments of the second run
    # (exclude, dtype and calibration tokens: test_regressions)
    "calib_all_experts": dict(calib_all_experts=True),
    "recipe": dict(recipe=moeq.get_recipe("w4a16-nvfp4")),
    "recipe.per_expert_input_scales": dict(
        recipe=dataclasses.replace(moeq.get_recipe("nvfp4"), per_expert_input_scales=True)),
    "layout": dict(layout="compressed-tensors"),
    "max_shard_bytes": dict(max_shard_bytes=1 << 30),
}


@pytest.mark.parametrize("option", list(OTHER_OPTIONS))
def test_other_options_are_refused_by_name_and_overwrite_starts_over(setup, tmp_path, option):
    refused_then_overwrite(setup, tmp_path, option, OTHER_OPTIONS[option])


def refused_then_overwrite(setup, tmp_path, option, kw):
    out = tmp_path / "out"
    partial = interrupted(setup, out)
    with pytest.raises(ValueError, match=f"used {option}=.*overwrite") as e:
        setup.stream(out, **kw)
    assert str(partial) in str(e.value) and "\n" not in str(e.value)
    assert not out.exists() and (partial / "progress.json").exists()  # nothing discarded on a refusal
    setup.stream(out, overwrite=True, **kw)
    setup.stream(tmp_path / "fresh", **kw)
    assert_same_files(out, tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "out"]


def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_it(setup, tmp_path):
    from moeq.resume_state import PartialRun, PartialRunBusy

    out = tmp_path / "out"
    first = PartialRun(tmp_path / PARTIAL, {})
    first.open(overwrite=False, n_layers=2)
    try:
        with pytest.raises(PartialRunBusy, match="another moeq run is writing"):
            setup.stream(out)
    finally:
        first.release()
    setup.stream(out)
    assert_same_files(out, setup.ref_stream)
