"""kv_cache='fp8' calibration (moeq/kv_cache.py): the k/v scales are amax / 448 of the keys AFTER rotary
embedding and of the values, under eager and sdpa attention alike; padding never counts; the quantized
forward fake-quantizes k and v with them; layers without a k/v cache are skipped; MLA and attention moeq
cannot see are refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers.models.qwen3_moe import modeling_qwen3_moe as Q

import moeq
from moeq.kv_cache import AttentionState, KVCacheError, check_call
from moeq.recipes import PRESETS

from .helpers import tm

FP8_KV = dataclasses.replace(PRESETS["fp8"], kv_cache="fp8")


def _hand_amax(model, batches):
    """max |k| after rope (and |k| before it, and |v|) per attention layer, recomputed from each layer's
    inputs with Qwen3-MoE's own projection / norm / rotary functions."""
    got = {}

    def pre(mod, args, kwargs):
        h = kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        shape = (*h.shape[:-1], -1, mod.head_dim)
        q = mod.q_norm(mod.q_proj(h).view(shape)).transpose(1, 2)
        k = mod.k_norm(mod.k_proj(h).view(shape)).transpose(1, 2)
        v = mod.v_proj(h).view(shape).transpose(1, 2)
        _, k_rope = Q.apply_rotary_pos_emb(q, k, cos, sin)
        cur = got.setdefault(mod, torch.zeros(3))
        got[mod] = torch.maximum(cur, torch.stack([k_rope.abs().amax(), k.abs().amax(), v.abs().amax()]))

    layers = [layer.self_attn for layer in model.model.layers]
    handles = [a.register_forward_pre_hook(pre, with_kwargs=True) for a in layers]
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return [got[a] for a in layers]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_scales_are_post_rope_amax_over_448(impl):
    model = tm.tiny_model("qwen3_moe")
    model.set_attn_implementation(impl)
    batches = [tm.random_input_ids(model, batch=2, seq=12, seed=s) for s in range(2)]
    want = _hand_amax(model, batches)
    moeq.quantize(model, FP8_KV, batches, progress=False)
    states = model.moeq_session.attention
    assert [st.name for st in states] == [f"model.layers.{i}.self_attn" for i in range(len(want))]
    for st, (k_rope, k_plain, v) in zip(states, want):
        assert k_rope != k_plain  # the test tells post-rope from pre-rope keys
        assert torch.equal(st.amax["k"], k_rope) and torch.equal(st.amax["v"], v), st.name
        assert torch.equal(st.scale["k"], k_rope / 448) and torch.equal(st.scale["v"], v / 448)
        assert st.scale["k"].dtype == torch.float32 and st.scale["k"].dim() == 0


def test_padding_never_reaches_the_scales():
    """Right padding with an attention_mask gives the scales of the unpadded real tokens (causal attention:
    the real tokens' k and v do not depend on what follows them), up to fp32 rounding of the projections
    over another number of rows; without the mask the padding tokens raise them."""
    model = tm.tiny_model("qwen3_moe")
    real = tm.random_input_ids(model, batch=1, seq=6, seed=3)
    pad = torch.full((1, 10), 255, dtype=torch.long)
    padded = {"input_ids": torch.cat([real, pad], 1), "attention_mask": torch.cat([torch.ones(1, 6), torch.zeros(1, 10)], 1).long()}
    scales = []
    for data in ([real], [padded], [padded["input_ids"]]):
        m = tm.tiny_model("qwen3_moe")
        moeq.quantize(m, FP8_KV, data, progress=False)
        scales.append(torch.stack([torch.stack([st.scale["k"], st.scale["v"]]) for st in m.moeq_session.attention]))
    rel = lambda a, b: float(((a - b).abs() / b).max())  # noqa: E731  (fp32 k_proj over 6 vs 16 tokens: last bits)
    assert rel(scales[1], scales[0]) < 1e-6
    assert rel(scales[2], scales[0]) > 1e-3


def test_quantized_forward_fake_quantizes_k_and_v_with_the_scales():
    model = tm.tiny_model("qwen3_moe")
    ids = tm.random_input_ids(model, batch=1, seq=8, seed=1)
    moeq.quantize(model, FP8_KV, [ids], progress=False)
    base = tm.tiny_model("qwen3_moe")
    moeq.quantize(base, PRESETS["fp8"], [ids], progress=False)
    with_kv, without = tm.forward_output(model, ids), tm.forward_output(base, ids)
    assert not torch.equal(with_kv, without)  # the cache's rounding is seen
    st = model.moeq_session.attention[0]
    st.scale["k"] = st.scale["k"] * 2**-12  # k saturates at +-448 * scale: the attention pattern is destroyed
    assert (tm.forward_output(model, ids) - with_kv).abs().max() > 5 * (with_kv - without).abs().max()


@pytest.mark.parametrize("model_type,names", [
    ("qwen3_5_moe", "self_attn"),  # gated delta net layers (linear_attn) have no k/v cache
    ("nemotron_h", "mixer"),  # mamba mixers have none; the attention mixer has k_proj / v_proj
])
def test_only_layers_with_a_kv_cache_get_scales(model_type, names):
    model = tm.tiny_model(model_type)
    moeq.quantize(model, dataclasses.replace(PRESETS["fp8-dynamic"], kv_cache="fp8"),
                  [tm.random_input_ids(model, batch=1, seq=8)], progress=False)
    got = [st.name for st in model.moeq_session.attention]
    want = [n for n, m in model.named_modules() if hasattr(m, "k_proj") and hasattr(m, "v_proj")]
    assert got == want and got and all(n.endswith(names) for n in got)
    assert len(got) < len(model.model.layers)


def test_mla_is_refused():
    model = tm.tiny_model("deepseek_v3")
    with pytest.raises(KVCacheError, match=r"self_attn \(DeepseekV3Attention\) is MLA attention.*without kv_cache"):
        moeq.quantize(model, FP8_KV, [tm.random_input_ids(model, batch=1, seq=8)], progress=False)
    assert getattr(model, "moeq_session", None) is None


def test_calibration_data_is_required():
    model = tm.tiny_model("qwen3_moe")
    with pytest.raises(ValueError, match="kv_cache='fp8' needs calib_data"):
        moeq.quantize(model, dataclasses.replace(PRESETS["fp8-dynamic"], kv_cache="fp8"), None, progress=False)


def test_attention_moeq_cannot_see_is_refused():
    """A call without exactly one sdpa, or one Q K^T and one P V (a flash / flex kernel), raises naming the fix."""
    st = AttentionState("model.layers.0.self_attn", tm.tiny_model("qwen3_moe").model.layers[0].self_attn)
    after = check_call(st, "flash_attention_2")
    assert after("out", {"seen": {"sdpa": 1, "qk": 0, "pv": 0}}) == "out"
    assert after("out", {"seen": {"sdpa": 0, "qk": 1, "pv": 1}}) == "out"
    with pytest.raises(KVCacheError, match=r"self_attn: .*'flash_attention_2'.*attn_implementation='sdpa' or 'eager'"):
        after("out", {"seen": {"sdpa": 0, "qk": 0, "pv": 0}})


def test_unknown_kv_cache_format_is_refused():
    with pytest.raises(ValueError, match=r"unknown kv_cache format 'int8'"):
        dataclasses.replace(PRESETS["fp8"], kv_cache="int8")
