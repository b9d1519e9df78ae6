"""A tiny randomly initialised Llama written as a real checkpoint directory (fast unit tests, no tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_tiny_llama(out_dir: str | Path, seed: int = 0, vocab_size: int = 96, hidden_size: int = 64,
                     num_layers: int = 6, num_heads: int = 4, num_kv_heads: int = 2,
                     intermediate_size: int = 128) -> Path:
    """Write config.json + model.safetensors of a random Llama; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    head_dim = hidden_size // num_heads

    def rand(*shape: int, scale: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    state = {"model.embed_tokens.weight": rand(vocab_size, hidden_size, scale=1.0),
             "model.norm.weight": torch.ones(hidden_size),
             "lm_head.weight": rand(vocab_size, hidden_size, scale=0.3)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        state.update({
            p + "input_layernorm.weight": torch.ones(hidden_size),
            p + "post_attention_layernorm.weight": torch.ones(hidden_size),
            p + "self_attn.q_proj.weight": rand(num_heads * head_dim, hidden_size),
            p + "self_attn.k_proj.weight": rand(num_kv_heads * head_dim, hidden_size),
            p + "self_attn.v_proj.weight": rand(num_kv_heads * head_dim, hidden_size),
            p + "self_attn.o_proj.weight": rand(hidden_size, num_heads * head_dim),
            p + "mlp.gate_proj.weight": rand(intermediate_size, hidden_size),
            p + "mlp.up_proj.weight": rand(intermediate_size, hidden_size),
            p + "mlp.down_proj.weight": rand(hidden_size, intermediate_size),
        })
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab_size,
              "hidden_size": hidden_size, "intermediate_size": intermediate_size,
              "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
              "num_key_value_heads": num_kv_heads, "head_dim": head_dim, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    return out
