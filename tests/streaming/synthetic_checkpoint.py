"""Write a random Qwen3-MoE checkpoint of a chosen size shard by shard (one decoder layer
per shard), never holding more than one layer in memory. Used by the peak-memory test."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from safetensors.torch import save_file
from transformers.core_model_loading import revert_weight_conversion


def config(layers: int, experts: int = 64, hidden: int = 1024, moe_inter: int = 512):
    return transformers.Qwen3MoeConfig(
        vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=moe_inter,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4, head_dim=hidden // 8,
        num_experts=experts, num_experts_per_tok=8, max_position_embeddings=1024, decoder_sparse_step=1,
        mlp_only_layers=[], tie_word_embeddings=False, dtype="bfloat16", architectures=["Qwen3MoeForCausalLM"])


def write(path: Path, cfg, seed: int = 0) -> int:
    """-> bytes written."""
    path.mkdir(parents=True, exist_ok=True)
    with init_empty_weights():
        model = transformers.Qwen3MoeForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    names = list(model.state_dict(keep_vars=True))
    groups = [[n for n in names if n.startswith(f"model.layers.{i}.")] for i in range(cfg.num_hidden_layers)]
    groups.append([n for n in names if not n.startswith("model.layers.")])
    shapes = {n: p.shape for n, p in model.state_dict(keep_vars=True).items()}
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        sd = {}
        for n in group:
            if n.endswith("norm.weight"):
                sd[n] = torch.ones(shapes[n], dtype=torch.bfloat16)
            else:
                sd[n] = (torch.randn(shapes[n], generator=g) * 0.02).to(torch.bfloat16)
        sd = revert_weight_conversion(model, sd)
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path / fname), metadata={"format": "pt"})
        total += sum(v.numel() * v.element_size() for v in sd.values())
        weight_map.update({k: fname for k in sd})
        del sd
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg.save_pretrained(path)
    return total
