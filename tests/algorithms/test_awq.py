"""AWQ: the folds leave the unquantized model's function unchanged (norm offsets probed, the
router scaled with its norm so routing is kept, wrong folds caught and reverted), the search
never picks a worse sample loss than max, and the export reloads bit-exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeRMSNorm
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

import moeq
from moeq.algorithms import awq_search, fold

from .helpers import fresh, tm


def _calib(m, n=2):
    return [tm.random_input_ids(m, 2, 16, seed=s) for s in range(1, n + 1)]


@torch.no_grad()
def _unquantized_logits(m, ids):
    m.moeq_session.detach()  # the hooks gone, the model computes with its (folded) parameters
    return m(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("mt", ["qwen3_5_moe", "qwen3_moe", "mixtral", "gpt_oss"])
def test_fold_keeps_the_unquantized_function(pristine, mt):
    base = pristine(mt)
    m = fresh(base)
    rep = moeq.quantize(m, "nvfp4", _calib(m), progress=False, algorithm="awq")
    ids = tm.random_input_ids(m, 1, 24, seed=7)
    with torch.no_grad():
        want = base(input_ids=ids, use_cache=False).logits
    norms = [n for n, g in rep.awq.items() if n.endswith("layernorm") and g["alpha"] is not None]
    assert norms, (rep.awq, rep.awq_skipped)  # something was folded with s != 1 ...
    for n in norms:  # ... and really changed
        assert not torch.equal(m.get_submodule(n).weight, base.get_submodule(n).weight), n
    assert torch.allclose(_unquantized_logits(m, ids), want, rtol=1e-4, atol=1e-5)
    downs = [n for n in [*rep.awq, *rep.awq_skipped] if n.endswith("experts.down_proj")]
    assert downs
    if mt == "gpt_oss":  # (up + 1) * glu(gate), clamped: no exact down fold
        assert all("act(gate) * up" in rep.awq_skipped[n] for n in downs)
    else:
        assert all(n in rep.awq for n in downs)
    folded = sum(g["alpha"] is not None for g in rep.awq.values())
    assert (f"awq: {folded} scale groups folded, {len(rep.awq) - folded} kept s = 1, {len(rep.awq_skipped)} not "
            f"foldable") in rep.summary()


def test_search_never_worse_than_max(pristine):
    m = fresh(pristine("qwen3_5_moe"))
    rep = moeq.quantize(m, "nvfp4", _calib(m), progress=False, algorithm="awq")
    assert rep.awq and all(g["loss"] <= g["loss_max"] for g in rep.awq.values())
    assert any(g["loss"] < g["loss_max"] for g in rep.awq.values())
    assert torch.equal(awq_search.scales(torch.rand(3, 8) + 0.1, 0.0), torch.ones(3, 8))  # alpha = 0 without DUO is max


def test_a_hidden_consumer_is_caught_and_reverted(pristine):
    """The norm output also reaches non-module code (added to the MLP output): the fold would
    change the function, the layer check reverts it and says so."""
    base = pristine("qwen3_moe")
    m = fresh(base)
    for layer in (base.model.layers[0], m.model.layers[0]):
        layer.mlp.forward = (lambda f: lambda h: f(h) + 0.5 * h)(type(layer.mlp).forward.__get__(layer.mlp))
    try:
        rep = moeq.quantize(m, "nvfp4", _calib(m), progress=False, algorithm="awq")
        ids = tm.random_input_ids(m, 1, 24, seed=7)
        with torch.no_grad():
            want = base(input_ids=ids, use_cache=False).logits
        assert "moved" in rep.awq_skipped["model.layers.0.post_attention_layernorm"]
        assert "model.layers.1.post_attention_layernorm" in rep.awq  # the untouched layer still folds
        assert torch.allclose(_unquantized_logits(m, ids), want, rtol=1e-4, atol=1e-5)
    finally:
        del base.model.layers[0].mlp.forward


class _OddNorm(nn.Module):  # n(x) * (2 + w): neither form, never folded
    def __init__(self, k):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(k))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (2 + self.weight)


@pytest.mark.parametrize("make,offset", [(Qwen3MoeRMSNorm, 0.0), (Qwen3_5MoeRMSNorm, 1.0),
                                         (nn.LayerNorm, 0.0), (_OddNorm, None)])
def test_norm_offset_probe_and_exact_fold(make, offset):
    torch.manual_seed(0)
    norm = make(64)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64) * 0.3 + (0 if offset == 1.0 else 1))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.randn(64) * 0.1)
    before = norm.weight.detach().clone()
    assert fold.norm_offset(norm, 64) == offset
    assert torch.equal(norm.weight, before)  # the probe restores the weight
    if offset is None:
        return
    x, s = torch.randn(5, 64), torch.rand(64) * 4 + 0.25
    with torch.no_grad():
        want = norm(x)
        fold.fold_norm(norm, offset, s)
        assert torch.allclose(norm(x) * s, want, rtol=1e-5, atol=1e-6)


def test_demo_fold_keeps_logits_and_routing():
    """The demo model (gated delta-net + gated attention, (1 + w) norms, sigmoid-gated shared
    expert): logits and every router's top-k unchanged by the folds; the same folds without
    the router's would change the routing."""
    import transformers

    from moeq import data as D

    tok = transformers.AutoTokenizer.from_pretrained(D.DEMO_MODEL)
    base = transformers.AutoModelForCausalLM.from_pretrained(D.DEMO_MODEL, dtype=torch.float32).eval()
    windows = D.token_windows(tok, D.read_text(D.DEMO_CALIB), 64, 8)
    m = fresh(base)
    rep = moeq.quantize(m, "nvfp4", D.batches(windows, 4), progress=False, algorithm="awq")
    assert all(f"model.layers.{i}.post_attention_layernorm" in rep.awq for i in range(4)), rep.awq_skipped
    ids = D.token_windows(tok, D.read_text(D.DEMO_EVAL), 64, 2)

    def routing(model):
        got = []
        hs = [mod.register_forward_hook(lambda _m, _a, out: got.append(out[2])) for mod in model.modules()
              if type(mod).__name__.endswith("TopKRouter")]
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
        for h in hs:
            h.remove()
        return logits, got

    want, want_idx = routing(base)
    m.moeq_session.detach()
    got, got_idx = routing(m)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    for a, b in zip(got_idx, want_idx):  # top-k sets per token (order inside the k may swap on a tie)
        assert torch.equal(a.sort(-1).values, b.sort(-1).values)
    for i, layer in enumerate(m.model.layers):  # undo the router fold only: s from the norm's fold
        s = (1 + base.model.layers[i].post_attention_layernorm.weight) / (1 + layer.post_attention_layernorm.weight)
        with torch.no_grad():
            layer.mlp.gate.weight.div_(s.detach())
    _, unscaled_idx = routing(m)
    changed = sum(int((a.sort(-1).values != b.sort(-1).values).any(-1).sum()) for a, b in zip(unscaled_idx, want_idx))
    assert changed > 0.01 * sum(a.shape[0] for a in want_idx)


@pytest.mark.parametrize("preset,layout,algorithm", [
    ("nvfp4", "modelopt", "awq"),
    ("w4a16-int4", "compressed-tensors", "awq+gptq"),
])
def test_export_loads_back_bit_exact(pristine, tmp_path, preset, layout, algorithm):
    m = fresh(pristine("qwen3_5_moe"))
    moeq.quantize(m, preset, _calib(m, 1), progress=False, algorithm=algorithm)
    ids = tm.random_input_ids(m, 1, 12, seed=3)
    with torch.no_grad():
        want = m(input_ids=ids, use_cache=False).logits
    moeq.export(m, tmp_path / "out", layout, progress=False)
    back = moeq.load(tmp_path / "out")
    with torch.no_grad():
        got = back(input_ids=ids, use_cache=False).logits
    assert torch.equal(got, want)


def test_awq_needs_data(pristine):
    with pytest.raises(ValueError, match="calib_data"):
        moeq.quantize(fresh(pristine("qwen3_5_moe")), "w4a16-int4", None, progress=False, algorithm="awq")
