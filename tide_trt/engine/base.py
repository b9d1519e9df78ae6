"""The TargetEngine interface every backend implements (torch reference, TensorRT-LLM).

A target engine owns the target weights and a slot-based KV cache. One `forward` call appends new tokens to
each listed slot and returns logits plus the EAGLE-3 capture-layer hidden states of every new token — the
signal TIDE trains on, produced while serving with no second pass of the target.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tide_trt.engine.step_batch import StepBatch, StepOutput, StepRow, pad_rows

if TYPE_CHECKING:
    from tide_trt.models.llama import LlamaArch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    fingerprint: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    capture_layers: tuple[int, ...]
    eos_token_ids: tuple[int, ...]
    max_seq_len: int
    max_batch_size: int
    dtype: str  # the weights' dtype
    device: str
    native_linears: bool = False  # float32 activations with bf16 or GGUF-block weights in a native CPU kernel
    weights: str = "bf16"  # linear weight format: bf16 (`dtype`), q4_1 or q8_0 (GGUF blocks; engine.weights)

    @classmethod
    def from_arch(cls, arch: LlamaArch, *, name: str, fingerprint: str, capture_layers: tuple[int, ...],
                  max_seq_len: int, max_batch_size: int, dtype: str, device: str,
                  native_linears: bool = False, weights: str = "bf16") -> ModelInfo:
        """The ModelInfo of a Llama architecture served with these engine settings (every backend, the trainer)."""
        return cls(name=name, fingerprint=fingerprint, vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
                   num_layers=arch.num_layers, num_heads=arch.num_heads, num_kv_heads=arch.num_kv_heads,
                   head_dim=arch.head_dim, intermediate_size=arch.intermediate_size, rms_norm_eps=arch.rms_norm_eps,
                   rope_theta=arch.rope_theta, capture_layers=tuple(capture_layers),
                   eos_token_ids=tuple(arch.eos_token_ids), max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                   dtype=dtype, device=device, native_linears=native_linears, weights=weights)

    @property
    def activation_dtype(self) -> torch.dtype:
        """dtype of hidden states, KV cache and the draft's activations."""
        return torch.float32 if self.native_linears else DTYPES[self.dtype]


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [B, K, V] float32 (K = 1 for "last", T for "all")
    hidden: torch.Tensor  # [B, T, C, H] capture-layer states of every new token (C = len(capture_layers))


def default_capture_layers(num_layers: int) -> tuple[int, ...]:
    """EAGLE-3's low / middle / high layers: [2, L//2, L-3]."""
    return (2, num_layers // 2, num_layers - 3)


class TargetEngine(ABC):
    """Slot-based target model with hidden-state capture."""

    info: ModelInfo
    tokenizer: object

    @abstractmethod
    def allocate_slot(self) -> int: ...

    @abstractmethod
    def free_slot(self, slot: int) -> None: ...

    @property
    @abstractmethod
    def num_free_slots(self) -> int: ...

    supports_compaction = False  # backends that implement move_slot set this

    def move_slot(self, src: int, dst: int) -> None:
        """Move a live sequence to a free slot (optional; see supports_compaction)."""
        raise NotImplementedError

    @abstractmethod
    def seq_len(self, slot: int) -> int: ...

    @abstractmethod
    def truncate(self, slot: int, length: int) -> None:
        """Roll back a slot to `length` cached tokens (rejected drafts); no copy."""

    @property
    def uses_cuda_graphs(self) -> bool:
        """Steps replay CUDA graphs (the drafter then replays its greedy chains too)."""
        return False

    @property
    def max_num_tokens(self) -> int:
        """Most tokens one step may carry (decode/verification tokens plus prompt chunks); the step loop never
        exceeds it."""
        return 1 << 30

    def forward_step(self, batch: StepBatch) -> StepOutput:
        """Run one flat step: append each row's tokens to its slot (rows start at the slot's current length) and
        advance the lengths. Returns logits at batch.logit_index and the capture states of every new token.

        Backends implement this (the torch engine does); a backend that implements only the padded `forward` gets
        this adapter, which computes every token's logits and keeps the requested ones."""
        if type(self).forward is TargetEngine.forward:
            raise NotImplementedError(f"{type(self).__name__} implements neither forward_step nor forward")
        counts = batch.counts
        out = self.forward([r.slot for r in batch.rows], batch.host_tokens(), logits="all")
        hidden = torch.cat([out.hidden[b, :n] for b, n in enumerate(counts)])  # [N, C, H]
        logits = torch.cat([out.logits[b, n - r.logit_count:n] for b, (n, r) in enumerate(zip(counts, batch.rows,
                                                                                            strict=True))])
        return StepOutput(logits, hidden)  # logits [M, V]

    def forward(self, slots: list[int], tokens: list[list[int]], logits: str = "last") -> ForwardOutput:
        """Padded convenience over `forward_step` (bulk prefill, tools): append tokens[i] to slots[i].

        logits: "last" -> logits of each sequence's last new token ([B, 1, V]); "all" -> [B, T, V] (rows
        padded past each sequence's length with zeros). hidden is always [B, T, C, H] (padded likewise).
        """
        if logits not in ("last", "all"):
            raise ValueError(f"logits must be 'last' or 'all', got {logits!r}")
        counts = [len(t) for t in tokens]
        if not slots or len(slots) != len(tokens) or min(counts) < 1:
            raise ValueError("forward needs one non-empty token list per slot")
        rows = [StepRow(s, self.seq_len(s), tuple(t), num_logits=-1 if logits == "all" else 1)
                for s, t in zip(slots, tokens, strict=True)]
        out = self.forward_step(StepBatch.build(rows, self.info.device))
        hidden = pad_rows(out.hidden, counts)  # [B, T, C, H]
        if logits == "last":
            return ForwardOutput(out.logits[:, None], hidden)  # [B, 1, V]
        return ForwardOutput(pad_rows(out.logits, counts), hidden)  # [B, T, V]

    @abstractmethod
    def embedding_weight(self) -> torch.Tensor:
        """Target token embeddings [V, H] (shared, frozen, by the draft)."""

    @abstractmethod
    def lm_head_weight(self) -> torch.Tensor:
        """Target LM head [V, H] (used to initialise a draft's reduced head)."""

    @abstractmethod
    def target_parameters(self) -> list[torch.Tensor]:
        """Every target weight tensor (refit must never touch these)."""
