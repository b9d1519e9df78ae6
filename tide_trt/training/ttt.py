"""Training-time-test objective and simulated-drafting evaluation over stored capture states."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tide_trt.draft.eagle3 import Eagle3Head
from tide_trt.online.perf_model import censored_trials


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


def _shifted(batch: Batch, t2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entry q (feature q, token q+1) predicts the target's token after position q+1. Returns next tokens [B, T],
    draft-vocabulary labels [B, T] (-1: no label, or the target token is outside the draft vocabulary) and
    known [B, T] (the target's label exists, inside the draft vocabulary or not)."""
    next_tokens = torch.cat([batch.tokens[:, 1:], torch.zeros_like(batch.tokens[:, :1])], dim=1)  # [B, T]
    lab_next = torch.cat([batch.labels[:, 1:], torch.full_like(batch.labels[:, :1], -1)], dim=1)  # [B, T]
    pos = torch.arange(batch.tokens.shape[1], device=batch.tokens.device)[None, :]
    known = (pos + 1 < batch.lengths[:, None]) & (lab_next >= 0)  # [B, T]
    draft_lab = torch.where(known, t2d[lab_next.clamp(min=0)], torch.full_like(lab_next, -1))  # [B, T]
    return next_tokens, draft_lab, known


def _targets(batch: Batch, t2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [B, T] and draft labels [B, T] (-1: nothing to learn at that entry)."""
    next_tokens, draft_lab, _ = _shifted(batch, t2d)
    return next_tokens, draft_lab


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


@dataclass(frozen=True)
class ChainAcceptance:
    """Counts of greedy γ-chains replayed over stored states (DESIGN §4 words):

    - ``alpha``: per-token acceptance α = Σk / Σ(k + [k<γ]), the censored-geometric estimate the serving side
      (controller, deploy gate) computes from its verification steps — comparable across γ;
    - ``accepted_per_drafted``: Σk / (chains·γ), what Triton's ``acceptance_rate`` reports (depends on γ);
    - ``tau``: τ = 1 + Σk / chains, output tokens per verification step (bonus/recovered included).
    """

    gamma: int
    chains: int = 0
    accepted: float = 0.0  # Σ k over chains
    trials: float = 0.0  # Σ (k + [k < γ])

    def __add__(self, other: ChainAcceptance) -> ChainAcceptance:
        return ChainAcceptance(self.gamma, self.chains + other.chains, self.accepted + other.accepted,
                               self.trials + other.trials)

    @property
    def alpha(self) -> float:
        return self.accepted / self.trials if self.trials else 0.0

    @property
    def accepted_per_drafted(self) -> float:
        return self.accepted / (self.chains * self.gamma) if self.chains else 0.0

    @property
    def tau(self) -> float:
        return 1.0 + self.accepted / self.chains if self.chains else 1.0

    def as_dict(self) -> dict[str, float]:
        """JSON form (manifests, round records)."""
        return {"alpha": self.alpha, "accepted_per_drafted": self.accepted_per_drafted, "tau": self.tau,
                "chains": self.chains, "accepted": self.accepted, "trials": self.trials, "gamma": self.gamma}


@torch.no_grad()
def simulated_acceptance(head: Eagle3Head, batch: Batch, t2d: torch.Tensor, gamma: int,
                         bases: torch.Tensor | None = None) -> ChainAcceptance:
    """Greedy chain drafting replayed over stored states: the one acceptance evaluator (online rounds, offline and
    corpus training all call it). A chain is based at every position q whose next target token is known (a label
    exists) and whose γ steps fit before the sequence ends (q < length − 1 − γ); it accepts drafts until the first
    one that differs from the target's label. Positions whose target token lies outside the draft vocabulary count
    — as a miss at step 0 — because serving drafts there too and the verifier rejects; positions without a label
    (prompt text when training on outputs only, padding) are not chain bases, and a chain step reaching one misses.
    `bases` [B, T] bool (optional): only these positions may be chain bases (e.g. where the head drafts beside a
    suffix index)."""
    next_tokens, labels, known = _shifted(batch, t2d)
    b, t = labels.shape
    alive = torch.ones(b, t, dtype=torch.bool, device=labels.device)
    accepted = torch.zeros(b, t, device=labels.device)
    for j, logits in enumerate(head.ttt_forward(batch.hidden, next_tokens, gamma)):
        ok = (logits.argmax(-1) == labels) & (labels >= 0)  # [B, T] step-j prediction of chain q sits at q+j
        ok_base = torch.zeros_like(alive)
        ok_base[:, : t - j] = ok[:, j:]
        alive &= ok_base
        accepted += alive.float()
    pos = torch.arange(t, device=labels.device)[None, :]
    base = known & (pos < batch.lengths[:, None] - 1 - gamma)  # [B, T]
    if bases is not None:
        base &= bases.to(base.device)
    k = accepted[base]
    return ChainAcceptance(gamma, int(base.sum()), float(k.sum()), float(censored_trials(k, gamma).sum()))
