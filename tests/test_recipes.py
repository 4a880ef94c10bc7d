"""The default exclude list keeps what vLLM builds unquantized in full precision (routers,
including Linears inside a router module, and classification heads) and nothing else."""

from __future__ import annotations

import pytest

from moeq.recipes import PRESETS


@pytest.mark.parametrize("name", [
    "lm_head",
    "score",  # *ForTokenClassification head (openai_privacy_filter): vLLM has no quantized score
    "model.layers.0.mlp.gate",
    "model.layers.0.mlp.router",
    "model.layers.0.router.proj",  # Gemma 4: vLLM's GateLinear holds a weight only
    "model.embed_tokens",
])
def test_default_exclude_keeps_routers_and_heads(name):
    assert PRESETS["nvfp4"].excludes(name)


@pytest.mark.parametrize("name", [
    "model.layers.0.mlp.experts",
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.mlp.gate_proj",
    "model.layers.0.mlp.shared_expert.up_proj",
    "model.layers.0.self_attn.score_proj",  # only the top-level head is named `score`
    "model.router_like.proj",
])
def test_default_exclude_leaves_quantizable_layers(name):
    assert not PRESETS["nvfp4"].excludes(name)
