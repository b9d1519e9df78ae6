"""Adaptive speculation controller: picks γ (0 = plain decoding) for every engine step.

Acceptance estimator (α, per-token acceptance). Under the standard model (each draft token accepted independently
with probability α until the first rejection), a request that drafted γ tokens and had ``k`` accepted observed
``k`` successes and, if ``k < γ``, one failure (``perf_model.censored_trials``); the likelihood ``α^k (1-α)^[k<γ]``
gives the censored-geometric MLE ``α̂ = Σk / Σ(k + [k<γ])``. We keep *discounted* sums of successes and trials
(numerator and denominator, not a ratio of per-step ratios, which would be biased): per request with rate
``ema_short`` per step and globally (batch totals) with rate ``ema_long`` per step. Sums decay on every step,
including plain-decoding steps that carry no acceptance information, so stale estimates lose weight while their
ratio is kept. A request's estimate is shrunk towards the global one with ``request_prior_trials`` pseudo-trials:
``α_i = (s_i + w·α_g) / (t_i + w)``; unknown requests use α_g.

Decision (mode "adaptive"): the predicted speedup curve of the running batch (perf_model) gives a
candidate argmax γ; the controller switches to it only when its predicted gain over the current γ
exceeds ``hysteresis`` (relative) on ``confirm_steps`` consecutive steps, and the current γ has been
kept ``min_dwell_steps`` steps. After ``reprobe_interval_steps`` steps without speculation, and at cold
start, it runs ``probe_steps`` steps at ``probe_gamma`` so estimates refresh and an improved draft gets
used again (``on_draft_updated()`` also schedules a probe); the decision right after a probe needs no
confirmation. A probe is not free: its steps cost more than plain ones where speculation does not pay, and
the draft must first catch up on every position decoded since it last ran (a draft prefill over batch ×
interval tokens). So each probe that leaves speculation off multiplies the interval by ``reprobe_backoff``
(up to ``reprobe_max_interval_steps``); a probe that turns speculation on, or a new draft, resets it.
At large batches a probe drafts for only ``probe_max_requests`` of the running requests (the least-observed
ones, kept for the whole probe): the others decode one token in the same target pass, so the probe's extra
target rows are k·γ instead of b·γ and the catch-up covers k sequences; α is per draft token, so a few
requests measure it as well as the whole batch.
Pure Python, no torch. Request ids are strings (the scheduler's ids).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from tide_trt.config import ControllerConfig
from tide_trt.online.perf_model import (
    LatencyProfile,
    argmax_gamma,
    best_gamma,
    censored_trials,
    mean_expected_tokens,
    step_cost_ratios,
)

logger = logging.getLogger(__name__)

_MAX_TRACKED = 4096  # per-request estimates kept when forget() is not called
_MEASURED_EMA = 0.1  # rate of the measured-speedup EMA (a metric only)
_DRAFT_UPDATE_KEEP = 0.1  # weight kept by old estimates when a new draft is deployed
_MIN_MASS = 1e-6  # discounted trial counts are not decayed below this (no underflow to 0/0)
_PRIOR_TRIALS = 1.0  # weight (in trials) of prior_acceptance in the global estimate: a probe outweighs it
_GOOD_DRAFT_ALPHA = 0.8  # "a better draft": the acceptance a well-trained EAGLE-3 head reaches in-domain


@dataclass(frozen=True)
class ControllerState:
    """Metrics snapshot of the controller (no tensors)."""

    mode: str
    gamma: int  # γ returned by the last choose_gamma (the probe γ while probing)
    committed_gamma: int  # γ the decision rule settled on
    global_alpha: float  # α̂ over all requests: discounted Σk / Σ(k + [k<γ]) (censored trials)
    predicted_speedup: float  # of `gamma` for the last batch, vs plain decoding
    measured_speedup: float | None  # EMA of measured tokens/s at `gamma` / profiled plain tokens/s
    steps: int
    steps_since_switch: int
    steps_without_speculation: int
    num_switches: int
    probing: bool
    probe_steps_left: int
    num_probes: int
    reprobe_interval: int  # steps without speculation before the next probe (backed off after failed probes)
    draft_limited: bool  # off for lack of acceptance although a better draft would pay (online training helps)
    tracked_requests: int


class AdaptiveController:
    """Chooses γ per step from the cost model and online acceptance estimates (see module docstring)."""

    def __init__(
        self, config: ControllerConfig, profile: LatencyProfile, gamma_max: int, static_gamma: int
    ) -> None:
        self.config = config
        self.profile = profile
        self.gamma_max = max(int(gamma_max), 0)
        self.static_gamma = min(max(int(static_gamma), 0), self.gamma_max)
        self.probe_gamma = min(max(int(config.probe_gamma), 1), self.gamma_max)
        self._w = float(config.request_prior_trials)
        prior = float(config.prior_acceptance)
        self._global = [prior * _PRIOR_TRIALS, _PRIOR_TRIALS]  # discounted [Σk, Σtrials]
        self._req: dict[str, list[float]] = {}  # request id -> discounted [Σk, Σtrials]
        self._ratios: dict[int, list[float]] = {}
        self._measured: dict[int, float] = {}
        self._committed = 0
        self._last_gamma = 0
        self._predicted = 1.0
        self._steps = 0
        self._since_switch = config.min_dwell_steps
        self._streak = 0  # consecutive decisions on which a switch was predicted to gain > hysteresis
        self._after_probe = False
        self._steps_off = 0
        self._switches = 0
        self._probes = 0
        self._probe_left = 0
        self._probe_pending = config.mode == "adaptive" and self._probing_enabled()
        self._failed_probes = 0  # consecutive probes after which speculation stayed off
        self._last_batch = 0
        self._headroom: dict[int, bool] = {}
        self._probe_members: list[str] = []  # requests the current probe drafts for (empty: all)
        self._drafting: frozenset[str] | None = None  # requests drafting at the γ last returned (None: all)

    # ------------------------------------------------------------------ estimates
    def _probing_enabled(self) -> bool:
        return self.gamma_max > 0 and self.config.probe_steps > 0

    @property
    def global_alpha(self) -> float:
        s, t = self._global
        return s / t if t > 1e-12 else self.config.prior_acceptance

    def acceptance(self, request_id: str, global_alpha: float | None = None) -> float:
        """Current α estimate of one request (the global estimate for an unknown request)."""
        g = self.global_alpha if global_alpha is None else global_alpha
        est = self._req.get(request_id)
        if est is None:
            return g
        return (est[0] + self._w * g) / (est[1] + self._w) if est[1] + self._w > 1e-12 else g

    def speedup_curve(self, request_ids: Sequence[str]) -> list[float]:
        """Predicted speedup vs plain decoding of each γ in 0..gamma_max for this batch."""
        b = len(request_ids)
        ratios = self._ratios.get(b)
        if ratios is None:
            ratios = step_cost_ratios(b, self.profile, self.gamma_max)
            if len(self._ratios) < 1024:
                self._ratios[b] = ratios
        g = self.global_alpha
        means = mean_expected_tokens([self.acceptance(r, g) for r in request_ids], self.gamma_max)
        return [m * r for m, r in zip(means, ratios, strict=True)]

    # ------------------------------------------------------------------ decisions
    def choose_gamma(self, request_ids: Sequence[str]) -> int:
        """γ for this engine step of the running batch (call once per step)."""
        self._drafting = None
        if not request_ids:
            return 0
        self._steps += 1
        self._last_batch = len(request_ids)
        mode = self.config.mode
        if mode == "off" or self.gamma_max == 0:
            return self._emit(0, 1.0)
        if mode == "static":
            curve = self.speedup_curve(request_ids)
            return self._emit(self.static_gamma, curve[self.static_gamma])
        curve = self.speedup_curve(request_ids)
        self._since_switch += 1
        if self._probe_pending and self._committed == 0:
            self._start_probe("cold start" if self._probes == 0 else "requested")
        if self._probe_left > 0:
            self._probe_left -= 1
            return self._emit_probe(request_ids, curve)
        self._decide(curve)
        if self._committed == 0:
            interval = self.reprobe_interval
            if interval > 0 and self._probing_enabled() and self._steps_off >= interval:
                self._start_probe(f"{self._steps_off} steps without speculation")
                self._probe_left -= 1
                return self._emit_probe(request_ids, curve)
            self._steps_off += 1
        else:
            self._steps_off = 0
        return self._emit(self._committed, curve[self._committed])

    def _decide(self, curve: list[float]) -> None:
        cur = self._committed
        cand = argmax_gamma(curve)
        if cand != cur and curve[cand] > curve[cur] * (1.0 + self.config.hysteresis):
            self._streak += 1
        else:
            self._streak = 0
        # right after a probe, one winning decision suffices: the probe was run to decide
        judging_probe = self._after_probe
        need = 1 if judging_probe else max(self.config.confirm_steps, 1)
        self._after_probe = False
        if self._streak >= need and self._since_switch >= self.config.min_dwell_steps:
            self._streak = 0
            logger.debug("gamma %d -> %d (predicted %.3f -> %.3f)", cur, cand, curve[cur], curve[cand])
            self._committed = cand
            self._since_switch = 0
            self._switches += 1
        if judging_probe:
            self._failed_probes = self._failed_probes + 1 if self._committed == 0 else 0

    @property
    def draft_limited(self) -> bool:
        """Speculation is off (adaptive mode, not probing) although a better draft would pay at this batch size:
        with α = 0.8 the cost model predicts a gain above the hysteresis. Online training can fix this case."""
        if self.config.mode != "adaptive" or self._committed != 0 or self._probe_left > 0 or self._last_batch < 1:
            return False
        b = self._last_batch
        if b not in self._headroom:
            if len(self._headroom) >= 1024:
                self._headroom.clear()
            _, best = best_gamma([_GOOD_DRAFT_ALPHA], b, self.profile, self.gamma_max)
            self._headroom[b] = best > 1.0 + self.config.hysteresis
        return self._headroom[b]

    @property
    def reprobe_interval(self) -> int:
        """Steps without speculation before the next probe: the base interval, backed off per failed probe."""
        base = self.config.reprobe_interval_steps
        if base <= 0:
            return base
        backoff = self.config.reprobe_backoff ** max(self._failed_probes - 1, 0)
        return int(min(base * backoff, max(self.config.reprobe_max_interval_steps, base)))

    def _start_probe(self, why: str) -> None:
        self._probe_pending = False
        self._probe_members = []
        self._probe_left = self.config.probe_steps
        self._steps_off = 0
        self._after_probe = True
        self._probes += 1
        logger.debug("probing gamma=%d for %d steps (%s)", self.probe_gamma, self._probe_left, why)

    def _emit_probe(self, request_ids: Sequence[str], curve: list[float]) -> int:
        """A probe step: γ = probe_gamma for at most probe_max_requests requests (kept across the probe's steps,
        topped up with the least-observed requests when members finish)."""
        k = self.config.probe_max_requests
        if 0 < k < len(request_ids):
            active = set(request_ids)
            members = [r for r in self._probe_members if r in active]
            if len(members) < k:
                chosen = set(members)
                others = sorted((r for r in request_ids if r not in chosen),
                                key=lambda r: self._req[r][1] if r in self._req else 0.0)
                members += others[: k - len(members)]
            self._probe_members = members
            self._drafting = frozenset(members)
        return self._emit(self.probe_gamma, curve[self.probe_gamma])

    def drafting(self, request_ids: Sequence[str]) -> Collection[str] | None:
        """The requests that draft at the γ last returned by choose_gamma: a probe's members, else None (all)."""
        return self._drafting

    def _emit(self, gamma: int, predicted: float) -> int:
        self._last_gamma = gamma
        self._predicted = predicted
        return gamma

    def request_probe(self) -> None:
        """Probe at the next step if speculation is off (e.g. a new draft was deployed)."""
        self._probe_pending = self.config.mode == "adaptive" and self._probing_enabled()

    def on_draft_updated(self) -> None:
        """A new draft was refitted: old acceptance evidence keeps only a little weight; probe if off."""
        for est in self._req.values():
            est[0] *= _DRAFT_UPDATE_KEEP
            est[1] *= _DRAFT_UPDATE_KEEP
        self._global = [v * _DRAFT_UPDATE_KEEP for v in self._global]
        self._measured.clear()
        self._failed_probes = 0
        self.request_probe()

    # ------------------------------------------------------------------ observations
    def observe(
        self,
        request_ids: Sequence[str],
        gamma: int | Sequence[int],
        num_accepted: Sequence[int],
        step_seconds: float | None = None,
    ) -> None:
        """Record one verification step: ``num_accepted[i]`` of the ``gamma`` (or ``gamma[i]``: a probe drafts for
        some requests only) drafts kept for request i. The step time feeds the measured speedup when every
        request drafted the same γ."""
        if len(num_accepted) != len(request_ids):
            raise ValueError(f"{len(request_ids)} request ids but {len(num_accepted)} accepted counts")
        gammas = [int(gamma)] * len(request_ids) if isinstance(gamma, int) else [int(g) for g in gamma]
        if len(gammas) != len(request_ids):
            raise ValueError(f"{len(request_ids)} request ids but {len(gammas)} draft lengths")
        uniform = len(set(gammas)) <= 1
        keep_r = 1.0 - self.config.ema_short
        tot_k = tot_t = 0
        for rid, g, k_raw in zip(request_ids, gammas, num_accepted, strict=True):
            k = min(max(int(k_raw), 0), g) if g > 0 else 0
            est = self._req.get(rid)
            if est is None:
                if len(self._req) >= _MAX_TRACKED:
                    self._req.pop(next(iter(self._req)))
                est = self._req[rid] = [0.0, 0.0]
            if est[1] > _MIN_MASS:  # decay keeps the ratio; stop before underflow
                est[0] *= keep_r
                est[1] *= keep_r
            if g > 0:
                trials = censored_trials(k, g)
                est[0] += k
                est[1] += trials
                tot_k += k
                tot_t += trials
        keep_g = 1.0 - self.config.ema_long if self._global[1] > _MIN_MASS else 1.0
        self._global[0] = self._global[0] * keep_g + tot_k
        self._global[1] = self._global[1] * keep_g + tot_t
        if step_seconds and step_seconds > 0.0 and request_ids and uniform:
            b = len(request_ids)
            tokens = tot_k + b  # accepted + one recovered/bonus token per request
            ratio = tokens * self.profile.target(b) / (b * step_seconds)
            old = self._measured.get(gammas[0])
            self._measured[gammas[0]] = ratio if old is None else old + _MEASURED_EMA * (ratio - old)

    def forget(self, request_id: str) -> None:
        """Drop a finished request's estimate."""
        self._req.pop(request_id, None)

    def snapshot(self) -> ControllerState:
        return ControllerState(
            mode=self.config.mode,
            gamma=self._last_gamma,
            committed_gamma=self._committed,
            global_alpha=self.global_alpha,
            predicted_speedup=self._predicted,
            measured_speedup=self._measured.get(self._last_gamma),
            steps=self._steps,
            steps_since_switch=self._since_switch,
            steps_without_speculation=self._steps_off,
            num_switches=self._switches,
            probing=self._probe_left > 0,
            probe_steps_left=self._probe_left,
            num_probes=self._probes,
            reprobe_interval=self.reprobe_interval,
            draft_limited=self.draft_limited,
            tracked_requests=len(self._req),
        )
