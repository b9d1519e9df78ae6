"""The adaptive controller attached to the engine loop: a GammaPolicy + StepPlugin.

choose_gamma -> AdaptiveController.choose_gamma over the running batch; row_gammas -> per-row lengths from
`row_hint_fn` (e.g. a drafter's confidence), capped by the controller. After each verification step the per-request
draft lengths, accepted counts and the step time feed `observe` (steps that also ran a prefill are not timed): they
correct the cost model and feed the live-goodput guard. Draft time is charged by head rows: a generator that
reports `last_step_draft_rows` = (rows drafted by the head, rows drafted by a suffix index alone) after its step
gets only the former charged; without it every drafting row is a head row. Finished requests are forgotten.
A refit calls `on_draft_updated` so that speculation is re-probed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping, Sequence

from tide_trt.config import ControllerConfig
from tide_trt.engine.generator import SequenceState, SpeculativeGenerator, StepEvent
from tide_trt.online.controller import AdaptiveController, ControllerState
from tide_trt.online.perf_model import LatencyProfile


class ControllerPlugin:
    def __init__(self, config: ControllerConfig, profile: LatencyProfile, gamma_max: int, static_gamma: int):
        self.controller = AdaptiveController(config, profile, gamma_max, static_gamma)
        self.profile = profile
        self._draft_version: int | None = None
        self.steps_by_gamma: dict[int, int] = {}
        self._catch_up = 0  # draft catch-up positions of the step being run (before_step -> after_step)
        # per-row draft-length hints for the running requests (request id -> γᵢ); None: one γ per step
        self.row_hint_fn: Callable[[Sequence[str]], Mapping[str, int]] | None = None

    # GammaPolicy
    def choose_gamma(self, request_ids: Sequence[str]) -> int:
        return self.controller.choose_gamma(list(request_ids))

    def drafting(self, request_ids: Sequence[str]) -> Collection[str] | None:
        return self.controller.drafting(request_ids)

    def index_off_rows(self) -> bool:
        """Rows the head skips this step may draft from a confident suffix index (see AdaptiveController)."""
        return self.controller.index_off_rows()

    def row_gammas(self, request_ids: Sequence[str]) -> Mapping[str, int] | None:
        """Per-row γᵢ for the step just chosen (None: every drafting row at the step's γ)."""
        if self.row_hint_fn is None:
            return None
        return self.controller.row_gammas(request_ids, self.row_hint_fn(request_ids))

    # StepPlugin
    def before_step(self, generator: SpeculativeGenerator) -> None:
        drafter = generator.drafter
        if drafter is not None and self._draft_version is not None and drafter.version != self._draft_version:
            self.controller.on_draft_updated()
        self._draft_version = drafter.version if drafter is not None else None
        self._catch_up = self._pending_catch_up(generator)

    def _pending_catch_up(self, generator: SpeculativeGenerator) -> int:
        """Positions the draft must catch up on before this step's proposals (rows that draft at the γ just
        chosen): after a prompt or an off period the step carries a draft prefill that T(n) + γ·D does not
        describe. 0 when the drafter does not say where it is."""
        drafter = generator.drafter
        next_position = getattr(drafter, "next_position", None)
        if drafter is None or next_position is None or self.controller.last_gamma <= 0:
            return 0
        drafting = self.controller.drafting(())
        window = getattr(drafter, "catch_up_window", 0)
        total = 0
        for rid, seq in generator.sequences.items():
            if seq.finished or not seq.prefilled or (drafting is not None and rid not in drafting):
                continue
            lag = len(seq.tokens) - 1 - next_position(seq.slot)
            total += min(lag, window) if window else lag
        return max(total, 0)

    def after_step(self, generator: SpeculativeGenerator, gamma: int, events: Sequence[StepEvent],
                   seconds: float) -> None:
        decode = [e for e in events if not e.is_prefill]
        if not decode:
            return
        had_prefill = generator.last_step_prompt_tokens > 0  # a prompt chunk rode along: not a decode timing
        step_gamma = max(e.num_draft for e in decode)
        self.steps_by_gamma[step_gamma] = self.steps_by_gamma.get(step_gamma, 0) + 1
        rows = getattr(generator, "last_step_draft_rows", None)  # (head rows, index-only rows) of a hybrid drafter
        head_rows = int(rows[0]) if rows is not None else None
        self.controller.observe([e.request_id for e in decode], [e.num_draft for e in decode],
                                [e.num_accepted for e in decode], None if had_prefill else seconds, head_rows,
                                catch_up=self._catch_up, index_rows=self._index_rows(generator))
        self._catch_up = 0

    @staticmethod
    def _index_rows(generator: SpeculativeGenerator) -> set[str] | None:
        """Request ids whose rows the suffix index drafted in the last step (None: the generator does not say)."""
        slots = getattr(generator, "last_step_index_slots", None)
        if slots is None:
            return None
        return {rid for rid, s in generator.sequences.items() if s.slot in slots}

    def on_finish(self, seq: SequenceState) -> None:
        self.controller.forget(seq.request.request_id)

    def close(self) -> None:
        """Nothing to release (no threads, no files)."""

    def state(self) -> ControllerState:
        return self.controller.snapshot()

    def state_dict(self) -> dict:
        return dataclasses.asdict(self.state())

    def metrics(self) -> dict[str, float]:
        s = self.state()
        out = {"controller_gamma": float(s.gamma), "controller_alpha": s.global_alpha,
               "controller_predicted_speedup": s.predicted_speedup,
               "controller_switches": float(s.num_switches), "controller_probes": float(s.num_probes)}
        if s.measured_speedup is not None:
            out["controller_measured_speedup"] = s.measured_speedup
        if s.cost is not None:
            out["controller_load_factor"] = s.cost.load_factor
            if s.cost.error is not None and s.cost.error_startup is not None:
                out["controller_prediction_error"] = s.cost.error
                out["controller_prediction_error_startup"] = s.cost.error_startup
        out["controller_plain_probes_total"] = float(s.plain_probes)
        out["controller_guard_offs_total"] = float(s.guard_offs)
        out["controller_head_share"] = s.head_share
        out["controller_index_drafting"] = float(s.index_drafting)
        out["controller_index_guard_offs_total"] = float(s.index_offs)
        if s.index_accepted_per_token is not None:
            out["controller_index_accepted_per_token"] = s.index_accepted_per_token
        if s.index_measured_speedup is not None:
            out["controller_index_measured_speedup"] = s.index_measured_speedup
        for b, g in s.schedule.items():
            out[f"controller_schedule_gamma_b{b}"] = float(g)
        return out
