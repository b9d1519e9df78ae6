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
    tokens: tuple[int, ...]  # the row's host tokens: [pending] of a decode/verification row, or a prompt chunk
    gamma: int = 0  # draft tokens after `tokens` (verification rows), taken from the step's draft tensor
    is_prompt: bool = False  # a prompt chunk
    num_logits: int = -1  # logits for the last num_logits tokens (-1: all; 0: none; 1: the last one)

    def __post_init__(self) -> None:
        if not self.tokens:
            raise ValueError("a step row needs at least one token")
        if self.gamma < 0 or (self.gamma and self.is_prompt):
            raise ValueError(f"gamma {self.gamma}: only decode rows carry drafts (gamma >= 0)")

    @property
    def num_tokens(self) -> int:
        return len(self.tokens) + self.gamma

    @property
    def logit_count(self) -> int:
        n = self.num_tokens
        return n if self.num_logits < 0 else min(self.num_logits, n)


@dataclass
class StepBatch:
    """Flat, device-resident description of one step (N tokens in R rows, M of them with logits).

    Built once per step from the host plan in one host→device copy; the drafts of verification rows are written
    into `token_ids` on the device from the proposal's [R, γmax] draft tensor (they never visit the host)."""

    token_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64 position of each token in its sequence
    token_slots: torch.Tensor  # [N] int64 KV slot of each token
    logit_index: torch.Tensor  # [M] int64 flat token indices whose logits are computed
    logit_row: torch.Tensor  # [M] int64 row of each logit
    logit_cu: torch.Tensor  # [R + 1] int64 row r owns logits logit_cu[r]:logit_cu[r+1]
    is_draft: torch.Tensor  # [M] bool the token after this logit's is a draft of the same row (verification)
    rows: tuple[StepRow, ...]  # the host plan (bookkeeping only; compute reads the tensors)
    host_cu_seqlens: tuple[int, ...]  # [R + 1] row r owns tokens host_cu_seqlens[r]:host_cu_seqlens[r+1]
    host_logit_cu: tuple[int, ...]  # [R + 1] host copy of logit_cu

    @classmethod
    def build(cls, rows: Sequence[StepRow], device: str | torch.device = "cpu",
              drafts: torch.Tensor | None = None) -> StepBatch:
        """drafts [R', γmax] int64 on `device`: row r's drafts are drafts[r, :rows[r].gamma] (rows with drafts come
        first, in the proposal's row order); None when no row drafts."""
        if not rows:
            raise ValueError("a step needs at least one row")
        slots = [r.slot for r in rows]
        if len(set(slots)) != len(slots):
            raise ValueError("a slot appears twice in one step")
        token_ids: list[int] = []
        positions: list[int] = []
        token_slots: list[int] = []
        logit_index: list[int] = []
        logit_row: list[int] = []
        is_draft: list[int] = []
        draft_dst: list[int] = []
        draft_src: list[int] = []
        width = 0 if drafts is None else drafts.shape[1]
        cu, lcu, offset = [0], [0], 0
        for i, r in enumerate(rows):
            n, g = r.num_tokens, r.gamma
            if g:
                if drafts is None:
                    raise ValueError("rows with gamma > 0 need the step's draft tensor")
                if g > width:
                    raise ValueError(f"row {i} has gamma {g} but the step's drafts are {width} wide")
                token_ids.extend(r.tokens)
                token_ids.extend([0] * g)  # written from `drafts` on the device below
                draft_dst.extend(range(offset + n - g, offset + n))
                draft_src.extend(range(i * width, i * width + g))
            else:
                token_ids.extend(r.tokens)
            positions.extend(range(r.start, r.start + n))
            token_slots.extend([r.slot] * n)
            k = r.logit_count
            logit_index.extend(range(offset + n - k, offset + n))
            logit_row.extend([i] * k)
            is_draft.extend([1] * min(g, k - 1) + [0] * (k - min(g, k - 1)) if k else [])
            offset += n
            cu.append(offset)
            lcu.append(lcu[-1] + k)
        sizes = [offset, offset, offset, len(logit_index), len(logit_index), len(lcu), len(is_draft), len(draft_dst),
                 len(draft_src)]
        flat = torch.tensor(token_ids + positions + token_slots + logit_index + logit_row + lcu + is_draft + draft_dst
                            + draft_src, dtype=torch.long).to(device, non_blocking=True)  # one host→device copy
        ids, pos, tok_slots, l_index, l_row, l_cu, draft_flag, dst, src = torch.split(flat, sizes)
        if draft_dst and drafts is not None:
            ids.index_copy_(0, dst, drafts.reshape(-1).index_select(0, src))
        return cls(token_ids=ids, positions=pos, token_slots=tok_slots, logit_index=l_index, logit_row=l_row,
                   logit_cu=l_cu, is_draft=draft_flag.bool(), rows=tuple(rows), host_cu_seqlens=tuple(cu),
                   host_logit_cu=tuple(lcu))

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def counts(self) -> list[int]:
        return [r.num_tokens for r in self.rows]

    def host_tokens(self) -> list[list[int]]:
        """Every row's tokens (drafts included) as host lists: one device→host copy, for backends that pack the
        step on the host (TensorRT-LLM) and the padded `forward` adapter; the torch engine never calls it."""
        flat = self.token_ids.tolist()
        cu = self.host_cu_seqlens
        return [flat[cu[r]:cu[r + 1]] for r in range(len(self.rows))]

    def draft_ids(self) -> torch.Tensor:
        """[M] the token each logit's prediction is judged against (its row's next token; meaningful where
        is_draft)."""
        n = self.token_ids.shape[0]
        return self.token_ids[(self.logit_index + 1).clamp(max=max(n - 1, 0))]


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
