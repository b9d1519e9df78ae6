"""A lean Llama-family decoder for serving: fused QKV / gate-up weights, RoPE tables, a slot-based static
KV cache, and capture of the EAGLE-3 hidden states in the same forward pass.

Convention: "capture layer i" is the residual stream *entering* decoder layer i (= Hugging Face
`hidden_states[i]`), so the default `[2, L//2, L-3]` reads low, middle and high features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tide_trt.engine.kv_cache import KVCache
from tide_trt.engine.step_batch import StepBatch
from tide_trt.kernels.linear import linear
from tide_trt.models.gguf_weights import QuantWeight


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
    """x [..., heads, T, D] or [N, heads, D]; cos/sin broadcastable to x ([B, 1, T, D] or [N, 1, D]), x's dtype."""
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
                 compute_dtype: torch.dtype | None = None,
                 quant: dict[str, torch.Tensor | QuantWeight] | None = None):
        compute_dtype = compute_dtype or dtype
        native = compute_dtype == torch.float32 and dtype == torch.bfloat16
        if quant is not None:  # GGUF blocks (engine.weights q4_1 / q8_0; float32 copies without the kernel)
            dtype = compute_dtype = torch.float32

        def get(name: str, as_dtype: torch.dtype = dtype) -> torch.Tensor:
            return state[name].to(device=device, dtype=as_dtype).contiguous()

        def lin(*names: str) -> torch.Tensor | QuantWeight:
            parts = [quant[n] for n in names] if quant is not None else [get(n) for n in names]
            if len(parts) == 1:
                return parts[0]
            if all(isinstance(p, QuantWeight) for p in parts):
                return QuantWeight.concat(parts)  # type: ignore[arg-type]
            return torch.cat([p.to(device) for p in parts if isinstance(p, torch.Tensor)], dim=0).contiguous()

        self.embed = get("model.embed_tokens.weight")  # [V, H] (looked up, then cast to the compute dtype)
        self.norm = get("model.norm.weight", compute_dtype)  # [H]
        # Otherwise the LM head runs in float32 whatever the engine dtype: bf16 logits (8-bit mantissa) tie exactly
        # far too often, which makes greedy argmax depend on kernel shapes (docs/ARCHITECTURE.md, losslessness).
        head_name = "lm_head.weight" if ("lm_head.weight" in state and not arch.tie_word_embeddings) \
            else "model.embed_tokens.weight"
        self.lm_head: torch.Tensor | QuantWeight = (  # [V, H]
            quant["lm_head.weight"] if quant is not None
            else get(head_name, torch.bfloat16 if native else torch.float32))
        self.layers: list[dict[str, Any]] = []  # name -> torch.Tensor | QuantWeight
        for i in range(arch.num_layers):
            p = f"model.layers.{i}."
            self.layers.append({
                "input_norm": get(p + "input_layernorm.weight", compute_dtype),
                "qkv": lin(p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
                           p + "self_attn.v_proj.weight"),  # [(Hq+2Hkv)*D, H]
                "o": lin(p + "self_attn.o_proj.weight"),
                "post_norm": get(p + "post_attention_layernorm.weight", compute_dtype),
                "gate_up": lin(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),  # [2*I, H]
                "down": lin(p + "mlp.down_proj.weight"),  # [H, I]
            })

    def linear_bytes(self) -> int:
        """Bytes of linear weights (LM head included) one decode step reads."""
        def size(w: torch.Tensor | QuantWeight) -> int:
            return w.nbytes if isinstance(w, QuantWeight) else w.numel() * w.element_size()

        return size(self.lm_head) + sum(size(layer[n]) for layer in self.layers for n in self.LINEAR_NAMES)

    LINEAR_NAMES = ("qkv", "o", "gate_up", "down")

    def upcast_linears(self) -> None:
        """Replace bf16 or quantized linear weights (LM head included) by float32 copies of the same values, for bulk
        prefill: the products are those of the native kernels (the same weight values, float32 accumulation)
        computed by PyTorch's throughput GEMM, 3x faster for long prompts but not batch-invariant, so never for
        serving."""
        def up(w: torch.Tensor | QuantWeight) -> torch.Tensor:
            return w.dequantize() if isinstance(w, QuantWeight) else w.float()

        self.lm_head = up(self.lm_head)
        for layer in self.layers:
            for name in self.LINEAR_NAMES:
                layer[name] = up(layer[name])

    def parameters(self) -> list[torch.Tensor]:
        """Every weight tensor (quantized weights as their block tensors)."""
        def t(w: torch.Tensor | QuantWeight) -> torch.Tensor:
            return w.blocks if isinstance(w, QuantWeight) else w

        out = [self.embed, self.norm, t(self.lm_head)]
        for layer in self.layers:
            out.extend(t(w) for w in layer.values())
        return out


class LlamaModel:
    """Forward of one flat step batch over a slot-based KV cache."""

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
    def forward(self, cache: KVCache, batch: StepBatch, capture_layers: tuple[int, ...]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the N new tokens of `batch` (R rows of any lengths) in one pass.

        Every matmul runs on the N real tokens (no padding); attention runs per group of rows of similar length
        (decode/verification rows together, prompt chunks together), each padded only to its own width.
        Returns (logits [M, V] float32 at batch.logit_index, captured [N, len(capture_layers), H]).
        """
        a = self.arch
        n = batch.num_tokens
        groups = attention_groups(batch, cache)
        cos = self.cos[batch.positions][:, None]  # [N, 1, D]
        sin = self.sin[batch.positions][:, None]
        x = F.embedding(batch.token_ids, self.w.embed).to(self.dtype)  # [N, H]
        states: dict[int, torch.Tensor] = {}
        q_size, kv_size = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        for i, lw in enumerate(self.w.layers):
            if i in capture_layers:
                states[i] = x
            h = rms_norm(x, lw["input_norm"], a.rms_norm_eps)
            q, k, v = linear(h, lw["qkv"]).split([q_size, kv_size, kv_size], dim=-1)
            q = apply_rope(q.view(n, a.num_heads, a.head_dim), cos, sin)  # [N, Hq, D]
            k = apply_rope(k.view(n, a.num_kv_heads, a.head_dim), cos, sin)  # [N, Hkv, D]
            v = v.view(n, a.num_kv_heads, a.head_dim)  # [N, Hkv, D]
            cache.write_tokens(i, batch.token_slots, batch.positions, k, v)
            attn = grouped_attention(q, cache, i, groups, self.scale)  # [N, Hq, D]
            x = x + linear(attn.reshape(n, q_size), lw["o"])
            h = rms_norm(x, lw["post_norm"], a.rms_norm_eps)
            gate, up = linear(h, lw["gate_up"]).chunk(2, dim=-1)
            x = x + linear(F.silu(gate) * up, lw["down"])
        states[a.num_layers] = x  # the last layer's output (before the final norm)
        captured = torch.stack([states[c] for c in capture_layers], dim=-2)  # [N, C, H]
        sel = x if batch.logit_index.shape[0] == n else x[batch.logit_index]  # [M, H]
        final = rms_norm(sel, self.w.norm, a.rms_norm_eps)
        logits = linear(final.float(), self.w.lm_head)  # [M, V] float32
        return logits, captured


@dataclass
class AttentionGroup:
    """Rows of a step whose queries are padded together to `width` for attention."""

    rows: list[int]
    width: int
    slots: torch.Tensor  # [G] int64
    slot_range: tuple[int, int] | None  # contiguous slots [lo, hi): cache views instead of gathers
    key_len: int  # keys attended: max(start + count) over the group
    mask: torch.Tensor | None  # [G, 1, width, key_len] bool; None when causal or a same-start decode
    is_causal: bool
    token_range: tuple[int, int] | None  # the group's tokens are flat [lo, hi) with every row `width` long
    gather: torch.Tensor | None  # [G * width] flat token index of each padded query (padding: the row's first)
    valid: torch.Tensor | None  # [G * width] bool real queries


SMALL_ROW = SMALL_QUERY  # rows up to this many tokens (decode, verification) share one attention group


def attention_groups(batch: StepBatch, cache: KVCache) -> list[AttentionGroup]:
    """Split a step's rows into attention groups (short rows, long rows), computed once per step."""
    short = [r for r, row in enumerate(batch.rows) if row.num_tokens <= SMALL_ROW]
    long = [r for r, row in enumerate(batch.rows) if row.num_tokens > SMALL_ROW]
    return [_group(batch, cache, rows, batch.host_cu_seqlens) for rows in (short, long) if rows]


def _group(batch: StepBatch, cache: KVCache, rows: list[int], offsets: tuple[int, ...]) -> AttentionGroup:
    dev = batch.token_ids.device
    plan = [batch.rows[r] for r in rows]
    counts = [p.num_tokens for p in plan]
    starts = [p.start for p in plan]
    width = max(counts)
    key_len = max(s + c for s, c in zip(starts, counts, strict=True))
    if key_len > cache.max_seq_len:
        raise ValueError(f"sequence would exceed max_seq_len={cache.max_seq_len}")
    slot_list = [p.slot for p in plan]
    lo = slot_list[0]
    contiguous = slot_list == list(range(lo, lo + len(slot_list)))
    same_start = all(s == starts[0] for s in starts)
    is_causal = same_start and starts[0] == 0 and width > 1
    mask = None
    if not is_causal and not (same_start and width == 1):
        start_t = torch.tensor(starts, dtype=torch.long, device=dev)  # [G]
        key_pos = torch.arange(key_len, device=dev)  # [L]
        query_pos = start_t[:, None] + torch.arange(width, device=dev)[None, :]  # [G, width]
        mask = (key_pos[None, None, :] <= query_pos[:, :, None])[:, None]  # [G, 1, width, L]
    uniform = all(c == width for c in counts) and rows == list(range(rows[0], rows[0] + len(rows)))
    token_range = (offsets[rows[0]], offsets[rows[-1] + 1]) if uniform else None
    gather = valid = None
    if not uniform:
        index: list[int] = []
        real: list[bool] = []
        for r, c in zip(rows, counts, strict=True):
            index.extend(offsets[r] + min(t, c - 1) for t in range(width))
            real.extend(t < c for t in range(width))
        gather = torch.tensor(index, dtype=torch.long, device=dev)
        valid = torch.tensor(real, dtype=torch.bool, device=dev)
    return AttentionGroup(rows, width, torch.tensor(slot_list, dtype=torch.long, device=dev),
                          (lo, lo + len(slot_list)) if contiguous else None, key_len, mask, is_causal,
                          token_range, gather, valid)


def grouped_attention(q: torch.Tensor, cache: KVCache, layer: int, groups: list[AttentionGroup],
                      scale: float) -> torch.Tensor:
    """q [N, Hq, D] (flat) -> attention output [N, Hq, D], each group attending to its slots' cached keys."""
    n, hq, d = q.shape
    out = q.new_empty((n, hq, d)) if len(groups) > 1 or groups[0].token_range != (0, n) else None
    for g in groups:
        b = len(g.rows)
        if g.token_range is not None:
            lo, hi = g.token_range
            qg = q[lo:hi]  # [G*width, Hq, D]
        else:
            qg = q[g.gather]
        qg = qg.view(b, g.width, hq, d).transpose(1, 2)  # [G, Hq, width, D]
        k_all, v_all = cache.read(layer, g.slots, g.slot_range, g.key_len)  # [G, Hkv, L, D]
        o = attention(qg, k_all, v_all, g.mask, g.is_causal, scale)  # [G, Hq, width, D]
        o = o.transpose(1, 2).reshape(b * g.width, hq, d)
        if out is None:
            return o
        if g.token_range is not None:
            out[g.token_range[0]:g.token_range[1]] = o
        else:
            assert g.gather is not None and g.valid is not None  # a group without a token range has its gather
            out[g.gather[g.valid]] = o[g.valid]
    assert out is not None
    return out
