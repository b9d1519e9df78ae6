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

Decision (mode "adaptive"): the predicted speedup curve of the running batch (perf_model) gives a candidate argmax
γ; the controller switches to it only when its predicted gain over the current γ exceeds ``hysteresis`` (relative;
none for turning speculation off: a speculation predicted to lose is never kept) on ``confirm_steps`` consecutive
steps, and the current γ has been kept ``min_dwell_steps`` steps. After ``reprobe_interval_steps`` steps without
speculation, and at cold start, it runs ``probe_steps`` steps at ``probe_gamma`` so estimates refresh and an
improved draft gets used again (``on_draft_updated()`` also schedules a probe); the decision right after a probe
needs no confirmation. A probe is not free: its steps cost more than plain ones where speculation does not pay, and
the draft must first catch up on every position decoded since it last ran (a draft prefill over batch × interval
tokens). So each probe that leaves speculation off multiplies the interval by ``reprobe_backoff`` (up to
``reprobe_max_interval_steps``); a probe that turns speculation on, or a new draft, resets it. At large batches a
probe drafts for only ``probe_max_requests`` of the running requests (the least-observed ones, kept for the whole
probe): the others decode one token in the same target pass, so the probe's extra target rows are k·γ instead of
b·γ and the catch-up covers k sequences; α is per draft token, so a few requests measure it as well as the whole
batch.

Cost model and live evidence (issue 21). The step costs come from an ``OnlineCostModel`` (online/cost_model.py):
the start-up profile corrected by every timed decode step (a load factor shared by all shapes, a shape correction
per target token count), so the decision follows the machine as it runs now. Drafting is charged by head rows only
(``head_rows`` of observe; a hybrid drafter's suffix-index rows cost ~0), with the head's share of drafting rows
as an EMA. While speculating, one step in ``plain_probe_interval_steps`` decodes plainly (a *plain probe*), so a
``GoodputGuard`` holds live goodput of speculative and of plain steps under the same load: when speculation's
stays below plain's (by ``guard_margin``) over the last ``guard_window_steps`` steps, with at least
``guard_min_spec_samples`` / ``guard_min_plain_samples`` samples, speculation turns off (counted as a failed
probe) and only a probe may turn it on again — the probe's steps re-teach the cost model what speculation costs
now. ``draft_len_schedule`` is the γ per batch size the corrected model implies at the current α (the per-step
decision is the argmax for the running batch). Per-row lengths (``row_gammas``): hints such as a drafter's
confidence, capped by the step's γ, for the rows that draft.

A hybrid drafter (issue 22) has a second source: a suffix index drafts the rows it is confident on at no draft
cost. Its rows are reported apart (``index_rows`` of observe) and kept out of α, which is the head's acceptance and
drives the head's γ. While the head's committed γ is 0 the index still drafts (``index_off_rows``: an *index step*;
``index_when_off``), with its own ``GoodputGuard`` over the same window fed by index steps and by the plain
steps (one index step in ``plain_probe_interval_steps`` is a plain probe): when index steps' goodput stays below
plain's the index turns off too (plain decoding), and back on after ``reprobe_interval`` steps to be measured again.
Pure Python, no torch. Request ids are strings (the scheduler's ids).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from tide_trt.config import ControllerConfig
from tide_trt.online.cost_model import CostModelState, GoodputGuard, OnlineCostModel
from tide_trt.online.perf_model import (
    LatencyProfile,
    argmax_gamma,
    censored_trials,
    draft_len_schedule,
    mean_expected_tokens,
)

logger = logging.getLogger(__name__)

_MAX_TRACKED = 4096  # per-request estimates kept when forget() is not called
_CATCH_UP_FREE = 2  # catch-up positions per drafting row a decode step carries anyway (after a plain probe: 1)
_HEAD_SHARE_EMA = 0.1  # rate of the EMA of the head's share of drafting rows (hybrid drafters)
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
    predicted_speedup: float  # of `gamma` for the last batch, vs plain decoding (corrected cost model)
    measured_speedup: float | None  # live speculative goodput / live plain goodput over the guard's window
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
    cost: CostModelState | None = None  # the online cost model: load factor, prediction errors
    plain_probes: int = 0  # plain steps run while speculating (live plain goodput for the guard)
    guard_offs: int = 0  # times the guard turned speculation off on live evidence
    guard_samples: tuple[int, int] = (0, 0)  # speculative / plain goodput samples in the guard's window
    head_share: float = 1.0  # EMA of the head's share of drafting rows
    schedule: dict[int, int] = field(default_factory=dict)  # γ per batch size the corrected model implies now
    index_drafting: bool = False  # the suffix index drafts while the head is off (index steps)
    index_accepted_per_token: float | None = None  # discounted accepted / drafted tokens of index rows
    index_measured_speedup: float | None = None  # live goodput of index steps / plain steps over the window
    index_offs: int = 0  # times the index guard turned index steps off


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
        self.cost = OnlineCostModel(profile, config.cost_load_rate, config.cost_shape_rate, config.cost_error_rate)
        self.guard = GoodputGuard(config.guard_window_steps, config.guard_min_spec_samples,
                                  config.guard_min_plain_samples, config.guard_margin)
        self._head_share = 1.0
        # suffix-index rows (hybrid drafters): discounted [accepted, drafted] tokens, guard, on/off and back-off
        self._index = [0.0, 0.0]
        self.index_guard = GoodputGuard(config.guard_window_steps, config.guard_min_spec_samples,
                                        config.guard_min_plain_samples, config.guard_margin)
        self._index_on = config.mode == "adaptive" and config.index_when_off
        self._index_run = 0  # index steps since index drafting turned on (plain probes every N of them)
        self._index_off_steps = 0
        self._index_strikes = 0
        self._index_offs = 0
        self._kind = "plain"  # the last emitted step: "spec" | "plain" | "probe" (speculation probe) | "index"
        self._spec_run = 0  # speculative steps since speculation turned on (plain probes every N of them)
        self._plain_probes = 0
        self._guard_offs = 0
        self._guard_hold = False  # after a guard turn-off only a probe's verdict may turn speculation on
        self._guard_strikes = 0  # guard turn-offs not yet followed by a whole window of speculation that paid
        self._spec_since_guard = 0  # speculative steps since the last guard turn-off
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

    def cost_ratios(self, batch_size: int) -> list[float]:
        """``r[γ] = P̂(b, 0) / P̂(b, γ)`` from the corrected cost model, head rows = b · head share."""
        b = max(int(batch_size), 1)
        plain = self.cost.step_seconds(b, 0)
        heads = b * self._head_share
        return [1.0] + [plain / self.cost.step_seconds(b, g, heads) for g in range(1, self.gamma_max + 1)]

    def speedup_curve(self, request_ids: Sequence[str]) -> list[float]:
        """Predicted speedup vs plain decoding of each γ in 0..gamma_max for this batch (corrected costs)."""
        ratios = self.cost_ratios(len(request_ids))
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
            return self._emit(self.static_gamma, curve[self.static_gamma], "spec")
        curve = self.speedup_curve(request_ids)
        self._since_switch += 1
        if self._probe_pending and self._committed == 0:
            self._start_probe("cold start" if self._probes == 0 else "requested")
        if self._probe_left > 0:
            self._probe_left -= 1
            return self._emit_probe(request_ids, curve)
        self._check_guard()
        self._decide(curve)
        if self._committed == 0:
            self._spec_run = 0
            interval = self.reprobe_interval
            if interval > 0 and self._probing_enabled() and self._steps_off >= interval:
                self._start_probe(f"{self._steps_off} steps without speculation")
                self._probe_left -= 1
                return self._emit_probe(request_ids, curve)
            self._steps_off += 1
            return self._emit_head_off()
        self._steps_off = 0
        self._spec_run += 1
        self._spec_since_guard += 1
        if self._guard_strikes and self._spec_since_guard > self.guard.window_steps:
            self._guard_strikes = 0  # a whole window of speculation the guard let pass: back-off forgiven
        every = self.config.plain_probe_interval_steps
        if every > 0 and self._spec_run % every == 0:  # a plain probe: live plain goodput under today's load
            self._plain_probes += 1
            return self._emit(0, 1.0)
        return self._emit(self._committed, curve[self._committed], "spec")

    def _emit_head_off(self) -> int:
        """A step with the head off: an index step while index drafting is on (a plain probe every
        plain_probe_interval_steps of them), else plain; the index guard's verdict and back-off are applied here."""
        if not (self.config.mode == "adaptive" and self.config.index_when_off):
            return self._emit(0, 1.0)
        if self._index_on and self.index_guard.speculation_loses(self._steps):
            n_index, n_plain = self.index_guard.counts(self._steps)
            logger.info("index guard: index steps measured %.3fx plain over the last %d steps (%d/%d samples); "
                        "index drafting off", self.index_guard.measured_speedup(self._steps) or 0.0,
                        self.index_guard.window_steps, n_index, n_plain)
            self._index_on = False
            self._index_offs += 1
            self._index_strikes += 1
            self._index_off_steps = 0
            self.index_guard.clear_speculative()
        if not self._index_on:
            self._index_off_steps += 1
            if self._index_off_steps < self._index_interval():
                return self._emit(0, 1.0)
            self._index_on = True  # measured again: the load or the traffic may have changed
            self._index_run = 0
        self._index_run += 1
        if self._index_strikes and self._index_run > self.index_guard.window_steps:
            self._index_strikes = 0  # a whole window of index steps the guard let pass: back-off forgiven
        every = self.config.plain_probe_interval_steps
        if every > 0 and self._index_run % every == 0:
            self._plain_probes += 1
            return self._emit(0, 1.0)
        return self._emit(0, 1.0, "index")

    def _index_interval(self) -> int:
        """Steps with index drafting off before it is measured again: the re-probe interval, backed off per
        index-guard turn-off."""
        return self._backed_off(max(self.config.reprobe_interval_steps, 1), self._index_strikes)

    def _backed_off(self, base: int, failures: int) -> int:
        """`base` × reprobe_backoff per failure after the first, capped at reprobe_max_interval_steps."""
        backoff = self.config.reprobe_backoff ** max(failures - 1, 0)
        return int(min(base * backoff, max(self.config.reprobe_max_interval_steps, base)))

    def index_off_rows(self) -> bool:
        """Whether rows the head does not draft this step may draft from a confident suffix index: on index steps,
        and beside a probe's members while index drafting is on; never on plain probes or in mode off/static."""
        return self._kind == "index" or (self._kind == "probe" and self._index_on)

    def _check_guard(self) -> None:
        """Turn speculation off when its live goodput has stayed below plain's over the guard's window."""
        if self._committed == 0 or self.config.plain_probe_interval_steps <= 0:
            return
        if not self.guard.speculation_loses(self._steps):
            return
        n_spec, n_plain = self.guard.counts(self._steps)
        logger.info("guard: speculation at gamma=%d measured %.3fx plain over the last %d steps (%d/%d samples); "
                    "off until a probe says otherwise", self._committed, self.guard.measured_speedup(self._steps)
                    or 0.0, self.guard.window_steps, n_spec, n_plain)
        self._committed = 0
        self._since_switch = 0
        self._streak = 0
        self._switches += 1
        self._guard_offs += 1
        self._guard_strikes += 1  # a probe that turns speculation on again does not reset this back-off
        self._spec_since_guard = 0
        self._guard_hold = True
        self._steps_off = 0
        self.guard.clear_speculative()

    def _decide(self, curve: list[float]) -> None:
        cur = self._committed
        cand = argmax_gamma(curve)
        # turning speculation off needs no margin: plain decoding is the floor, and a speculation predicted to
        # lose (curve[cur] < 1) is not kept by the hysteresis band; switching on or between γs needs the margin
        margin = 0.0 if cand == 0 else self.config.hysteresis
        if cand != cur and curve[cand] > curve[cur] * (1.0 + margin):
            self._streak += 1
        else:
            self._streak = 0
        # right after a probe, one winning decision suffices: the probe was run to decide
        judging_probe = self._after_probe
        need = 1 if judging_probe else max(self.config.confirm_steps, 1)
        self._after_probe = False
        if judging_probe:
            self._guard_hold = False
        elif self._guard_hold and cur == 0:
            self._streak = 0  # the guard saw speculation lose: the model alone may not turn it back on
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
        means = mean_expected_tokens([_GOOD_DRAFT_ALPHA], self.gamma_max)
        best = max(m * r for m, r in zip(means, self.cost_ratios(self._last_batch), strict=True))
        return best > 1.0 + self.config.hysteresis

    def draft_len_schedule(self, batch_sizes: Sequence[int] | None = None, alpha: float | None = None
                           ) -> dict[int, int]:
        """γ per batch size the corrected cost model implies at acceptance α (default: the global estimate),
        for the profiled batch sizes by default: TRT-LLM's draft_len_schedule, derived instead of configured."""
        sizes = list(batch_sizes) if batch_sizes is not None else list(self.profile.draft_s)
        a = self.global_alpha if alpha is None else alpha
        return draft_len_schedule(a, lambda b, g: self.cost.step_seconds(b, g, b * self._head_share),
                                  self.gamma_max, sizes)

    @property
    def reprobe_interval(self) -> int:
        """Steps without speculation before the next probe: the base interval, backed off per failed probe."""
        base = self.config.reprobe_interval_steps
        if base <= 0:
            return base
        return self._backed_off(base, self._failed_probes + self._guard_strikes)

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
        return self._emit(self.probe_gamma, curve[self.probe_gamma], "probe")

    @property
    def last_gamma(self) -> int:
        """γ returned by the last choose_gamma."""
        return self._last_gamma

    def drafting(self, request_ids: Sequence[str]) -> Collection[str] | None:
        """The requests that draft at the γ last returned by choose_gamma: a probe's members, else None (all)."""
        return self._drafting

    def row_gammas(self, request_ids: Sequence[str], hints: Mapping[str, int] | None) -> dict[str, int] | None:
        """Per-row draft lengths for the step choose_gamma just planned: a hint per request (e.g. from the
        drafter's confidence; 0 = this row decodes plainly), capped by the step's γ, for the rows that draft.
        None (every row at the step's γ) when the step does not speculate or no hint applies: a hint never
        turns speculation on, lengthens a row past what the controller chose, or makes a probe's non-member draft."""
        if not hints or self._last_gamma <= 0:
            return None
        drafting = self._drafting
        out = {rid: min(max(int(hints[rid]), 0), self._last_gamma) for rid in request_ids
               if rid in hints and (drafting is None or rid in drafting)}
        return out or None

    def _emit(self, gamma: int, predicted: float, kind: str = "plain") -> int:
        self._last_gamma = gamma
        self._predicted = predicted
        self._kind = kind if gamma > 0 or kind == "index" else "plain"
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
        self.guard.clear_speculative()  # the old draft's goodput says nothing about the new one
        self._failed_probes = 0
        self._guard_strikes = 0
        self.request_probe()

    # ------------------------------------------------------------------ observations
    def observe(
        self,
        request_ids: Sequence[str],
        gamma: int | Sequence[int],
        num_accepted: Sequence[int],
        step_seconds: float | None = None,
        head_rows: int | None = None,
        catch_up: int = 0,
        index_rows: Collection[str] | None = None,
    ) -> None:
        """Record one verification step: ``num_accepted[i]`` of the ``gamma`` (or ``gamma[i]``: a probe drafts for
        some requests only, a drafter may size rows itself) drafts kept for request i. ``step_seconds`` (None: not
        a decode-only step) corrects the cost model and feeds the guard; ``head_rows``: rows the draft head
        drafted (None: every drafting row; rows drafted by a suffix index alone cost ~0 draft time). ``catch_up``:
        positions the draft caught up on first (after a prompt or an off period); a step with more than
        ``_CATCH_UP_FREE`` per drafting row ran a draft prefill the cost model does not describe, so it is not fed
        to the model (nor to its error) — the guard still counts it: it is part of speculation's real cost.
        ``index_rows``: requests whose rows a suffix index drafted this step — their acceptance is the index's, not
        the head's, so it is tallied apart and kept out of α."""
        if len(num_accepted) != len(request_ids):
            raise ValueError(f"{len(request_ids)} request ids but {len(num_accepted)} accepted counts")
        gammas = [int(gamma)] * len(request_ids) if isinstance(gamma, int) else [int(g) for g in gamma]
        if len(gammas) != len(request_ids):
            raise ValueError(f"{len(request_ids)} request ids but {len(gammas)} draft lengths")
        keep_r = 1.0 - self.config.ema_short
        tot_k = tot_t = 0
        index_k = index_g = 0
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
            if g > 0 and index_rows is not None and rid in index_rows:  # the index's acceptance, not the head's
                index_k += k
                index_g += g
            elif g > 0:
                trials = censored_trials(k, g)
                est[0] += k
                est[1] += trials
                tot_k += k
                tot_t += trials
        keep_g = 1.0 - self.config.ema_long if self._global[1] > _MIN_MASS else 1.0
        self._global[0] = self._global[0] * keep_g + tot_k
        self._global[1] = self._global[1] * keep_g + tot_t
        if index_g:
            keep_i = 1.0 - self.config.ema_long if self._index[1] > _MIN_MASS else 1.0
            self._index = [self._index[0] * keep_i + index_k, self._index[1] * keep_i + index_g]
        drafting_rows = sum(1 for g in gammas if g > 0)
        heads = drafting_rows if head_rows is None else min(max(int(head_rows), 0), drafting_rows)
        if drafting_rows:
            self._head_share += _HEAD_SHARE_EMA * (heads / drafting_rows - self._head_share)
        if step_seconds and step_seconds > 0.0 and request_ids:
            b = len(request_ids)
            if catch_up <= _CATCH_UP_FREE * drafting_rows:
                self.cost.observe(sum(gammas) + b, max(gammas), heads, step_seconds)
            tokens = tot_k + index_k + b  # accepted + one recovered/bonus token per request
            rate = GoodputGuard.normalised_rate(tokens, b, step_seconds, self.profile.target(b))
            if drafting_rows == 0:
                self.guard.add(False, self._steps, rate)
                self.index_guard.add(False, self._steps, rate)
            elif self._kind == "spec":  # a probe's steps (few rows, catch-up) are not speculation's goodput
                self.guard.add(True, self._steps, rate)
            elif self._kind == "index":
                self.index_guard.add(True, self._steps, rate)

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
            measured_speedup=self.guard.measured_speedup(self._steps),
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
            cost=self.cost.snapshot(),
            plain_probes=self._plain_probes,
            guard_offs=self._guard_offs,
            guard_samples=self.guard.counts(self._steps),
            head_share=self._head_share,
            schedule=self.draft_len_schedule() if self.gamma_max > 0 else {},
            index_drafting=self._index_on and self._committed == 0,
            index_accepted_per_token=self._index[0] / self._index[1] if self._index[1] > _MIN_MASS else None,
            index_measured_speedup=self.index_guard.measured_speedup(self._steps),
            index_offs=self._index_offs,
        )
