"""EAGLE-3 draft head.

features of 3 capture layers --[per-layer RMSNorm]--concat--> FC (3H -> H) --+
                                                        |--> one decoder layer
token embedding (target's, frozen) ---------------------+    (attention input [norm(embed(token)); norm(feature)], 2H)
                                                             --> final norm --> LM head over the reduced draft vocab

Entry p of a sequence combines the feature of position p (target capture states, or the draft's own output
hidden for chained steps) with the embedding of token p+1 and predicts token p+2.

`capture_norm` (config, default off): each capture layer's state is RMS-normalised with its own learned weight
([C, H], `capture_norm_weight`) before the FC — SmolLM2's capture states carry outlier dimensions (layer 27 dim
17: RMS 387) that otherwise dominate the FC's input. It lives in `fuse`, the one function training
(`ttt_forward`) and serving (`Drafter` -> `fuse` -> `step`) both call, and the flag + weight travel in the
checkpoint (architecture + weights).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tide_trt.engine.kv_cache import KVCache
from tide_trt.models.llama import apply_rope, attention, rms_norm, rope_tables


@dataclass(frozen=True)
class Eagle3Config:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    target_vocab_size: int
    draft_vocab_size: int
    capture_layers: tuple[int, ...]
    model_fingerprint: str
    max_position: int = 8192
    capture_norm: bool = False  # per-capture-layer RMSNorm before the FC (checkpoints without it: off)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["capture_layers"] = list(self.capture_layers)
        return d

    @staticmethod
    def from_dict(d: dict) -> Eagle3Config:
        d = dict(d)
        d["capture_layers"] = tuple(d["capture_layers"])
        return Eagle3Config(**d)


class Eagle3Head(nn.Module):
    d2t: torch.Tensor  # [Vd] buffer: draft id -> target id
    cos: torch.Tensor  # RoPE tables (non-persistent buffers)
    sin: torch.Tensor
    embed: torch.Tensor | None  # None only while a copy is made without the shared target embeddings

    def __init__(self, cfg: Eagle3Config, embed: torch.Tensor):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.fc = nn.Linear(len(cfg.capture_layers) * h, h, bias=False)
        if cfg.capture_norm:
            self.capture_norm_weight = nn.Parameter(torch.ones(len(cfg.capture_layers), h))  # [C, H]
        self.norm_embed = nn.Parameter(torch.ones(h))
        self.norm_hidden = nn.Parameter(torch.ones(h))
        self.qkv = nn.Linear(2 * h, (cfg.num_heads + 2 * cfg.num_kv_heads) * d, bias=False)
        self.o = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.post_norm = nn.Parameter(torch.ones(h))
        self.gate_up = nn.Linear(h, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, h, bias=False)
        self.final_norm = nn.Parameter(torch.ones(h))
        self.lm_head = nn.Linear(h, cfg.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.arange(cfg.draft_vocab_size, dtype=torch.long))  # [Vd] draft -> target id
        self.embed = embed  # [V, H] target embeddings: frozen, shared, not a parameter, never saved
        cos, sin = rope_tables(d, cfg.max_position, cfg.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    # ---- shared pieces ------------------------------------------------------------------------------------
    def fuse(self, captured: torch.Tensor) -> torch.Tensor:
        """captured [..., C, H] -> feature [..., H] (per-layer RMSNorm first when `cfg.capture_norm`)."""
        x = captured.to(self.final_norm.dtype)  # the activation dtype
        if self.cfg.capture_norm:
            xf = x.float()  # RMSNorm per layer in float32 (F.rms_norm takes no [C, H] weight)
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)
            x = (xf * self.capture_norm_weight.float()).to(x.dtype)  # [..., C, H]
        flat = x.reshape(*captured.shape[:-2], -1)
        return self.fc(flat)

    def _embed_normed(self, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        assert self.embed is not None, "the head has no target embeddings attached"
        emb = F.embedding(tokens, self.embed).to(dtype)  # [B, T, H]
        return rms_norm(emb, self.norm_embed, self.cfg.rms_norm_eps)

    def _attn_input(self, feature: torch.Tensor, tokens: torch.Tensor,
                    emb_normed: torch.Tensor | None = None) -> torch.Tensor:
        if emb_normed is None:
            emb_normed = self._embed_normed(tokens, feature.dtype)
        return torch.cat([emb_normed.to(feature.dtype), rms_norm(feature, self.norm_hidden, self.cfg.rms_norm_eps)],
                         dim=-1)  # [B, T, 2H]

    def _qkv(self, x2: torch.Tensor, positions: torch.Tensor, rope: tuple | None = None):
        c = self.cfg
        b, t, _ = x2.shape
        q, k, v = self.qkv(x2).split([c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim,
                                       c.num_kv_heads * c.head_dim], dim=-1)
        if rope is None:
            rope = (self.cos[positions][:, None], self.sin[positions][:, None])  # [B, 1, T, D]
        cos, sin = rope[0].to(q.dtype), rope[1].to(q.dtype)
        q = apply_rope(q.view(b, t, c.num_heads, c.head_dim).transpose(1, 2), cos, sin)  # [B, Hq, T, D]
        k = apply_rope(k.view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2), cos, sin)  # [B, Hkv, T, D]
        v = v.view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        return q, k, v

    def _finish(self, feature: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual + MLP. feature [B, T, H], attn [B, Hq, T, D] -> draft hidden [B, T, H]."""
        b, _, t, _ = attn.shape
        x = feature + self.o(attn.transpose(1, 2).reshape(b, t, -1))
        gate, up = self.gate_up(rms_norm(x, self.post_norm, self.cfg.rms_norm_eps)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """draft hidden [..., H] -> draft-vocab logits [..., Vd] float32."""
        return self.lm_head(rms_norm(hidden, self.final_norm, self.cfg.rms_norm_eps)).float()

    # ---- serving: one chained step over a KV cache -----------------------------------------------------------
    @torch.inference_mode()
    def step(self, cache: KVCache, slots: torch.Tensor, feature: torch.Tensor, tokens: torch.Tensor,
             starts: torch.Tensor, last_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feature [B, T, H], tokens [B, T] (token p+1 of each entry), starts [B]; returns the draft hidden and
        logits at last_index [B] : ([B, H], [B, Vd])."""
        positions = starts[:, None] + torch.arange(tokens.shape[1], device=tokens.device)[None, :]
        q, k, v = self._qkv(self._attn_input(feature, tokens), positions)
        layout = cache.layout(slots, starts, tokens.shape[1])
        k_all, v_all = cache.write_and_read(0, layout, k, v)
        attn = attention(q, k_all, v_all, layout.mask, layout.is_causal, 1.0 / math.sqrt(self.cfg.head_dim))
        hidden = self._finish(feature, attn)  # [B, T, H]
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index]  # [B, H]
        return last, self.logits(last)

    @torch.inference_mode()
    def greedy_chain(self, cache: KVCache, slots: torch.Tensor, hidden: torch.Tensor, logits: torch.Tensor,
                     positions: torch.Tensor, steps: int) -> torch.Tensor:
        """The greedy chain at fixed shapes, without host synchronisation (what a CUDA graph captures): from the
        catch-up's draft hidden [B, H] and logits [B, Vd], draft `steps` target-vocabulary tokens [B, steps],
        writing chained entries at positions [B], +1 per step. Each entry attends to its slot's whole cache range
        [0, L) under a mask, so shapes never depend on the positions."""
        c = self.cfg
        key_pos = torch.arange(cache.max_seq_len, device=hidden.device)  # [L]
        scale = 1.0 / math.sqrt(c.head_dim)
        out = []
        for j in range(steps):
            ids = self.d2t[logits.argmax(-1)]  # [B] target ids
            out.append(ids)
            if j == steps - 1:
                break
            feature = hidden[:, None]  # [B, 1, H]
            q, k, v = self._qkv(self._attn_input(feature, ids[:, None]), positions[:, None])  # [B, H*, 1, D]
            cache.write_tokens(0, slots, positions, k[:, :, 0], v[:, :, 0])
            mask = (key_pos[None, :] <= positions[:, None])[:, None, None, :]  # [B, 1, 1, L]
            attn = attention(q, cache.k[0][slots], cache.v[0][slots], mask, False, scale)  # [B, Hq, 1, D]
            hidden = self._finish(feature, attn)[:, 0]  # [B, H]
            logits = self.logits(hidden)
            positions = positions + 1
        return torch.stack(out, dim=1)  # [B, steps]

    # ---- training: training-time test (unrolled chain) ---------------------------------------------------
    def ttt_forward(self, captured: torch.Tensor, next_tokens: torch.Tensor, num_steps: int,
                    return_hidden: bool = False) -> list[torch.Tensor]:
        """captured [B, T, C, H] target states at positions 0..T-1, next_tokens [B, T] token p+1 of entry p.

        Step 0 uses target features; step j >= 1 feeds each position the draft's own step-(j-1) output of the
        previous position, and attends to true entries <= q-j plus its own chain (the diagonal), exactly the
        view the serving chain has after j drafted tokens. Returns per-step draft-vocab logits [B, T, Vd]
        (entry q of step j predicts token q+2; rows q < j are invalid and must be masked by the caller).
        With return_hidden, per-step draft hidden states [B, T, H] instead, so a loss can run the LM head
        (the dominant cost) on the labelled rows only.
        """
        c = self.cfg
        b, t = next_tokens.shape
        positions = torch.arange(t, device=next_tokens.device)[None, :].expand(b, -1)
        scale = 1.0 / math.sqrt(c.head_dim)
        rep = c.num_heads // c.num_kv_heads
        feature = self.fuse(captured)  # [B, T, H]
        emb_normed = self._embed_normed(next_tokens, feature.dtype)  # [B, T, H], same for every step
        rope = (self.cos[positions][:, None], self.sin[positions][:, None])  # [B, 1, T, D]
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        outputs = []
        for j in range(num_steps):
            q, k, v = self._qkv(self._attn_input(feature, next_tokens, emb_normed), positions, rope)
            k = k.repeat_interleave(rep, dim=1)  # [B, Hq, T, D]
            v = v.repeat_interleave(rep, dim=1)
            keys.append(k)
            values.append(v)
            # true (step-0) keys at positions <= q - j
            scores0 = torch.matmul(q, keys[0].transpose(-1, -2)) * scale  # [B, Hq, T, T]
            causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril(-j)
            scores0 = scores0.masked_fill(~causal, float("-inf"))
            diag_scores = []
            diag_values = []
            for i in range(1, j + 1):  # chain entry of step i sits at position q - j + i
                shift = j - i
                ki = torch.roll(keys[i], shifts=shift, dims=2)
                vi = torch.roll(values[i], shifts=shift, dims=2)
                diag_scores.append((q * ki).sum(-1, keepdim=True) * scale)  # [B, Hq, T, 1]
                diag_values.append(vi)
            all_scores = torch.cat([scores0, *diag_scores], dim=-1) if diag_scores else scores0  # [B, Hq, T, T+j]
            probs = torch.softmax(all_scores.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
            attn = torch.matmul(probs[..., :t], values[0])  # [B, Hq, T, D]
            for i, vi in enumerate(diag_values):
                attn = attn + probs[..., t + i: t + i + 1] * vi
            hidden = self._finish(feature, attn)  # [B, T, H]
            outputs.append(hidden if return_hidden else self.logits(hidden))
            # the next step sees, at position q, this step's output at q-1
            feature = torch.cat([hidden[:, :1] * 0, hidden[:, :-1]], dim=1)
        return outputs
