"""Selective training (paper Algorithm 1): drift detection, the training trigger and the deploy gate.

Acceptance input. ``DriftDetector.update(acceptance, weight)`` takes accepted/drafted of one verification step
(``accepted / γ``; not the controller's per-token α, which counts censored trials), averaged over the ``weight``
requests of that step that speculated; steps without speculation carry no information and must not be fed. The EMA
rates are per *request-step* (``weight`` request-steps advance the EMA as ``weight`` sequential updates of their
mean), so the defaults behave the same at batch size 1 and 64. Both EMAs are bias-corrected (divided by ``1 -
(1-λ)^n``), so they hold sensible values from the first update.

Rule. Collection is on when ``ᾱ_short < ᾱ_long − ε`` (after ``drift_warmup_updates`` request-steps);
at **cold start** collection is on too (no baseline yet, and the shipped draft may not match the
traffic), until the first training round's gate pauses it. A pause re-baselines: for the next
``drift_warmup_updates`` request-steps ``ᾱ_long`` is pinned to ``ᾱ_short`` (which may still be settling
after a drop) and detection is disarmed, so only a *new* drop resumes collection ("pause until drift is
seen again").

Draft-limited trigger (beyond the paper). A drop is not the only time a better draft would pay: where the
adaptive controller holds speculation off because the draft's acceptance is too low for the cost model
(speculation would pay with a better draft), the EMAs barely move (only probes speculate), so no drop is
ever seen and the draft never improves. ``set_draft_limited(True)`` (fed by the controller every step)
keeps collection on in that state; to train only when it helps, ``draft_limited_max_rejections`` rejected
rounds in a row (or a plateau) suspend this trigger until a round deploys, a drop is detected, or
``draft_limited_retry_steps`` more request-steps have been served (the traffic may have changed; doubled after
every suspension, reset by a deploy) — served steps, because with speculation off acceptance barely updates.

Defaults (``SignalConfig.drift_*``) were chosen with ``python benchmarks/drift_defaults.py`` (Bernoulli request-step
streams, the noisiest case for a fraction in [0, 1]: the smallest worst-case detection delay with no false alarm at
ε and at ε − 0.01); the same script simulates the deploy gate for ``TrainerConfig.min_new_tokens`` (N_threshold,
not owned here). Run it for the numbers.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from tide_trt.config import SignalConfig, TrainerConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DriftState:
    """Metrics snapshot of a :class:`DriftDetector` (no tensors)."""

    accepted_per_drafted_short: float  # ᾱ_short: EMA of accepted/drafted per request-step
    accepted_per_drafted_long: float  # ᾱ_long
    collection_enabled: bool
    armed: bool
    drifting: bool  # ᾱ_short < ᾱ_long − ε right now
    updates: float  # request-steps seen
    detections: int  # times drift turned collection on
    pauses: int
    last_event: str
    draft_limited: bool = False  # the controller holds speculation off for lack of acceptance
    draft_limited_suspended: bool = False  # ... but rounds on that data stopped helping


class _BiasCorrectedEma:
    """EMA with rate ``lam`` per unit weight, divided by the accumulated weight ``1 - (1-lam)^n``."""

    __slots__ = ("lam", "value", "mass")

    def __init__(self, lam: float) -> None:
        self.lam = lam
        self.value = 0.0
        self.mass = 0.0

    def update(self, x: float, weight: float) -> None:
        decay = (1.0 - self.lam) ** weight
        new_mass = decay * self.mass + (1.0 - decay)
        self.value = (decay * self.mass * self.value + (1.0 - decay) * x) / new_mass
        self.mass = new_mass


class DriftDetector:
    """Short/long acceptance EMAs deciding when serving-time signals are worth collecting."""

    def __init__(self, config: SignalConfig) -> None:
        self.epsilon = float(config.drift_epsilon)
        self.warmup = float(config.drift_warmup_updates)
        self._short = _BiasCorrectedEma(config.drift_ema_short)
        self._long = _BiasCorrectedEma(config.drift_ema_long)
        self._enabled = bool(config.enabled)
        self._collecting = self._enabled  # cold start: collect (see module docstring)
        self._updates = 0.0
        self._rearm_at = 0.0  # until then ᾱ_long follows ᾱ_short (re-baselining after a pause)
        self._detections = 0
        self._pauses = 0
        self._last_event = "cold_start" if self._enabled else "disabled"
        self._limited_allowed = bool(config.collect_when_draft_limited)
        self._limited_max_rejections = config.draft_limited_max_rejections
        self._draft_limited = False
        self._limited_rejections = 0
        self._limited_retry = config.draft_limited_retry_steps
        self._limited_suspensions = 0
        self._served = 0.0  # decode request-steps served, speculative or not
        self._retry_at = math.inf  # finite while the draft-limited trigger is suspended

    @property
    def collection_enabled(self) -> bool:
        return self._collecting or (self._enabled and self._draft_limited and not self.draft_limited_suspended)

    @property
    def draft_limited_suspended(self) -> bool:
        return not self._limited_allowed or self._retry_at < math.inf

    def observe_served(self, request_steps: float) -> None:
        """Count served decode request-steps (every step, speculative or not): a suspended draft-limited
        trigger retries after ``draft_limited_retry_steps`` of them."""
        self._served += max(float(request_steps), 0.0)
        if self._served >= self._retry_at:
            self._retry_at = math.inf
            logger.info("draft-limited collection: retrying after %.0f served request-steps", self._served)

    def _suspend_limited(self) -> None:
        self._limited_rejections = 0
        self._retry_at = self._served + self._limited_retry * 2 ** min(self._limited_suspensions, 10)
        self._limited_suspensions += 1

    def set_draft_limited(self, limited: bool) -> None:
        """The controller's view, every step: speculation is off because the draft does not pay (yet)."""
        if limited and not self._draft_limited and self._enabled and not self.draft_limited_suspended:
            logger.info("speculation off for lack of acceptance: collecting signals to improve the draft")
        self._draft_limited = bool(limited)

    @property
    def armed(self) -> bool:
        return self._updates >= self.warmup and self._updates >= self._rearm_at

    @property
    def drifting(self) -> bool:
        return self.armed and self._short.value < self._long.value - self.epsilon

    def update(self, acceptance: float, weight: float = 1.0) -> bool:
        """Feed one step's mean acceptance fraction over ``weight`` request-steps.

        Returns True when this update turned collection on (a drift detection). Non-finite values
        and non-positive weights are ignored.
        """
        if not (math.isfinite(acceptance) and math.isfinite(weight)) or weight <= 0.0:
            return False
        x = min(max(float(acceptance), 0.0), 1.0)
        self._short.update(x, weight)
        self._long.update(x, weight)
        self._updates += weight
        if self._updates < self._rearm_at:
            self._long.value = self._short.value
        if self._enabled and not self._collecting and self.drifting:
            self._collecting = True
            self._limited_rejections = 0
            self._retry_at = math.inf
            self._detections += 1
            self._last_event = "drift"
            logger.info(
                "acceptance drift: short %.3f < long %.3f - %.3f; signal collection on",
                self._short.value,
                self._long.value,
                self.epsilon,
            )
            return True
        return False

    def pause(self, reason: str = "paused") -> None:
        """Turn collection off; ``ᾱ_long`` follows ``ᾱ_short`` for a warm-up so only a new drop resumes."""
        if self._collecting:
            self._pauses += 1
            logger.info("signal collection paused: %s", reason)
        self._collecting = False
        self._last_event = reason
        self._rearm_at = self._updates + self.warmup
        if self._short.mass > 0.0:
            self._long.value = self._short.value

    def resume(self, reason: str = "resumed") -> None:
        """Turn collection on explicitly (e.g. an operator or a new workload)."""
        if self._enabled:
            self._collecting = True
            self._last_event = reason

    def apply(self, decision: Decision) -> None:
        """Apply a :class:`TrainingGate` decision (pause collection when it says so).

        For the draft-limited trigger: a deployed round resets the rejection streak, a rejected round
        extends it, a plateau suspends the trigger at once."""
        if decision.deploy and decision.reason != "plateau":
            self._limited_rejections = 0
            self._limited_suspensions = 0
            self._retry_at = math.inf
        elif decision.reason == "plateau":
            self._suspend_limited()
        elif decision.pause_collection:
            self._limited_rejections += 1
            if self._retry_at < math.inf or self._limited_rejections >= self._limited_max_rejections:
                self._suspend_limited()
        if decision.pause_collection:
            self.pause(decision.reason)

    def snapshot(self) -> DriftState:
        return DriftState(
            accepted_per_drafted_short=self._short.value,
            accepted_per_drafted_long=self._long.value,
            collection_enabled=self.collection_enabled,
            armed=self.armed,
            drifting=self.drifting,
            updates=self._updates,
            detections=self._detections,
            pauses=self._pauses,
            last_event=self._last_event,
            draft_limited=self._draft_limited,
            draft_limited_suspended=self.draft_limited_suspended,
        )


@dataclass(frozen=True)
class Decision:
    """Outcome of a training round: deploy the new draft? pause signal collection? why."""

    deploy: bool
    pause_collection: bool
    reason: str
    gain: float = 0.0  # eval acceptance of the new draft − mean acceptance in the training data
    required_gain: float = 0.0


@dataclass(frozen=True)
class GateState:
    """Metrics snapshot of a :class:`TrainingGate`."""

    samples_since_round: int
    min_new_samples: int
    rounds: int
    deployed: int
    plateau_streak: int
    last_reason: str


class TrainingGate:
    """When to train (N_threshold new samples) and whether to deploy the result (Algorithm 1)."""

    def __init__(
        self,
        min_new_samples: int,
        *,
        min_gain: float = 0.01,
        z: float = 1.645,
        plateau_min_gain: float = 0.02,
        plateau_rounds: int = 2,
    ) -> None:
        self.min_new_samples = max(int(min_new_samples), 1)
        self.min_gain = float(min_gain)
        self.z = float(z)
        self.plateau_min_gain = float(plateau_min_gain)
        self.plateau_rounds = max(int(plateau_rounds), 1)
        self._samples = 0
        self._rounds = 0
        self._deployed = 0
        self._plateau_streak = 0
        self._last_reason = ""

    @classmethod
    def from_config(cls, signals: SignalConfig, trainer: TrainerConfig) -> TrainingGate:
        return cls(
            trainer.min_new_tokens,
            min_gain=signals.gate_min_gain,
            z=signals.gate_z,
            plateau_min_gain=signals.plateau_min_gain,
            plateau_rounds=signals.plateau_rounds,
        )

    @property
    def samples_since_round(self) -> int:
        return self._samples

    def add_samples(self, n: int) -> None:
        """Count ``n`` newly stored signal tokens."""
        self._samples += max(int(n), 0)

    def should_train(self, num_new_samples: int | None = None) -> bool:
        """True when ``num_new_samples`` (default: the tracked count) reaches N_threshold."""
        n = self._samples if num_new_samples is None else int(num_new_samples)
        return n >= self.min_new_samples

    def required_gain(self, num_eval: int | None = None, num_train: int | None = None) -> float:
        """Margin to beat: ``max(min_gain, z · SE)`` with the binomial SE at p = 0.5 when counts are known."""
        if not num_eval or not num_train:
            return self.min_gain
        se = 0.5 * math.sqrt(1.0 / num_eval + 1.0 / num_train)
        return max(self.min_gain, self.z * se)

    def decide(
        self,
        eval_acceptance_new: float,
        mean_train_acceptance: float,
        *,
        num_eval: int | None = None,
        num_train: int | None = None,
    ) -> Decision:
        """End a round: deploy iff the new draft's held-out acceptance beats the training-data mean.

        A rejected draft pauses collection (until drift is seen again). A deployed draft whose gain
        stays under ``plateau_min_gain`` for ``plateau_rounds`` rounds in a row also pauses it (plateau).
        Resets the sample count.
        """
        self._rounds += 1
        self._samples = 0
        gain = float(eval_acceptance_new) - float(mean_train_acceptance)
        need = self.required_gain(num_eval, num_train)
        if not math.isfinite(gain) or gain <= need:
            self._plateau_streak = 0
            decision = Decision(False, True, "no_improvement", gain if math.isfinite(gain) else 0.0, need)
        else:
            self._deployed += 1
            self._plateau_streak = self._plateau_streak + 1 if gain < self.plateau_min_gain else 0
            plateau = self._plateau_streak >= self.plateau_rounds
            decision = Decision(True, plateau, "plateau" if plateau else "improved", gain, need)
        self._last_reason = decision.reason
        logger.info(
            "training round %d: gain %.4f (need %.4f) -> %s",
            self._rounds,
            decision.gain,
            need,
            decision.reason,
        )
        return decision

    def snapshot(self) -> GateState:
        return GateState(
            samples_since_round=self._samples,
            min_new_samples=self.min_new_samples,
            rounds=self._rounds,
            deployed=self._deployed,
            plateau_streak=self._plateau_streak,
            last_reason=self._last_reason,
        )
