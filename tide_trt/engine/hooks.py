"""Step plugins: how online adaptation, the controller and metrics attach to the engine loop.

The scheduler (serving) or a benchmark loop calls, around every `SpeculativeGenerator.step`:
    gamma = policy.choose_gamma(active_request_ids)
    drafting = policy.drafting(active_request_ids)    # None: all draft; else the few a probe speculates on
    gammas = policy.row_gammas(active_request_ids)    # optional: per-row γᵢ overrides (None: γ for every row)
    index = policy.index_off_rows()                   # optional: rows the head skips may draft from the index
    for p in plugins: p.before_step(generator)        # e.g. refit: swap draft weights between steps
    events = generator.step(StepDrafting(gamma, drafting, gammas, index))   # the one way to say how a step drafts
    for p in plugins: p.after_step(generator, gamma, events, seconds)
    for each finished sequence: p.on_finish(seq) (before the slot is released)
`metrics()` returns flat name -> value pairs for Prometheus and server stats; `close()` is called once when the
server (or benchmark) stops: flush and stop background threads.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from typing import Protocol

from tide_trt.draft.plan import StepDrafting
from tide_trt.engine.generator import SequenceState, SpeculativeGenerator, StepEvent


class StepPlugin(Protocol):
    def before_step(self, generator: SpeculativeGenerator) -> None: ...

    def after_step(self, generator: SpeculativeGenerator, gamma: int, events: Sequence[StepEvent],
                   seconds: float) -> None: ...

    def on_finish(self, seq: SequenceState) -> None: ...

    def metrics(self) -> dict[str, float]: ...

    def close(self) -> None:
        """Release resources (flush buffers, stop threads); called once at shutdown."""


class PassiveStepPlugin:
    """A StepPlugin whose hooks do nothing: observers subclass it and override only what they watch."""

    def before_step(self, generator: SpeculativeGenerator) -> None:
        return None

    def after_step(self, generator: SpeculativeGenerator, gamma: int, events: Sequence[StepEvent],
                   seconds: float) -> None:
        return None

    def on_finish(self, seq: SequenceState) -> None:
        return None

    def metrics(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        return None


class GammaPolicy(Protocol):
    def choose_gamma(self, request_ids: Sequence[str]) -> int: ...

    def drafting(self, request_ids: Sequence[str]) -> Collection[str] | None:
        """The requests that draft at the γ just chosen (None: all of them)."""


class StaticGamma:
    """Fixed draft length (γ = 0 means plain decoding)."""

    def __init__(self, gamma: int):
        self.gamma = gamma

    def choose_gamma(self, request_ids: Sequence[str]) -> int:
        return self.gamma

    def drafting(self, request_ids: Sequence[str]) -> Collection[str] | None:
        return None


def run_step(generator: SpeculativeGenerator, policy: GammaPolicy, plugins: Sequence[StepPlugin]
             ) -> tuple[int, list[StepEvent], float]:
    """One engine step with plugins around it. Returns (gamma, events, seconds)."""
    active = [rid for rid, s in generator.sequences.items() if not s.finished]
    gamma, drafting, gammas, index = 0, None, None, False
    if generator.drafter is not None:
        gamma = policy.choose_gamma(active)
        drafting = policy.drafting(active) if gamma > 0 else None
        row_fn = getattr(policy, "row_gammas", None)  # optional parts of a GammaPolicy
        gammas = row_fn(active) if row_fn is not None and gamma > 0 else None
        index_fn = getattr(policy, "index_off_rows", None)
        index = bool(index_fn()) if index_fn is not None else False
    for p in plugins:
        p.before_step(generator)
    t0 = time.perf_counter()
    events = generator.step(StepDrafting(gamma, drafting, gammas or None, index_off_rows=index))
    seconds = time.perf_counter() - t0
    for p in plugins:
        p.after_step(generator, gamma, events, seconds)
    for ev in events:
        if ev.finished:
            seq = generator.sequences.get(ev.request_id)
            if seq is not None:
                for p in plugins:
                    p.on_finish(seq)
    return gamma, events, seconds
