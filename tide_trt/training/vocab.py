"""Reduced draft vocabulary: the most frequent target tokens in the training data."""

from __future__ import annotations

import torch


def build_draft_vocab(token_counts: torch.Tensor, draft_vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """token_counts [V] -> (d2t [Vd] target ids sorted ascending, t2d [V] draft id or -1)."""
    v = token_counts.numel()
    size = min(draft_vocab_size, v)
    top = torch.topk(token_counts.float() + 1e-3 * torch.arange(v, 0, -1).float() / v, size).indices
    d2t = torch.sort(top).values.long()  # [Vd]
    t2d = torch.full((v,), -1, dtype=torch.long)
    t2d[d2t] = torch.arange(size)
    return d2t, t2d


def t2d_from_d2t(d2t: torch.Tensor, vocab_size: int) -> torch.Tensor:
    t2d = torch.full((vocab_size,), -1, dtype=torch.long)
    t2d[d2t] = torch.arange(d2t.numel())
    return t2d
