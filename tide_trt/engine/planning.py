"""Planning one step under the engine's token budget: draft lengths that fit, then prompt chunks."""

from __future__ import annotations

from tide_trt.engine.sequence import SequenceState

# a step's prompt chunks take at least this share of the token budget while prompts wait (decode rows then draft less)
PREFILL_RESERVE = 0.25


def fit_draft_lengths(wanted: list[int], room: list[int], budget: int, prefill_waiting: bool) -> list[int]:
    """Each decode row's draft length: what it wants, capped by the room left in its context (verification needs
    γᵢ + 1 positions) and, together, by the step's token budget (less a prefill reserve while prompts wait),
    shortening the longest drafts first."""
    out = [max(0, min(g, r)) for g, r in zip(wanted, room, strict=True)]
    limit = budget - (int(budget * PREFILL_RESERVE) if prefill_waiting else 0)
    limit = max(limit, len(out))
    while sum(out) + len(out) > limit:
        out[max(range(len(out)), key=lambda i: out[i])] -= 1
    return out


def plan_prompt_chunks(waiting: list[SequenceState], budget: int) -> list[tuple[SequenceState, int]]:
    """Split a step's prefill budget among prompts still being prefilled (arrival order): the oldest gets at least
    half of it (no prompt starves), prompts that fit entirely in what is left complete now (a short request is not
    queued behind a long one), and any remainder extends the oldest chunks. Returns (sequence, chunk length)."""
    if not waiting or budget <= 0:
        return []
    remaining = {id(s): s.num_prompt - s.num_computed for s in waiting}
    take = {id(waiting[0]): min(remaining[id(waiting[0])], max(1, budget // 2))}
    left = budget - take[id(waiting[0])]
    for s in waiting[1:]:
        if remaining[id(s)] <= left:
            take[id(s)] = remaining[id(s)]
            left -= remaining[id(s)]
    for s in waiting:
        if left <= 0:
            break
        extra = min(remaining[id(s)] - take.get(id(s), 0), left)
        if extra > 0:
            take[id(s)] = take.get(id(s), 0) + extra
            left -= extra
    return [(s, take[id(s)]) for s in waiting if take.get(id(s), 0) > 0]
