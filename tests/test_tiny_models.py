"""Tests for the tiny-model factory in ``tests/tiny_models.py``."""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_models as tm  # noqa: E402

REL_TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with tm.single_thread():
        yield


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


class _FuncSpy(TorchFunctionMode):
    """Records every function that reaches ``__torch_function__``."""

    def __init__(self):
        super().__init__()
        self.funcs = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.funcs.add(func)
        return func(*args, **(kwargs or {}))


def _grouped_funcs() -> set:
    out = {torch._grouped_mm} if hasattr(torch, "_grouped_mm") else set()
    fallback = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if fallback is not None:
        out |= {fallback, fallback.default}
    return out


def _run(model_type: str, implementation: str, ids: torch.Tensor):
    model = tm.tiny_model(model_type, experts_implementation=implementation)
    experts = tm.experts_modules(model)
    assert experts, f"{model_type}: no decorated experts module in {type(model).__name__}"
    for name, mod in experts:
        assert mod.config._experts_implementation == implementation, name
    spy = _FuncSpy()
    with spy:
        out = tm.forward_output(model, ids)
    return model, out, spy.funcs


# ---------------------------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------------------------


def test_discovery_finds_decorated_experts_classes():
    cases = tm.discover_experts_classes()
    names = {c.experts_class_name for c in cases}
    assert len(cases) >= 40, f"only {len(cases)} experts classes discovered"
    assert {"Qwen3_5MoeExperts", "GptOssExperts", "MixtralExperts", "NemotronHExperts"} <= names
    # deduped: one record per class object, and class names are unique
    assert len({c.experts_class for c in cases}) == len(cases)
    assert len(names) == len(cases)
    for c in cases:
        assert tm.is_experts_class(c.experts_class)
        assert c.model_type
        assert c.model_class is not None or c.skip_reason, c
        assert set(c.flags) == set(tm.FLAG_NAMES), c
    model_types = [c.model_type for c in cases]
    assert len(set(model_types)) == len(model_types), "model types must identify cases uniquely"


def test_discovery_flags_and_model_classes():
    gpt = tm.find_case("gpt_oss")
    assert gpt.experts_class_name == "GptOssExperts"
    assert gpt.flags == dict(
        has_gate=True, has_bias=True, is_transposed=True, is_concatenated=False, has_post_expert_norm=False
    )
    assert gpt.custom_apply_gate
    nem = tm.find_case("nemotron_h")
    assert nem.flags["has_gate"] is False
    mix = tm.find_case("mixtral")
    assert mix.flags == dict(
        has_gate=True, has_bias=False, is_transposed=False, is_concatenated=True, has_post_expert_norm=False
    )
    assert not mix.custom_apply_gate
    assert tm.find_case("muse_spark").flags["has_post_expert_norm"] is True
    q35 = tm.find_case("qwen3_5_moe")  # family alias of the text-only model type
    assert q35.model_class.__name__ == "Qwen3_5MoeForCausalLM"
    assert q35.config_class.__name__ == "Qwen3_5MoeTextConfig"
    assert tm.find_case("Qwen3_5MoeExperts") is q35
    # multimodal families resolve to a text-only class, never to a vision/audio tower
    for c in tm.discover_experts_classes():
        if c.model_class is not None:
            assert not c.model_class.config_class.sub_configs, c


def test_not_an_experts_class():
    assert not tm.is_experts_class(torch.nn.Linear)
    assert not tm.is_experts_class(object)
    with pytest.raises(KeyError):
        tm.find_case("definitely_not_a_model")


# ---------------------------------------------------------------------------------------------------------------
# Tiny configs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", tm.CORE_MODELS)
def test_core_tiny_config(model_type):
    cfg = tm.tiny_config(model_type)
    assert cfg.hidden_size == 128
    assert cfg.vocab_size == 256
    assert cfg.max_position_embeddings == 512
    assert cfg.tie_word_embeddings is False
    n_exp = next(getattr(cfg, k) for k in tm.NUM_EXPERT_KEYS if getattr(cfg, k, None) is not None)
    top_k = next(getattr(cfg, k) for k in tm.TOPK_KEYS if getattr(cfg, k, None) is not None)
    assert 4 <= n_exp <= 8 and top_k == 2
    assert cfg.num_hidden_layers <= 3


def test_hybrid_layer_structures_are_kept():
    q35 = tm.tiny_config("qwen3_5_moe")
    assert q35.num_hidden_layers == 2 and sorted(q35.layer_types) == ["full_attention", "linear_attention"]
    nxt = tm.tiny_config("qwen3_next")
    assert sorted(nxt.layer_types) == ["full_attention", "linear_attention"]
    ds = tm.tiny_config("deepseek_v3")
    assert ds.num_hidden_layers == 2 and ds.first_k_dense_replace == 1  # layer 0 dense, layer 1 MoE
    assert ds.kv_lora_rank == 128 and ds.q_lora_rank == 128
    assert ds.qk_head_dim == ds.qk_nope_head_dim + ds.qk_rope_head_dim
    gpt = tm.tiny_config("gpt_oss")
    assert sorted(set(gpt.layer_types)) == ["full_attention", "sliding_attention"]
    nem = tm.tiny_config("nemotron_h")
    assert "moe" in nem.layers_block_type


def test_tiny_config_returns_fresh_copies_and_overrides():
    a = tm.tiny_config("qwen3_moe")
    a.hidden_size = 999
    assert tm.tiny_config("qwen3_moe").hidden_size == 128
    assert tm.tiny_config("qwen3_moe", num_hidden_layers=1).num_hidden_layers == 1


# ---------------------------------------------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", tm.CORE_MODELS)
def test_core_model_implementations_agree(model_type):
    ids = tm.random_input_ids(tm.tiny_config(model_type), batch=2, seq=16)
    outs = {}
    for impl in tm.EXPERT_IMPLEMENTATIONS:
        model, out, funcs = _run(model_type, impl, ids)
        assert out.shape[:2] == ids.shape and torch.isfinite(out).all(), impl
        outs[impl] = out
        # the requested implementation really ran
        grouped = bool(funcs & _grouped_funcs())
        assert grouped == (impl == "grouped_mm"), (impl, grouped)
        if impl == "batched_mm":
            assert torch.bmm in funcs
    for impl in ("batched_mm", "grouped_mm"):
        err = _rel_err(outs[impl], outs["eager"])
        assert err <= REL_TOL, f"{model_type}: {impl} vs eager relative error {err:.2e}"


@pytest.mark.parametrize("model_type", tm.CORE_MODELS)
def test_core_model_expert_params(model_type):
    model = tm.tiny_model(model_type)
    n3d = 0
    for name, mod in tm.experts_modules(model):
        for pname, p in mod.named_parameters(recurse=False):
            assert torch.isfinite(p).all(), f"{name}.{pname}"
            if p.ndim == 3:
                n3d += 1
                assert p.shape[0] in range(4, 9), f"{name}.{pname}: {tuple(p.shape)}"
                per_expert = p.detach().flatten(1).abs().amax(dim=1)
                assert (per_expert > 0).all(), f"{name}.{pname} has an all-zero expert"
            else:  # biases [E, out]: small, random, non-zero
                assert (p != 0).all() and p.abs().max() < 1, f"{name}.{pname}"
    assert n3d >= 2
    bad = {k: v for k, v in tm.linear_input_dims(model).items() if v % 128}
    assert not bad, f"nn.Linear / expert input dims not multiples of 128: {bad}"


def test_tiny_model_is_deterministic():
    a = tm.tiny_model("qwen3_moe", seed=0)
    b = tm.tiny_model("qwen3_moe", seed=0)
    c = tm.tiny_model("qwen3_moe", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if "experts" in k)
    assert not a.training


def test_tiny_model_dtype():
    m = tm.tiny_model("mixtral", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    out = tm.forward_output(m, tm.random_input_ids(m))
    assert torch.isfinite(out.float()).all()


def _variant_representatives():
    """One buildable case per distinct (eager forward, _apply_gate, flags) variant."""
    reps = {}
    for c in tm.discover_experts_classes():
        if c.skip_reason is None:
            reps.setdefault(c.variant, c)
    return sorted(reps.values(), key=lambda c: c.model_type)


@pytest.mark.parametrize("case", _variant_representatives(), ids=lambda c: c.model_type)
def test_every_experts_variant_implementations_agree(case):
    ids = tm.random_input_ids(tm.tiny_config(case.model_type))
    outs = {impl: _run(case.model_type, impl, ids)[1] for impl in tm.EXPERT_IMPLEMENTATIONS}
    for impl in ("batched_mm", "grouped_mm"):
        err = _rel_err(outs[impl], outs["eager"])
        assert err <= REL_TOL, f"{case.model_type}: {impl} vs eager relative error {err:.2e}"


def test_sweep_every_discovered_model_builds_and_runs():
    cases = [c for c in tm.discover_experts_classes() if c.skip_reason is None]
    timings, failures = {}, {}
    t_total, cpu_total = time.perf_counter(), time.process_time()
    for c in cases:
        t0 = time.perf_counter()
        try:
            model = tm.tiny_model(c.model_type)
            ids = tm.random_input_ids(model)
            out = tm.forward_output(model, ids)
            assert out.shape[:2] == ids.shape, tuple(out.shape)
            assert torch.isfinite(out).all(), "non-finite output"
            assert any(p.ndim == 3 for _, m in tm.experts_modules(model) for p in m.parameters(recurse=False)), (
                "no 3-D expert params"
            )
            bad = {k: v for k, v in tm.linear_input_dims(model).items() if v % 128}
            assert not bad, f"input dims not multiples of 128: {bad}"
        except Exception as err:  # collect all failures, report at once
            failures[c.model_type] = f"{type(err).__name__}: {err}"
        timings[c.model_type] = time.perf_counter() - t0
    total, cpu = time.perf_counter() - t_total, time.process_time() - cpu_total
    slowest = sorted(timings.items(), key=lambda kv: -kv[1])[:5]
    print(
        f"\n[tiny sweep] {len(cases)} models in {total:.1f}s wall / {cpu:.1f}s CPU; slowest: "
        + ", ".join(f"{k}={v:.2f}s" for k, v in slowest)
    )
    assert not failures, failures
    too_slow = {k: round(v, 2) for k, v in timings.items() if v > 5.0}
    assert not too_slow, f"tiny models should build + run in well under a few seconds: {too_slow}"
