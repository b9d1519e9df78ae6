"""The TargetEngine interface every backend implements (torch reference, TensorRT-LLM).

A target engine owns the target weights and a slot-based KV cache. One `forward` call appends new tokens to
each listed slot and returns logits plus the EAGLE-3 capture-layer hidden states of every new token — the
signal TIDE trains on, produced while serving with no second pass of the target.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

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
    native_linears: bool = False  # bf16 weights with float32 activations in the native CPU kernel

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

    @abstractmethod
    def forward(self, slots: list[int], tokens: list[list[int]], logits: str = "last") -> ForwardOutput:
        """Append tokens[i] to slots[i] (ragged lengths allowed) and advance their lengths.

        logits: "last" -> logits of each sequence's last new token ([B, 1, V]); "all" -> [B, T, V] (rows
        padded past each sequence's length). hidden is always [B, T, C, H] (padded likewise).
        """

    @abstractmethod
    def embedding_weight(self) -> torch.Tensor:
        """Target token embeddings [V, H] (shared, frozen, by the draft)."""

    @abstractmethod
    def lm_head_weight(self) -> torch.Tensor:
        """Target LM head [V, H] (used to initialise a draft's reduced head)."""

    @abstractmethod
    def target_parameters(self) -> list[torch.Tensor]:
        """Every target weight tensor (refit must never touch these)."""
