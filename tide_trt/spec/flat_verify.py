"""Verification of one engine step on its flat logits (greedy and lossless rejection sampling, mixed rows).

A step's logits are flat, [M, V]: row r owns logits `logit_cu[r]:logit_cu[r+1]` (γᵢ + 1 for a decode or
verification row, 1 for a prompt that completes this step, 0 for a prompt chunk that does not). Logit m is
*judged* against the draft that follows it in its row (`is_draft[m]`, the draft id `draft_ids[m]`); a row's last
logit judges nothing and gives its recovered or bonus token. Everything runs on the logits' device with per-row
offsets — no padded re-gather, no host index lists — and the result is one flat tensor the caller copies to the host
once: `packed = [num_accepted [R] ; tokens [M]]`.

The rule per row is `rejection_verify`'s (spec/verify.py, the padded reference the tests compare with): greedy rows
accept while the draft is the target's argmax; sampled rows draw γᵢ + 1 uniforms from their own generator, accept
draft d at position i iff u_i · q(d) < p(d), and draw the recovered token from norm(max(0, p − q)) (from p when that
mass is ≤ RESIDUAL_EPS, or for the bonus token) with the row's last uniform.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tide_trt.spec.sampling import SamplingBatch, inverse_cdf_sample, logits_to_probs
from tide_trt.spec.verify import RESIDUAL_EPS


@dataclass
class FlatLayout:
    """Where a step's logits sit: per logit its row and the draft it judges; per row its logit range."""

    logit_row: torch.Tensor  # [M] int64 row of each logit
    logit_cu: torch.Tensor  # [R + 1] int64 row r owns logits logit_cu[r]:logit_cu[r+1]
    is_draft: torch.Tensor  # [M] bool the logit judges a draft (not its row's last logit)
    draft_ids: torch.Tensor  # [M] int64 the draft judged at each logit (any valid id where not is_draft)
    host_logit_cu: tuple[int, ...]  # [R + 1] host copy of logit_cu


def verify_flat(logits: torch.Tensor, layout: FlatLayout, sampling: SamplingBatch | None = None,
                draft_probs: torch.Tensor | None = None) -> torch.Tensor:
    """logits [M, V] raw target logits; sampling: per row (R rows; None = every row greedy); draft_probs [M, V]: the
    distribution each judged draft was drawn from (None: drafts chosen deterministically, q one-hot).
    Returns packed [R + M] int64: num_accepted per row, then per logit the row's output token (accepted drafts, then
    the recovered / bonus token at logit_cu[r] + num_accepted[r]) and -1 after it."""
    m = logits.shape[0]
    r = layout.logit_cu.shape[0] - 1
    dev = logits.device
    if m == 0:
        return torch.zeros(r, dtype=torch.long, device=dev)
    target_ids = logits.argmax(-1)  # [M]
    drafts = layout.draft_ids  # [M]
    match = target_ids == drafts  # [M] greedy rule
    probs = u = row_sampled = None
    if sampling is not None:
        row_of = layout.logit_row  # [M]
        probs = logits_to_probs(logits, sampling.temperature[row_of], sampling.top_p[row_of],
                                sampling.top_k[row_of])  # [M, V]
        u = _uniforms(sampling, layout.host_logit_cu, dev)  # [M], 0 on greedy rows
        row_sampled = torch.tensor([g is not None for g in sampling.generators], dtype=torch.bool, device=dev)  # [R]
        sampled = row_sampled[row_of]  # [M]
        p_d = probs.gather(1, drafts[:, None]).squeeze(1)  # [M]
        q_d = torch.ones_like(p_d) if draft_probs is None else draft_probs.gather(1, drafts[:, None]).squeeze(1)
        match = torch.where(sampled, u * q_d < p_d, match)
    accepted = _accepted_prefix(match & layout.is_draft, layout)  # [R]
    final = (layout.logit_cu[:-1] + accepted).clamp(max=m - 1)  # [R] logit of the recovered / bonus token
    last = target_ids[final]  # [R]
    if sampling is not None and probs is not None and u is not None and row_sampled is not None:
        p_f = probs[final]  # [R, V]
        bonus = ~layout.is_draft[final]  # [R] every draft accepted: sample the bonus token from p
        q_f = (F.one_hot(drafts[final], p_f.shape[-1]).to(p_f.dtype) if draft_probs is None
               else draft_probs[final].float())  # [R, V]
        residual = (p_f - q_f).clamp(min=0)  # [R, V]
        use_p = bonus | (residual.sum(-1) <= RESIDUAL_EPS)  # [R]
        dist = torch.where(use_p[:, None], p_f, residual)  # [R, V]
        row_last = (layout.logit_cu[1:] - 1).clamp(min=0)  # [R] the row's last uniform draws the token
        drawn = inverse_cdf_sample(dist.clamp(min=0), u[row_last])  # [R]
        last = torch.where(row_sampled, drawn, last)
    offset = torch.arange(m, device=dev) - layout.logit_cu[layout.logit_row]  # [M] position inside its row
    acc_m = accepted[layout.logit_row]  # [M]
    tokens = torch.where(offset < acc_m, drafts, torch.where(offset == acc_m, last[layout.logit_row], -1))  # [M]
    return torch.cat([accepted, tokens])


def _accepted_prefix(ok: torch.Tensor, layout: FlatLayout) -> torch.Tensor:
    """ok [M] bool -> per row the length of its all-True prefix [R] (segment ops over logit_cu, no loop)."""
    stops = torch.cumsum((~ok).long(), 0)  # [M] stops seen up to and including m
    stops0 = F.pad(stops, (1, 0))  # [M + 1]
    before = stops0[layout.logit_cu[:-1]]  # [R] stops before each row
    in_prefix = (stops - before[layout.logit_row]) == 0  # [M]
    cum = F.pad(torch.cumsum(in_prefix.long(), 0), (1, 0))  # [M + 1]
    return cum[layout.logit_cu[1:]] - cum[layout.logit_cu[:-1]]  # [R]


def _uniforms(sampling: SamplingBatch, host_logit_cu: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[M] uniforms: each sampled row draws one per logit (γᵢ + 1) from its own generator, in row order — the numbers
    `rejection_verify` draws (`draw_uniforms_ragged`); 0 on greedy rows. Built on the host, copied once."""
    u = torch.zeros(host_logit_cu[-1], dtype=torch.float32)  # [M]
    for r, gen in enumerate(sampling.generators):
        lo, hi = host_logit_cu[r], host_logit_cu[r + 1]
        if gen is not None and hi > lo:
            u[lo:hi] = torch.rand((1, hi - lo), generator=gen, device=gen.device).reshape(-1).cpu()
    return u.to(device, non_blocking=True)
