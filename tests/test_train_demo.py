"""scripts/train_demo.py builds the intended architectures (configs only: no model, no training,
so no transformers modeling import): the demo stays a Qwen3.5-MoE, --arch qwen3_moe is a plain
Qwen3-MoE, and every quantizable weight of the latter has an input dim K divisible by 128."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import transformers

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train_demo():
    spec = importlib.util.spec_from_file_location("train_demo", ROOT / "scripts" / "train_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_arch_is_the_qwen35_moe_demo(train_demo):
    assert train_demo.parse_args([]).arch == "qwen3_5_moe"
    _, builder, class_name = train_demo.ARCHS["qwen3_5_moe"]
    assert class_name == "Qwen3_5MoeForCausalLM"
    assert builder(4096, 0, 0).model_type == "qwen3_5_moe_text"


def test_qwen3_moe_arch(train_demo):
    _, builder, class_name = train_demo.ARCHS["qwen3_moe"]
    cfg = builder(4096, 0, 0)
    # Qwen3MoeForCausalLM: standard attention, plain RMSNorm (x * w), no shared expert
    assert class_name == "Qwen3MoeForCausalLM" and type(cfg) is transformers.Qwen3MoeConfig
    assert cfg.model_type == "qwen3_moe" and not hasattr(cfg, "shared_expert_intermediate_size")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok) == (256, 4, 16, 4)
    assert (cfg.moe_intermediate_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads) == (128, 64, 4, 2)
    assert cfg.decoder_sparse_step == 1 and not cfg.mlp_only_layers  # every layer MoE: no dense MLP
    # input dim K of every quantizable weight of Qwen3MoeForCausalLM
    k = {
        "self_attn.q_proj/k_proj/v_proj": cfg.hidden_size,
        "self_attn.o_proj": cfg.num_attention_heads * cfg.head_dim,
        "mlp.experts.gate_up_proj": cfg.hidden_size,
        "mlp.experts.down_proj": cfg.moe_intermediate_size,
        "mlp.gate (router)": cfg.hidden_size,
        "lm_head": cfg.hidden_size,
    }
    bad = {name: K for name, K in k.items() if K % 128}
    assert not bad, f"K not divisible by 128: {bad}"


def test_qwen3_moe_never_writes_into_the_demo(train_demo):
    args = train_demo.parse_args(["--arch", "qwen3_moe"])
    assert args.out_dir != train_demo.DEFAULT_OUT and args.data_from == train_demo.DEFAULT_OUT
    with pytest.raises(SystemExit):
        train_demo.parse_args(["--arch", "qwen3_moe", "--out-dir", str(train_demo.DEFAULT_OUT)])
