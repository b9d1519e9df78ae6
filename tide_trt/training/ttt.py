"""Training-time-test objective and simulated-drafting evaluation over stored capture states."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tide_trt.draft.eagle3 import Eagle3Head


@dataclass
class Batch:
    hidden: torch.Tensor  # [B, T, C, H] capture states of positions 0..T-1
    tokens: torch.Tensor  # [B, T] token at each position
    labels: torch.Tensor  # [B, T] target-vocabulary id the target predicts AFTER position t (-1: unknown)
    lengths: torch.Tensor  # [B] valid positions


def collate(examples: list[tuple[torch.Tensor, list[int], list[int]]]) -> Batch:
    """examples: (hidden [T, C, H], tokens [T], labels [T]) -> padded Batch."""
    t_max = max(len(e[1]) for e in examples)
    c_h = examples[0][0].shape[1:]
    b = len(examples)
    hidden = torch.zeros(b, t_max, *c_h, dtype=examples[0][0].dtype)
    tokens = torch.zeros(b, t_max, dtype=torch.long)
    labels = torch.full((b, t_max), -1, dtype=torch.long)
    for i, (h, tok, lab) in enumerate(examples):
        n = len(tok)
        hidden[i, :n] = h
        tokens[i, :n] = torch.tensor(tok)
        labels[i, :n] = torch.tensor(lab)
    return Batch(hidden, tokens, labels, torch.tensor([len(e[1]) for e in examples]))


def _targets(batch: Batch, t2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry q (feature q, token q+1) predicts the target's token after position q+1."""
    next_tokens = torch.cat([batch.tokens[:, 1:], torch.zeros_like(batch.tokens[:, :1])], dim=1)  # [B, T]
    lab_next = torch.cat([batch.labels[:, 1:], torch.full_like(batch.labels[:, :1], -1)], dim=1)  # [B, T]
    draft_lab = torch.where(lab_next >= 0, t2d[lab_next.clamp(min=0)], torch.full_like(lab_next, -1))
    pos = torch.arange(batch.tokens.shape[1], device=batch.tokens.device)[None, :]
    valid = (pos + 1 < batch.lengths[:, None]) & (draft_lab >= 0)  # [B, T]
    return next_tokens, torch.where(valid, draft_lab, torch.full_like(draft_lab, -1))


def ttt_loss(head: Eagle3Head, batch: Batch, t2d: torch.Tensor, num_steps: int, decay: float = 0.8,
             with_accuracy: bool = True) -> tuple[torch.Tensor, list[float]]:
    """Weighted cross-entropy over the unrolled steps; returns (loss, per-step top-1 accuracy — empty unless
    `with_accuracy`). Runs on the batch's device; the LM head (the dominant cost) runs on labelled rows only."""
    next_tokens, labels = _targets(batch, t2d)
    hiddens = head.ttt_forward(batch.hidden, next_tokens, num_steps, return_hidden=True)
    total = torch.zeros((), device=batch.hidden.device)
    accs = []
    for j, hidden in enumerate(hiddens):
        lab = labels.clone()
        lab[:, :j] = -1  # rows q < j have no valid chain
        valid = lab >= 0  # [B, T]
        n_valid = int(valid.sum())
        if n_valid == 0:
            if with_accuracy:
                accs.append(0.0)
            continue
        logits = head.logits(hidden[valid])  # [n_valid, Vd]: the LM head only where there is a label
        target = lab[valid]  # [n_valid]
        total = total + (decay ** j) * F.cross_entropy(logits.float(), target)
        if with_accuracy:  # an argmax over [n_valid, Vd]: ~6 % of a CPU training step
            with torch.no_grad():
                accs.append(float((logits.argmax(-1) == target).sum()) / n_valid)
    return total, accs


@torch.no_grad()
def simulated_acceptance(head: Eagle3Head, batch: Batch, t2d: torch.Tensor, gamma: int) -> dict[str, float]:
    """Greedy chain drafting replayed over stored states: for each base position, count how many of the γ
    chained drafts match the target before the first miss. Returns acceptance rate α (accepted / drafted),
    τ (1 + mean accepted, bonus included) and the number of chains."""
    next_tokens, labels = _targets(batch, t2d)
    outs = head.ttt_forward(batch.hidden, next_tokens, gamma)
    b, t = labels.shape
    alive = torch.ones(b, t, dtype=torch.bool)
    accepted = torch.zeros(b, t)
    for j, logits in enumerate(outs):
        # chain based at q: its step-j prediction sits at row q + j
        pred = logits.argmax(-1)  # [B, T]
        ok = (pred == labels) & (labels >= 0)
        ok_base = torch.zeros_like(alive)
        ok_base[:, : t - j] = ok[:, j:]
        alive = alive & ok_base
        accepted += alive.float()
    base_valid = labels >= 0  # the chain's first prediction has a known target token (response positions)
    for i, n in enumerate(batch.lengths.tolist()):
        base_valid[i, max(0, n - 1 - gamma):] = False
    n_chains = int(base_valid.sum())
    if n_chains == 0:
        return {"alpha": 0.0, "tau": 1.0, "chains": 0}
    acc = accepted[base_valid]
    return {"alpha": float(acc.sum() / (n_chains * gamma)), "tau": float(1 + acc.mean()), "chains": n_chains}
