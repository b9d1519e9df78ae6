"""A lean Llama-family decoder for serving: fused QKV / gate-up weights, RoPE tables, a slot-based static
KV cache, and capture of the EAGLE-3 hidden states in the same forward pass.

Convention: "capture layer i" is the residual stream *entering* decoder layer i (= Hugging Face
`hidden_states[i]`), so the default `[2, L//2, L-3]` reads low, middle and high features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tide_trt.engine.kv_cache import KVCache
from tide_trt.kernels.linear import linear


@dataclass(frozen=True)
class LlamaArch:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @staticmethod
    def from_hf_config(cfg: dict) -> LlamaArch:
        from tide_trt.errors import TideError

        if cfg.get("model_type", "llama") not in ("llama", "mistral", "qwen2"):
            raise TideError(f"unsupported model_type {cfg.get('model_type')!r}: Llama-family models only")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise TideError(f"unsupported RoPE scaling {rope_type!r}")
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return LlamaArch(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads", heads)),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, returned in x's dtype."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # one fused op
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_len, head_dim] (HF rotate-half layout), float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # [max_len, head_dim/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [max_len, head_dim]
    return emb.cos().float(), emb.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D]; cos/sin [B, 1, T, D] in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


SMALL_QUERY = 16  # decode/verification chunks: grouped-query matmuls beat the CPU flash kernel


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
              scale: float) -> torch.Tensor:
    """Grouped-query attention. q [B, Hq, T, D]; k, v [B, Hkv, L, D]; mask [B, 1, T, L] bool or None.

    Long queries (prefill) use PyTorch SDPA; short ones (decode, verification) fold the query heads of each
    KV head into one matrix and use two batched matmuls with a float32 softmax.
    """
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    if t > SMALL_QUERY or is_causal:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=True)
    g = hq // hkv
    qg = q.reshape(b, hkv, g * t, d)  # [B, Hkv, G*T, D] (row = g*T + t)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [B, Hkv, G*T, L]
    if mask is not None:
        length = mask.shape[-1]
        m = mask.unsqueeze(2).expand(b, 1, g, t, length).reshape(b, 1, g * t, length)
        scores = scores.masked_fill(~m, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(b, hq, t, d)


class LlamaWeights:
    """Weights in serving layout (fused QKV and gate/up) on one device.

    Linear weights are stored in `dtype`; norms in `compute_dtype` (the activations' dtype). With bf16 weights
    and float32 activations on CPU ("native linears") every matmul, the LM head included, runs in the native
    kernel (`tide_trt.kernels`), which reads half the bytes of float32 and is batch-invariant.
    """

    def __init__(self, arch: LlamaArch, state: dict[str, torch.Tensor], dtype: torch.dtype, device: str,
                 compute_dtype: torch.dtype | None = None):
        compute_dtype = compute_dtype or dtype
        native = compute_dtype == torch.float32 and dtype == torch.bfloat16

        def get(name: str, as_dtype: torch.dtype = dtype) -> torch.Tensor:
            return state[name].to(device=device, dtype=as_dtype).contiguous()

        self.embed = get("model.embed_tokens.weight")  # [V, H] (looked up, then cast to the compute dtype)
        self.norm = get("model.norm.weight", compute_dtype)  # [H]
        # Otherwise the LM head runs in float32 whatever the engine dtype: bf16 logits (8-bit mantissa) tie exactly
        # far too often, which makes greedy argmax depend on kernel shapes (docs/ARCHITECTURE.md, losslessness).
        head_name = "lm_head.weight" if ("lm_head.weight" in state and not arch.tie_word_embeddings) \
            else "model.embed_tokens.weight"
        self.lm_head = get(head_name, torch.bfloat16 if native else torch.float32)  # [V, H]
        self.layers = []
        for i in range(arch.num_layers):
            p = f"model.layers.{i}."
            qkv = torch.cat([get(p + "self_attn.q_proj.weight"), get(p + "self_attn.k_proj.weight"),
                             get(p + "self_attn.v_proj.weight")], dim=0)  # [(Hq+2Hkv)*D, H]
            gate_up = torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")], dim=0)
            self.layers.append({
                "input_norm": get(p + "input_layernorm.weight", compute_dtype),
                "qkv": qkv,
                "o": get(p + "self_attn.o_proj.weight"),
                "post_norm": get(p + "post_attention_layernorm.weight", compute_dtype),
                "gate_up": gate_up,  # [2*I, H]
                "down": get(p + "mlp.down_proj.weight"),  # [H, I]
            })

    LINEAR_NAMES = ("qkv", "o", "gate_up", "down")

    def upcast_linears(self) -> None:
        """Replace bf16 linear weights (LM head included) by float32 copies of the same values, for bulk prefill:
        the products are those of the native kernel (bf16 values, float32 accumulation) computed by PyTorch's
        throughput GEMM, 3x faster for long prompts but not batch-invariant, so never for serving."""
        self.lm_head = self.lm_head.float()
        for layer in self.layers:
            for name in self.LINEAR_NAMES:
                layer[name] = layer[name].float()

    def parameters(self) -> list[torch.Tensor]:
        out = [self.embed, self.norm, self.lm_head]
        for layer in self.layers:
            out.extend(layer.values())
        return out


class LlamaModel:
    """Forward over a slot-based KV cache; appends tokens at each slot's current length."""

    def __init__(self, arch: LlamaArch, weights: LlamaWeights, max_seq_len: int, dtype: torch.dtype, device: str):
        self.arch = arch
        self.w = weights
        self.dtype = dtype
        self.device = device
        cos, sin = rope_tables(arch.head_dim, max_seq_len + 16, arch.rope_theta)
        self.cos = cos.to(device=device, dtype=dtype)  # [max_len, D]
        self.sin = sin.to(device=device, dtype=dtype)
        self.scale = 1.0 / math.sqrt(arch.head_dim)

    @torch.inference_mode()
    def forward(
        self,
        cache: KVCache,
        slots: torch.Tensor,
        tokens: torch.Tensor,
        starts: torch.Tensor,
        capture_layers: tuple[int, ...],
        logit_index: torch.Tensor | None,
        counts: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run T new tokens per sequence.

        slots [B] int64, tokens [B, T] int64, starts [B] int64 (cache length before this call).
        logit_index: None -> logits for all T positions; else [B, K] positions to compute logits at.
        counts: real tokens per row (the rest of the row is padding); ragged batches run their matmuls on the
        real rows only (a verification step where few rows draft, a prefill of prompts of unequal length).
        Returns (logits [B, K or T, V] float32, captured [B, T, len(capture_layers), H]); padded positions hold
        zeros or garbage.
        """
        a = self.arch
        bsz, t = tokens.shape
        rows = packed_rows(counts, t, tokens.device)  # [N] flat indices of real tokens, or None
        positions = starts[:, None] + torch.arange(t, device=tokens.device)[None, :]  # [B, T]
        cos = self.cos[positions][:, None]  # [B, 1, T, D]
        sin = self.sin[positions][:, None]
        layout = cache.layout(slots, starts, t)
        x = F.embedding(tokens, self.w.embed).to(self.dtype)  # [B, T, H]
        if rows is not None:
            x = x.reshape(bsz * t, -1)[rows]  # [N, H]: the residual stream of real tokens only
        states: dict[int, torch.Tensor] = {}
        q_size, kv_size = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        for i, lw in enumerate(self.w.layers):
            if i in capture_layers:
                states[i] = x
            h = rms_norm(x, lw["input_norm"], a.rms_norm_eps)
            qkv = unpack_rows(linear(h, lw["qkv"]), rows, bsz, t)  # [B, T, (Hq+2Hkv)*D]
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q = apply_rope(q.view(bsz, t, a.num_heads, a.head_dim).transpose(1, 2), cos, sin)  # [B, Hq, T, D]
            k = apply_rope(k.view(bsz, t, a.num_kv_heads, a.head_dim).transpose(1, 2), cos, sin)  # [B, Hkv, T, D]
            v = v.view(bsz, t, a.num_kv_heads, a.head_dim).transpose(1, 2)
            k_all, v_all = cache.write_and_read(i, layout, k, v)  # [B, Hkv, Lk, D]
            attn = attention(q, k_all, v_all, layout.mask, layout.is_causal, self.scale)  # [B, Hq, T, D]
            attn = attn.transpose(1, 2).reshape(bsz, t, q_size)
            if rows is not None:
                attn = attn.reshape(bsz * t, q_size)[rows]  # [N, Hq*D]
            x = x + linear(attn, lw["o"])
            h = rms_norm(x, lw["post_norm"], a.rms_norm_eps)
            gate, up = linear(h, lw["gate_up"]).chunk(2, dim=-1)
            x = x + linear(F.silu(gate) * up, lw["down"])
        states[a.num_layers] = x  # the last layer's output (before the final norm)
        final = rms_norm(x, self.w.norm, a.rms_norm_eps)  # [B, T, H] or [N, H]
        captured = unpack_rows(torch.stack([states[c] for c in capture_layers], dim=-2), rows, bsz, t)
        if logit_index is None:
            logits = unpack_rows(linear(final.float(), self.w.lm_head), rows, bsz, t)  # [B, T, V] float32
            return logits, captured
        if rows is None:
            sel = torch.gather(final, 1, logit_index[:, :, None].expand(-1, -1, final.shape[-1]))  # [B, K, H]
        else:  # the selected positions are real tokens: find them among the packed rows
            flat = torch.arange(bsz, device=rows.device)[:, None] * t + logit_index  # [B, K]
            sel = final[torch.searchsorted(rows, flat)]  # [B, K, H]
        logits = linear(sel.float(), self.w.lm_head)  # [B, K, V] float32
        return logits, captured


PACK_MIN_PADDING = 0.125  # pack a ragged batch when at least this fraction of its [B, T] positions is padding


def packed_rows(counts: list[int] | None, width: int, device: str | torch.device) -> torch.Tensor | None:
    """Flat indices [N] of the real tokens of a right-padded [B, width] batch, or None when packing would not
    pay (no counts, or padding below PACK_MIN_PADDING)."""
    if counts is None:
        return None
    total = len(counts) * width
    if total - sum(counts) < PACK_MIN_PADDING * total:
        return None
    lengths = torch.tensor(counts, dtype=torch.long, device=device)  # [B]
    real = torch.arange(width, device=device)[None, :] < lengths[:, None]  # [B, T]
    return real.reshape(-1).nonzero().squeeze(1)


def unpack_rows(x: torch.Tensor, rows: torch.Tensor | None, bsz: int, width: int) -> torch.Tensor:
    """Packed [N, *F] -> padded [B, width, *F] (zeros at padded positions); identity when rows is None."""
    if rows is None:
        return x
    out = x.new_zeros((bsz * width, *x.shape[1:]))
    out[rows] = x
    return out.view(bsz, width, *x.shape[1:])
