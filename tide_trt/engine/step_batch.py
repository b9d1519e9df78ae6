"""One engine step as a flat batch: every new token of every row in one tensor.

A step carries rows of three kinds in one target forward: plain decode rows (the pending token, γᵢ = 0),
verification rows (the pending token and γᵢ drafts) and prompt chunks (a slice of a prompt that is being prefilled,
possibly across several steps under the engine's token budget). The scheduler-facing side plans rows on the host
(`StepRow`); `StepBatch.build` turns them into device tensors once per step, and both backends, the verification and
the commit read the same batch.

Logits are computed only where they are used: for every token of a decode/verification row (γᵢ + 1 rows of target
distributions) and for the last token of a prompt chunk that completes its prompt (the first output token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepRow:
    """One sequence's part of a step (host side)."""

    slot: int
    start: int  # cached tokens of the slot before this step = position of tokens[0]
    tokens: tuple[int, ...]  # the new tokens: [pending, d_1 .. d_γ] or a prompt chunk
    gamma: int = 0  # draft tokens at the end of `tokens` (verification rows)
    is_prompt: bool = False  # a prompt chunk
    num_logits: int = -1  # logits for the last num_logits tokens (-1: all; 0: none; 1: the last one)

    def __post_init__(self) -> None:
        if not self.tokens:
            raise ValueError("a step row needs at least one token")
        if not 0 <= self.gamma < len(self.tokens):
            raise ValueError(f"gamma {self.gamma} does not fit a row of {len(self.tokens)} tokens")

    @property
    def logit_count(self) -> int:
        return len(self.tokens) if self.num_logits < 0 else min(self.num_logits, len(self.tokens))


@dataclass
class StepBatch:
    """Flat, device-resident description of one step (N tokens in R rows, M of them with logits)."""

    token_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64 position of each token in its sequence
    token_slots: torch.Tensor  # [N] int64 KV slot of each token
    cu_seqlens: torch.Tensor  # [R + 1] int64 row r owns tokens cu_seqlens[r]:cu_seqlens[r+1]
    slots: torch.Tensor  # [R] int64
    starts: torch.Tensor  # [R] int64 cached length of each row before the step
    gammas: torch.Tensor  # [R] int64 draft length per row (0: plain decode or prompt chunk)
    is_prompt: torch.Tensor  # [R] bool
    logit_index: torch.Tensor  # [M] int64 flat token indices whose logits are computed
    logit_cu: torch.Tensor  # [R + 1] int64 row r owns logits logit_cu[r]:logit_cu[r+1]
    rows: tuple[StepRow, ...]  # the host plan (bookkeeping only; compute reads the tensors)
    host_cu_seqlens: tuple[int, ...]  # [R + 1] host copies of cu_seqlens / logit_cu (no device sync to read them)
    host_logit_cu: tuple[int, ...]

    @classmethod
    def build(cls, rows: Sequence[StepRow], device: str | torch.device = "cpu") -> StepBatch:
        if not rows:
            raise ValueError("a step needs at least one row")
        slots = [r.slot for r in rows]
        if len(set(slots)) != len(slots):
            raise ValueError("a slot appears twice in one step")
        counts = [len(r.tokens) for r in rows]
        token_ids: list[int] = []
        positions: list[int] = []
        token_slots: list[int] = []
        logit_index: list[int] = []
        cu, lcu, offset = [0], [0], 0
        for r, n in zip(rows, counts, strict=True):
            token_ids.extend(r.tokens)
            positions.extend(range(r.start, r.start + n))
            token_slots.extend([r.slot] * n)
            k = r.logit_count
            logit_index.extend(range(offset + n - k, offset + n))
            offset += n
            cu.append(offset)
            lcu.append(lcu[-1] + k)

        def t(values: list[int], dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            token_ids=t(token_ids), positions=t(positions), token_slots=t(token_slots), cu_seqlens=t(cu),
            slots=t(slots), starts=t([r.start for r in rows]), gammas=t([r.gamma for r in rows]),
            is_prompt=t([r.is_prompt for r in rows], torch.bool), logit_index=t(logit_index), logit_cu=t(lcu),
            rows=tuple(rows), host_cu_seqlens=tuple(cu), host_logit_cu=tuple(lcu),
        )

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def counts(self) -> list[int]:
        return [len(r.tokens) for r in self.rows]

    def logit_offsets(self) -> list[int]:
        """Host copy of logit_cu."""
        return list(self.host_logit_cu)


@dataclass
class StepOutput:
    logits: torch.Tensor  # [M, V] float32 at batch.logit_index
    hidden: torch.Tensor  # [N, C, H] capture-layer states of every new token


def pad_rows(flat: torch.Tensor, counts: Sequence[int], width: int | None = None) -> torch.Tensor:
    """Flat [sum(counts), *F] -> right-padded [R, width, *F] (zeros at padded positions)."""
    width = max(counts) if width is None else width
    out = flat.new_zeros((len(counts), width, *flat.shape[1:]))
    if all(n == width for n in counts):
        return flat.reshape(len(counts), width, *flat.shape[1:])
    offset = 0
    for r, n in enumerate(counts):
        out[r, :n] = flat[offset:offset + n]
        offset += n
    return out
