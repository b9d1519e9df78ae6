"""Online adaptation as one StepPlugin: signal capture + drift detection + refit, built from a TideConfig.

Wiring (the serving scheduler or a benchmark):

    gen = SpeculativeGenerator(engine, drafter)
    plugins = build_online_plugins(cfg, engine, gen, draft_limited_fn=lambda: controller.draft_limited)
    ... run_step(gen, policy, plugins) ...                  # (build_online_plugins also sets gen.signal_sink)
    for p in plugins: p.close()                             # flush the last shard, stop threads

Per step: `before_step` swaps in a validated new draft version (RefitWatcher) and applies training-round
decisions from the trainer (rounds.jsonl: a rejected round or a plateau pauses collection);
`after_step` feeds the mean per-request accepted/drafted fraction of speculative requests to the
DriftDetector, which switches collection on when ᾱ_short < ᾱ_long − ε; `on_finish` hands the finished
request's served-acceptance statistics to the signal buffer, which writes the sequence into a shard.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from tide_trt.config import TideConfig
from tide_trt.engine.base import TargetEngine
from tide_trt.engine.generator import SequenceState, SignalSink, SpeculativeGenerator, StepEvent
from tide_trt.online.drift import DriftDetector
from tide_trt.online.perf_model import censored_trials
from tide_trt.online.refit import RefitWatcher
from tide_trt.online.rounds import RoundRecord
from tide_trt.online.signals import FinishInfo, ShardInfo, SignalBuffer
from tide_trt.online.store import DraftStore, SignalStore

log = logging.getLogger(__name__)

RECONCILE_EVERY = 64  # steps between checks for requests that left without finishing (cancelled)


class OnlineAdaptation:
    """StepPlugin composing capture (SignalBuffer), drift (DriftDetector) and refit (RefitWatcher)."""

    def __init__(self, detector: DriftDetector, buffer: SignalBuffer | None, watcher: RefitWatcher | None,
                 *, draft_limited_fn: Callable[[], bool] | None = None):
        """`buffer` decides collection with the `collect_fn` it was built with — `detector.collection_enabled` for
        Algorithm 1 (as `from_config` builds it). `draft_limited_fn`: the adaptive controller's `draft_limited`
        (speculation off for lack of acceptance), read every step for the draft-limited collection trigger
        (drift.py); None without a controller."""
        self.detector = detector
        self.buffer = buffer
        self.watcher = watcher
        self._trials: dict[str, int] = {}  # Σ(k + [k<γ]) per running request (censored-geometric trials)
        self._steps = 0
        self.rounds_applied = 0
        self._draft_limited_fn = draft_limited_fn

    @classmethod
    def from_config(
        cls, cfg: TideConfig, engine: TargetEngine, *, background: bool = True,
        draft_limited_fn: Callable[[], bool] | None = None,
    ) -> OnlineAdaptation:
        info = engine.info
        detector = DriftDetector(cfg.signals)
        buffer = None
        if cfg.signals.enabled:
            s = cfg.signals
            buffer = SignalBuffer(
                SignalStore(s.store_dir),
                ShardInfo(info.fingerprint, info.name, tuple(info.capture_layers), info.hidden_size),
                buffer_tokens=s.buffer_tokens,
                shard_tokens=s.shard_tokens,
                dtype=s.dtype,
                capture_prompt=s.capture_prompt,
                flush_seconds=s.flush_seconds,
                collect_fn=lambda: detector.collection_enabled,  # a request is kept iff collection is on at admission
            )
        watcher = None
        if cfg.trainer.drafts_dir:  # refit_poll_seconds 0 = check every step
            watcher = RefitWatcher(
                DraftStore(cfg.trainer.drafts_dir),
                info,
                engine.embedding_weight(),
                poll_seconds=cfg.serving.refit_poll_seconds,
                background=background,
            )
        return cls(detector, buffer, watcher, draft_limited_fn=draft_limited_fn)

    @property
    def signal_sink(self) -> SignalSink | None:
        return self.buffer.sink if self.buffer is not None else None

    # ---- StepPlugin ----------------------------------------------------------------------------------------
    def before_step(self, generator: SpeculativeGenerator) -> None:
        if self.watcher is not None:
            self.watcher.before_step(generator)
            for r in self.watcher.take_rounds():
                self._apply_round(r)
        if self.buffer is not None:
            self.buffer.draft_version = generator.drafter.version if generator.drafter is not None else -1
        if self._draft_limited_fn is not None:
            self.detector.set_draft_limited(self._draft_limited_fn())

    def after_step(
        self, generator: SpeculativeGenerator, gamma: int, events: Sequence[StepEvent], seconds: float
    ) -> None:
        fractions = []
        for e in events:
            if e.num_draft > 0:
                fractions.append(e.num_accepted / e.num_draft)
                self._trials[e.request_id] = self._trials.get(e.request_id, 0) + censored_trials(e.num_accepted,
                                                                                                 e.num_draft)
        if fractions:
            self.detector.update(sum(fractions) / len(fractions), float(len(fractions)))
        self.detector.observe_served(sum(1 for e in events if not e.is_prefill))
        self._steps += 1
        if self._steps % RECONCILE_EVERY == 0:
            self._reconcile(generator)

    def on_finish(self, seq: SequenceState) -> None:
        rid = seq.request.request_id
        trials = self._trials.pop(rid, 0)
        if self.buffer is None:
            return
        self.buffer.finish(
            rid,
            FinishInfo(
                next_token_id=seq.tokens[-1],
                num_positions=len(seq.tokens) - 1,
                draft_tokens=seq.draft_tokens,
                accepted_tokens=seq.accepted_tokens,
                accept_trials=trials,
                verify_steps=seq.steps,
            ),
        )

    def metrics(self) -> dict[str, float]:
        snap = self.detector.snapshot()
        m = {
            "drift_accepted_per_drafted_short": snap.accepted_per_drafted_short,
            "drift_accepted_per_drafted_long": snap.accepted_per_drafted_long,
            "signals_collection_enabled": float(snap.collection_enabled),
            "signals_collection_draft_limited": float(snap.draft_limited and not snap.draft_limited_suspended),
            "drift_detections": float(snap.detections),
            "drift_pauses": float(snap.pauses),
            "training_rounds_applied": float(self.rounds_applied),
        }
        if self.buffer is not None:
            m.update(self.buffer.metrics())
        if self.watcher is not None:
            m.update(self.watcher.metrics())
        return m

    # ---- helpers -------------------------------------------------------------------------------------------
    def _apply_round(self, line: dict[str, Any]) -> None:
        """A trainer round ended (its rounds.jsonl line): apply its Algorithm 1 decision (pause collection when it
        says so)."""
        record = RoundRecord.from_json(line)
        self.detector.apply(record.decision)
        self.rounds_applied += 1
        log.info("training round %s: %s (collection %s)", record.round, record.reason,
                 "on" if self.detector.collection_enabled else "paused")

    def _reconcile(self, generator: SpeculativeGenerator) -> None:
        live = generator.sequences
        if self.buffer is not None:
            for rid in self.buffer.tracked():
                if rid not in live:
                    self.buffer.discard(rid)
        for rid in [r for r in self._trials if r not in live]:
            del self._trials[rid]

    def close(self) -> None:
        """Flush the last shard and stop the background threads."""
        if self.watcher is not None:
            self.watcher.close()
        if self.buffer is not None:
            self.buffer.close()


def build_online_plugins(
    cfg: TideConfig, engine: TargetEngine, generator: SpeculativeGenerator, *, background: bool = True,
    draft_limited_fn: Callable[[], bool] | None = None,
) -> list[OnlineAdaptation]:
    """The online-adaptation plugins for `generator`; installs the signal sink on it if it has none.
    `draft_limited_fn`: the adaptive controller's `draft_limited` when one runs (see OnlineAdaptation)."""
    adaptation = OnlineAdaptation.from_config(cfg, engine, background=background, draft_limited_fn=draft_limited_fn)
    if generator.signal_sink is None:
        generator.signal_sink = adaptation.signal_sink
    elif adaptation.buffer is not None:
        log.warning("generator already has a signal sink; online signal capture is not attached")
    return [adaptation]
