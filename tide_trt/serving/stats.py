"""Serving statistics: counters and gauges the scheduler keeps, exported as flat `tide_*` name -> value pairs.

Names ending in `_total` are monotonic counters (Prometheus counters); everything else is a gauge.
Windowed gauges (accepted/drafted, τ) cover the last `window_steps` engine steps.
"""

from __future__ import annotations

import re
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

PREFIX = "tide_"

DESCRIPTIONS: dict[str, str] = {
    "tide_requests_total": "Requests accepted into the scheduler queue",
    "tide_requests_completed_total": "Requests that finished (length, end token, stop word, context)",
    "tide_requests_failed_total": "Requests that ended with an error after being accepted",
    "tide_requests_cancelled_total": "Requests cancelled by the client",
    "tide_requests_rejected_total": "Requests refused before queueing (invalid or server busy)",
    "tide_requests_busy_total": "Requests refused because the wait queue was full (server busy)",
    "tide_prompt_tokens_total": "Prompt tokens prefilled",
    "tide_output_tokens_total": "Output tokens generated (accepted + recovered + bonus, and first tokens)",
    "tide_draft_tokens_total": "Draft tokens proposed",
    "tide_accepted_draft_tokens_total": "Draft tokens accepted by verification",
    "tide_verify_steps_total": "Sequence verification steps (one per running sequence per engine step)",
    "tide_engine_steps_total": "Engine steps (batched)",
    "tide_step_seconds_total": "Time spent in engine steps",
    "tide_response_seconds_total": "Time the scheduler thread spent handing responses to the frontend",
    "tide_accepted_per_drafted": "Accepted / draft tokens over the recent window",
    "tide_mean_accepted_len": "tau: output tokens per verification step over the recent window (plain = 1)",
    "tide_gamma": "Draft length chosen for the last engine step (0 = plain decoding)",
    "tide_draft_version": "Version of the draft being served (-1 = no draft)",
    "tide_queue_depth": "Requests waiting for a KV slot",
    "tide_active_sequences": "Sequences holding a KV slot",
    "tide_free_slots": "Free KV-cache slots",
    "tide_max_slots": "KV-cache slots (engine.max_batch_size)",
    "tide_step_seconds": "Duration of the last engine step",
    "tide_step_batch_size": "Sequences in the last engine step",
    "tide_draft_rows_index_total": "Verification rows drafted by the suffix index (no draft-model cost)",
    "tide_draft_rows_head_total": "Verification rows drafted by the EAGLE-3 head",
    "tide_draft_tokens_index_total": "Draft tokens proposed by the suffix index",
    "tide_draft_tokens_head_total": "Draft tokens proposed by the EAGLE-3 head",
    "tide_accepted_draft_tokens_index_total": "Suffix-index draft tokens accepted by verification",
    "tide_accepted_draft_tokens_head_total": "EAGLE-3 head draft tokens accepted by verification",
    "tide_draft_rows_index_share": "Share of drafting rows the suffix index drafted (since start)",
    "tide_accepted_per_drafted_index": "Accepted / draft tokens of suffix-index rows (since start)",
    "tide_accepted_per_drafted_head": "Accepted / draft tokens of EAGLE-3 head rows (since start)",
    "tide_suffix_index_tokens": "Tokens held by the global suffix index (bounded by draft.suffix.max_tokens)",
    "tide_suffix_index_sequences": "Sequences added to the global suffix index (preload + finished requests)",
}


def metric_name(name: str) -> str:
    """`tide_<name>` with characters Prometheus does not allow replaced by '_'."""
    clean = re.sub(r"[^a-zA-Z0-9_]", "_", name)
    return clean if clean.startswith(PREFIX) else PREFIX + clean


@dataclass
class _StepSample:
    draft: int
    accepted: int
    output: int  # output tokens of verification steps
    seq_steps: int  # sequences verified


class ServingStats:
    """Thread-safe counters/gauges; the scheduler thread writes, anyone may `snapshot()`."""

    def __init__(self, window_steps: int = 128):
        self._lock = threading.Lock()
        self._counters: dict[str, float] = {k: 0 for k in DESCRIPTIONS if k.endswith("_total")}
        self._gauges: dict[str, float] = {k: 0.0 for k in DESCRIPTIONS if not k.endswith("_total")}
        self._gauges["tide_draft_version"] = -1.0
        self._window: deque[_StepSample] = deque(maxlen=window_steps)

    def inc(self, name: str, value: int = 1) -> None:
        with self._lock:
            self._counters[name] += value

    def add_time(self, name: str, seconds: float) -> None:
        with self._lock:
            self._counters[name] += seconds

    def set_total(self, name: str, value: float) -> None:
        """A counter kept elsewhere (monotonic), published as its current total."""
        with self._lock:
            self._counters[name] = value

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self._gauges[name] = float(value)

    def record_step(self, gamma: int, seconds: float, batch: int, draft: int, accepted: int, output: int,
                    seq_steps: int) -> None:  # fmt: skip
        """One engine step: verification counters of its decode rows (prefill rows excluded from τ)."""
        with self._lock:
            c = self._counters
            c["tide_engine_steps_total"] += 1
            c["tide_step_seconds_total"] += seconds
            c["tide_draft_tokens_total"] += draft
            c["tide_accepted_draft_tokens_total"] += accepted
            c["tide_verify_steps_total"] += seq_steps
            self._gauges.update(tide_gamma=gamma, tide_step_seconds=seconds, tide_step_batch_size=batch)
            if seq_steps:
                self._window.append(_StepSample(draft, accepted, output, seq_steps))

    def snapshot(self, extra: Mapping[str, float] | None = None) -> dict[str, float]:
        """All values; ``extra`` (plugin metrics) is added under `tide_<name>` without overriding ours."""
        with self._lock:
            out: dict[str, float] = {k: float(v) for k, v in self._counters.items()}
            out.update(self._gauges)
            draft = sum(s.draft for s in self._window)
            accepted = sum(s.accepted for s in self._window)
            output = sum(s.output for s in self._window)
            seq_steps = sum(s.seq_steps for s in self._window)
        out["tide_accepted_per_drafted"] = accepted / draft if draft else 0.0
        out["tide_mean_accepted_len"] = output / seq_steps if seq_steps else 0.0
        for name, value in (extra or {}).items():
            key = metric_name(name)
            if key in out:
                key = metric_name(f"plugin_{name}")
            out[key] = float(value)
        return out
