"""Fixed-shape, batch-invariant forward of a flat step: the CUDA-graph and batch-invariant path.

Every computation runs on tiles of TILE tokens with shapes that never change: linears are one (TILE × K) @ (K × N)
GEMM per tile, attention of each token is against its slot's whole key range [0, max_seq_len) with a mask, so a
token's result does not depend on how many tokens share its step, which rows they belong to, or where it sits in the
batch. Consequences:
  * greedy speculative decoding is token-identical to plain greedy decoding in bf16 (a verification chunk and a
    one-token decode step compute each token the same way), whatever GEMM kernels the device picks per shape;
  * a step of P padded tokens has static shapes and no host synchronisation, so it can be captured once as a CUDA
    graph per P (engine/cuda_graphs.py) and replayed.
Padding tokens (to a multiple of TILE) read and write a scratch KV slot that no sequence owns.
The price is compute: each token attends to max_seq_len keys, and a one-token step computes TILE rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tide_trt.engine.kv_cache import KVCache
from tide_trt.kernels.linear import linear
from tide_trt.models.gguf_weights import QuantWeight
from tide_trt.models.llama import LlamaModel, apply_rope, rms_norm

TILE = 64  # tokens per fixed-shape tile


def padded_size(num_tokens: int, tile: int = TILE) -> int:
    return max(tile, -(-num_tokens // tile) * tile)


def tiled_linear(x: torch.Tensor, weight: torch.Tensor | QuantWeight, tile: int = TILE) -> torch.Tensor:
    """x [P, K] (P a multiple of tile) @ weight.T [K, N] -> [P, N], one fixed-shape GEMM per tile."""
    return torch.cat([linear(x[i:i + tile], weight) for i in range(0, x.shape[0], tile)])


def tiled_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                    mask: torch.Tensor, scale: float, tile: int = TILE) -> torch.Tensor:
    """Per-token attention against the token's whole slot. q [P, Hq, D]; k/v_cache [S, Hkv, L, D]; slots [P];
    mask [P, L] bool (key position <= the token's position). Returns [P, Hq, D]."""
    p, hq, d = q.shape
    hkv = k_cache.shape[1]
    g = hq // hkv
    out = []
    for i in range(0, p, tile):
        qt = q[i:i + tile].reshape(tile, hkv, g, d)  # [T, Hkv, G, D]
        kt = k_cache[slots[i:i + tile]]  # [T, Hkv, L, D]
        vt = v_cache[slots[i:i + tile]]
        scores = torch.matmul(qt, kt.transpose(-1, -2)).float() * scale  # [T, Hkv, G, L]
        scores = scores.masked_fill(~mask[i:i + tile, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(vt.dtype)
        out.append(torch.matmul(probs, vt).reshape(tile, hq, d))  # [T, Hq, D]
    return torch.cat(out)


@torch.inference_mode()
def static_forward(model: LlamaModel, cache: KVCache, token_ids: torch.Tensor, positions: torch.Tensor,
                   token_slots: torch.Tensor, capture_layers: tuple[int, ...], tile: int = TILE
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """P padded tokens (P a multiple of tile): token_ids, positions, token_slots [P] int64 (padding: the scratch
    slot). Writes their K/V into the cache and returns (logits [P, V] float32, captured [P, C, H])."""
    a = model.arch
    w = model.w
    n = token_ids.shape[0]
    cos = model.cos[positions][:, None]  # [P, 1, D]
    sin = model.sin[positions][:, None]
    mask = torch.arange(cache.max_seq_len, device=positions.device)[None, :] <= positions[:, None]  # [P, L]
    x = F.embedding(token_ids, w.embed).to(model.dtype)  # [P, H]
    states: dict[int, torch.Tensor] = {}
    q_size, kv_size = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    for i, lw in enumerate(w.layers):
        if i in capture_layers:
            states[i] = x
        h = rms_norm(x, lw["input_norm"], a.rms_norm_eps)
        q, k, v = tiled_linear(h, lw["qkv"], tile).split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rope(q.reshape(n, a.num_heads, a.head_dim), cos, sin)  # [P, Hq, D]
        k = apply_rope(k.reshape(n, a.num_kv_heads, a.head_dim), cos, sin)  # [P, Hkv, D]
        cache.write_tokens(i, token_slots, positions, k, v.reshape(n, a.num_kv_heads, a.head_dim))
        attn = tiled_attention(q, cache.k[i], cache.v[i], token_slots, mask, model.scale, tile)  # [P, Hq, D]
        x = x + tiled_linear(attn.reshape(n, q_size), lw["o"], tile)
        h = rms_norm(x, lw["post_norm"], a.rms_norm_eps)
        gate, up = tiled_linear(h, lw["gate_up"], tile).chunk(2, dim=-1)
        x = x + tiled_linear(F.silu(gate) * up, lw["down"], tile)
    states[a.num_layers] = x
    captured = torch.stack([states[c] for c in capture_layers], dim=-2)  # [P, C, H]
    final = rms_norm(x, w.norm, a.rms_norm_eps)
    logits = tiled_linear(final.float(), w.lm_head, tile)  # [P, V] float32
    return logits, captured
