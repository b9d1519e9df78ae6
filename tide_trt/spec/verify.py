"""Verification of one speculative step: greedy and lossless rejection sampling (Leviathan/Chen).

The verified chunk of a row is ``[last_committed_token, d_1 .. d_gamma]``; row i of the target output
(``target_*[:, i]``) is the target's distribution for the token after chunk position i.
Output of a row: ``d_1 .. d_a`` (accepted), then one recovered token (first rejection) or one bonus
token (all gamma accepted), then ``-1`` padding up to ``gamma + 1`` columns.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tide_trt.spec.sampling import draw_uniforms_ragged, inverse_cdf_sample, logits_to_probs

logger = logging.getLogger(__name__)

# Residual mass sum(max(0, p - q)) at or below this is rounding noise (p == q up to float32 error):
# sample from p instead. A rejection there happens with probability <= this, so the bias is bounded by it.
RESIDUAL_EPS = 1e-6

PAD_ID = -1


@dataclass
class VerifyResult:
    """Outcome of verifying a batch: per row, accepted drafts + one recovered/bonus token."""

    output_ids: torch.Tensor  # [B, gamma+1] int64, valid prefix of num_output tokens then PAD_ID (-1)
    num_output: torch.Tensor  # [B] int64 = num_accepted + 1
    num_accepted: torch.Tensor  # [B] int64 draft tokens kept, 0..gamma

    @property
    def gamma(self) -> int:
        return self.output_ids.shape[1] - 1

    @property
    def bonus(self) -> torch.Tensor:
        """[B] bool: True where the last output token is a bonus token (all drafts accepted)."""
        return self.num_accepted == self.gamma

    def tolist(self) -> list[list[int]]:
        """Output tokens of each row as Python lists (padding removed)."""
        ids, counts = self.output_ids.tolist(), self.num_output.tolist()
        return [row[:n] for row, n in zip(ids, counts, strict=True)]


def _check_shapes(draft_ids: torch.Tensor, target: torch.Tensor) -> tuple[int, int, int]:
    if draft_ids.dim() != 2 or target.dim() != 3:
        raise ValueError(
            f"expected draft_ids [B, gamma] and target [B, gamma+1, V], got "
            f"{tuple(draft_ids.shape)} and {tuple(target.shape)}"
        )
    b, gamma = draft_ids.shape
    if target.shape[0] != b or target.shape[1] != gamma + 1:
        raise ValueError(f"target must be [{b}, {gamma + 1}, V], got {tuple(target.shape)}")
    return b, gamma, target.shape[2]


def _draft_lengths(gammas: torch.Tensor | Sequence[int] | None, b: int, gamma: int, device: torch.device
                ) -> torch.Tensor:
    """Per-row draft lengths [B] int64 in [0, gamma] (None: every row drafted gamma)."""
    if gammas is None:
        return torch.full((b,), gamma, dtype=torch.long, device=device)
    if isinstance(gammas, torch.Tensor):
        g = gammas.to(device=device, dtype=torch.long).reshape(-1)  # [B]
        ok = g.shape[0] == b and (b == 0 or (int(g.min()) >= 0 and int(g.max()) <= gamma))  # host sync
    else:  # a host list (the engine's step loop): checked without touching the device
        ok = len(gammas) == b and all(0 <= int(x) <= gamma for x in gammas)
        g = torch.tensor([int(x) for x in gammas], dtype=torch.long).to(device, non_blocking=True)  # [B]
    if not ok:
        raise ValueError(f"need one draft length in [0, {gamma}] per row ({b} rows)")
    return g


def _assemble(draft_ids: torch.Tensor, num_accepted: torch.Tensor, last_token: torch.Tensor) -> VerifyResult:
    """Build the padded output from accepted counts [B] and the recovered/bonus token [B]."""
    b, gamma = draft_ids.shape
    cols = torch.arange(gamma + 1, device=draft_ids.device).unsqueeze(0)  # [1, gamma+1]
    padded = torch.cat([draft_ids.long(), last_token.long().unsqueeze(-1)], dim=1)  # [B, gamma+1]
    at_last = cols == num_accepted.unsqueeze(-1)  # [B, gamma+1]
    out = torch.where(at_last, last_token.long().unsqueeze(-1), padded)  # [B, gamma+1]
    out = out.masked_fill(cols > num_accepted.unsqueeze(-1), PAD_ID)
    return VerifyResult(output_ids=out, num_output=num_accepted + 1, num_accepted=num_accepted)


def _accepted_prefix(accept: torch.Tensor) -> torch.Tensor:
    """accept [B, gamma] bool -> length of the all-True prefix [B] int64."""
    return torch.cumprod(accept.long(), dim=1).sum(dim=1)


def greedy_verify(draft_ids: torch.Tensor, target_logits: torch.Tensor,
                  gammas: torch.Tensor | Sequence[int] | None = None) -> VerifyResult:
    """Accept drafts while they equal ``argmax(target_logits[:, i])``; append the argmax after them.

    ``target_logits`` may also be probabilities: only the argmax (first index on ties) is used.
    gammas [B]: row b drafted only its first gammas[b] columns (0: a plain decode row, whose output is the argmax
    of target row 0); None: every row drafted all columns.
    """
    b, gamma, _ = _check_shapes(draft_ids, target_logits)
    draft_ids = draft_ids.to(target_logits.device)  # [B, gamma]
    g = _draft_lengths(gammas, b, gamma, target_logits.device)  # [B]
    target_ids = target_logits.argmax(dim=-1)  # [B, gamma+1]
    in_draft = torch.arange(gamma, device=g.device)[None, :] < g[:, None]  # [B, gamma]
    num_accepted = _accepted_prefix((draft_ids == target_ids[:, :gamma]) & in_draft)  # [B]
    last = target_ids.gather(1, num_accepted.unsqueeze(-1)).squeeze(-1)  # [B]
    return _assemble(draft_ids, num_accepted, last)


def rejection_verify(
    draft_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generators: Sequence[torch.Generator | None],
    gammas: torch.Tensor | Sequence[int] | None = None,
) -> VerifyResult:
    """Lossless speculative sampling; rows whose generator is None use :func:`greedy_verify`'s rule.

    draft_probs [B, gamma, V] (target vocabulary, zeros allowed) is the distribution each draft was
    sampled from; None means the drafts were chosen deterministically (q = one-hot at the draft).
    target_probs [B, gamma+1, V] are the processed target distributions (rows need not sum to 1).
    gammas [B]: row b drafted its first gammas[b] columns (0 = ordinary sampling from target row 0); None: all.
    Draft d is accepted iff ``u * q(d) < p(d)`` (u ~ U[0,1)), i.e. with prob min(1, p/q) and never when
    p(d) = 0; the recovered token comes from norm(max(0, p - q)), or from p where that mass is
    <= RESIDUAL_EPS; the bonus token from p[:, gammas]. Each sampled row draws gammas[b] + 1 uniforms
    (the acceptance tests, then one inverse-CDF draw), whatever the outcome.
    """
    b, gamma, v = _check_shapes(draft_ids, target_probs)
    if len(generators) != b:
        raise ValueError(f"need one generator (or None) per row: {len(generators)} != {b}")
    if draft_probs is not None and draft_probs.shape != (b, gamma, v):
        raise ValueError(f"draft_probs must be [{b}, {gamma}, {v}], got {tuple(draft_probs.shape)}")
    device = target_probs.device
    draft_ids = draft_ids.to(device).long()  # [B, gamma]
    g = _draft_lengths(gammas, b, gamma, device)  # [B]
    in_draft = torch.arange(gamma, device=device)[None, :] < g[:, None]  # [B, gamma]
    if gamma > 0 and bool((((draft_ids < 0) | (draft_ids >= v)) & in_draft).any()):
        raise ValueError(f"draft_ids must be target vocabulary ids in [0, {v})")
    draft_ids = draft_ids.masked_fill(~in_draft, 0)  # padding columns: any valid id, never accepted
    if all(gen is None for gen in generators):
        return greedy_verify(draft_ids, target_probs, g)
    sampled = torch.tensor([gen is not None for gen in generators], dtype=torch.bool, device=device)  # [B]

    p = target_probs.float()  # [B, gamma+1, V]
    u = draw_uniforms_ragged(generators, (g + 1).tolist(), device)  # [B, max(g)+1]
    u = torch.nan_to_num(torch.nn.functional.pad(u, (0, gamma + 1 - u.shape[1]), value=0.0), nan=0.0)  # [B, gamma+1]
    p_d = p[:, :gamma].gather(2, draft_ids.unsqueeze(-1)).squeeze(-1)  # [B, gamma]
    q = None if draft_probs is None else draft_probs.to(device).float()  # [B, gamma, V]
    q_d = (
        torch.ones_like(p_d) if q is None else q.gather(2, draft_ids.unsqueeze(-1)).squeeze(-1)
    )  # [B, gamma]
    num_accepted = _accepted_prefix((u[:, :gamma] * q_d < p_d) & in_draft)  # [B]

    rows = torch.arange(b, device=device)  # [B]
    p_k = p[rows, num_accepted]  # [B, V] target distribution at the first rejection (or the bonus slot)
    bonus = num_accepted == g  # [B] every drafted token accepted (always true on gamma_b = 0 rows)
    if gamma > 0:
        k = torch.minimum(num_accepted, (g - 1).clamp(min=0))  # [B]
        if q is None:
            q_k = torch.zeros_like(p_k).scatter_(1, draft_ids[rows, k].unsqueeze(-1), 1.0)  # [B, V]
        else:
            q_k = q[rows, k]  # [B, V]
        residual = (p_k - q_k).clamp(min=0)  # [B, V]
        degenerate = residual.sum(-1) <= RESIDUAL_EPS  # [B]
        use_p = bonus | degenerate  # [B]
        if logger.isEnabledFor(logging.DEBUG):
            n_fallback = int((degenerate & ~bonus & sampled).sum())
            logger.debug("rejection_verify: %d rows recovered from p (residual mass <= eps)", n_fallback)
        dist = torch.where(use_p.unsqueeze(-1), p_k, residual)  # [B, V]
    else:
        dist = p_k
    last = inverse_cdf_sample(dist.clamp(min=0), u[rows, g])  # [B]
    result = _assemble(draft_ids, num_accepted, last)

    if any(gen is None for gen in generators):
        greedy = greedy_verify(draft_ids, target_probs, g)
        keep = sampled.unsqueeze(-1)  # [B, 1]
        result = VerifyResult(
            output_ids=torch.where(keep, result.output_ids, greedy.output_ids),
            num_output=torch.where(sampled, result.num_output, greedy.num_output),
            num_accepted=torch.where(sampled, result.num_accepted, greedy.num_accepted),
        )
    return result


def mixed_verify(
    draft_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    generators: Sequence[torch.Generator | None],
    gammas: torch.Tensor | Sequence[int] | None = None,
) -> VerifyResult:
    """Verify a batch mixing greedy and sampled rows, and rows of different draft lengths, from raw target logits.

    target_logits [B, gamma+1, V]; temperature/top_p/top_k [B] per-row params (as logits_to_probs); gammas [B] per
    row draft lengths (0 = an ordinary decode row; None = all gamma). A row is greedy iff its generator is None,
    which must coincide with temperature == 0.
    """
    b, gamma, v = _check_shapes(draft_ids, target_logits)
    temperature = temperature.reshape(b)  # [B]
    is_greedy = [bool(t) for t in (temperature <= 0).tolist()]
    if is_greedy != [g is None for g in generators]:
        raise ValueError("generator must be None exactly on the rows with temperature == 0")
    if all(is_greedy):
        return greedy_verify(draft_ids, target_logits, gammas)

    def per_token(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(b, 1).expand(b, gamma + 1).reshape(-1)  # [B*(gamma+1)]

    target_probs = logits_to_probs(
        target_logits.reshape(b * (gamma + 1), v), per_token(temperature), per_token(top_p), per_token(top_k)
    ).reshape(b, gamma + 1, v)  # [B, gamma+1, V]
    return rejection_verify(draft_ids, draft_probs, target_probs, generators, gammas)


def scatter_to_target_vocab(
    probs: torch.Tensor, draft_to_target: torch.Tensor, target_vocab_size: int
) -> torch.Tensor:
    """Draft-vocabulary probs [..., Vd] -> target-vocabulary probs [..., V] (zeros off the draft vocab).

    draft_to_target [Vd] int64 holds the absolute target id of each draft id (distinct ids).
    """
    out = probs.new_zeros(*probs.shape[:-1], target_vocab_size)  # [..., V]
    index = draft_to_target.to(probs.device).long().expand_as(probs)  # [..., Vd]
    return out.scatter_(-1, index, probs)
