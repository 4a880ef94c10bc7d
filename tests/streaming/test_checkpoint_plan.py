"""checkpoint.plan: `to_checkpoint` is the inverse of `fill_from_checkpoint` (streaming AWQ
writes the parameters it folded through it): for every parameter of every core tiny model,
the checkpoint tensors rebuilt from the loaded parameter equal the saved ones exactly, and
a changed parameter lands in its own pieces of the key only."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from moeq.checkpoint.load import CheckpointReader
from moeq.checkpoint.plan import checkpoint_plan, fill_from_checkpoint, to_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tiny_models as tm  # noqa: E402


@pytest.mark.parametrize("model_type", tm.CORE_MODELS)
def test_to_checkpoint_inverts_fill(tmp_path, model_type):
    model = tm.tiny_model(model_type)
    model.save_pretrained(tmp_path)
    reader = CheckpointReader(tmp_path)
    plan = checkpoint_plan(model)
    sd = model.state_dict()
    nontrivial = 0
    for name, pieces in plan.items():
        if not pieces:
            continue
        loaded = torch.empty_like(sd[name])
        fill_from_checkpoint(loaded, pieces, reader.__getitem__)
        assert torch.equal(loaded, sd[name]), name
        out = to_checkpoint({name: loaded}, plan, reader.__getitem__)
        assert set(out) == {p.key for p in pieces}, name
        for key, t in out.items():
            assert torch.equal(t, reader[key]), (name, key)
        nontrivial += any(p.rows is not None for p in pieces)
        # a changed parameter comes back changed, in exactly its own elements
        changed = loaded + 1
        back = torch.empty_like(loaded)
        fill_from_checkpoint(back, pieces, to_checkpoint({name: changed}, plan, reader.__getitem__).__getitem__)
        assert torch.equal(back, changed), name
    assert nontrivial or model_type == "gpt_oss"  # fused experts split into per-expert keys
