"""The cost model corrected online, and the guard on live goodput (issue 21).

**OnlineCostModel.** The start-up profile (`LatencyProfile`: T(n), D(b)) is the prior; every timed decode step
corrects it. A step that verified ``n = Σ(γᵢ+1)`` target tokens after a draft chain of ``g = max γᵢ`` steps over
``h`` head rows is predicted by the prior as ``P(n, g, h) = T(n) + g·D(h)`` (rows drafted by a suffix index cost
~0 draft time, so only head rows are charged). The corrected prediction is ::

    P̂(n, g, h) = k · P(n, g, h) · exp(L + s(n))

with ``L`` a load offset shared by every shape (another process on the cores slows every shape alike),
``s(n)`` a per-token-count shape correction (linear in n between the counts seen, the nearest one outside them)
and ``k`` a bias factor (below).
A step seen at n updates L (``cost_load_rate``) and then s(n) with what L left (``cost_shape_rate``; a count not
seen for ``_STALE_STEPS`` steps restarts as the running mean of its new steps, so the 4 steps of a probe replace a
stale value instead of nudging it). L alone is not identifiable when few shapes run (speculation off: only n = b);
after every step the recency-weighted mean of the s(n) (weights decay by ``cost_load_rate`` per step, + 1 when n
is seen) is moved into L, so L is the load of the shapes running now and s(n) their deviations from it. All of it
is in log space, and one step's residual is clamped to ±log 3 (a stall moves nothing far). A stale s(n) relaxes
by ``_STALE_DECAY`` per step towards what the fresh counts imply at n (interpolated; 0 without any): the spell
that set it may be over, and a shape the running steps do not measure follows its measured neighbours. A step
over more tokens never costs less: the corrected T̂(n) is at least the largest corrected T̂(m) of a count m < n
seen (a probe that finds γ = 2 slow makes γ = 8 no cheaper). L and s(n) live in log space, i.e. they track the
typical (geometric-mean) step; throughput depends on the arithmetic mean, which on a shared machine's heavy-tailed
step times (descheduled threads) is larger, so predictions carry one more factor ``k``: an EMA
(``_BIAS_RATE``) of measured / log-model seconds (each ratio capped at ``_BIAS_CAP``). It scales every shape
alike, so it changes no γ decision, only the predicted seconds. The decision uses
``P̂`` (``step_seconds``), not only the metric.

Prediction error: EMAs (``cost_error_rate``) of the predicted seconds (made before the step is observed, for the
corrected and for the start-up model) and of the measured seconds; error = |pred − measured| / measured. Running
sums are kept too (benchmarks difference them over a phase). Over a window this is the error of the predicted
throughput, the quantity the γ decision rests on (paper: within 9 %).

**GoodputGuard.** Samples of live goodput, normalised by the start-up plain rate of the same batch size
(``tokens · T_prior(b) / (b · seconds)``, so batch sizes mix), of speculative steps and of plain steps (γ = 0 for
every row: steps while speculation is off, and the plain probes the controller runs while it is on). Both were
taken under the same load, so their ratio is a like-for-like measured speedup. Only the samples of the last
``window_steps`` controller steps count.

Pure Python, no torch.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass

from tide_trt.online.perf_model import LatencyProfile

_MAX_LOG_STEP = math.log(3.0)  # one step's log residual is clamped to ±log 3 (a stall, a page fault)
_STALE_STEPS = 32  # a token count not seen for this many steps is re-measured afresh (2 plain-probe intervals)
_MAX_KEYS = 4096
_BIAS_RATE = 0.05  # ~20 steps: the arithmetic/geometric gap of the step-time noise, not the load itself
_BIAS_CAP = 4.0  # one stall counts as at most 4x its predicted seconds in that gap
_STALE_DECAY = 1.0 / 256  # per step, a stale s(n) relaxes towards its fresh neighbours: a cost measured under a
# spell that has passed is forgotten within a few hundred steps unless measured again


@dataclass(frozen=True)
class CostModelState:
    """Metrics snapshot of an OnlineCostModel (no tensors)."""

    load_factor: float  # exp(L): how much slower (> 1) or faster than the start-up profile the machine runs now
    steps_observed: int
    error: float | None  # |EMA predicted − EMA measured| / EMA measured, corrected model
    error_startup: float | None  # the same for the start-up profile alone
    predicted_seconds: float  # running sums over observed steps (corrected predictions)
    predicted_seconds_startup: float
    measured_seconds: float


def _interp_log(xs: list[int], ys: list[float], n: int) -> float:
    """Piecewise-linear in n between the points, the nearest end point outside them, 0 without points."""
    if not xs:
        return 0.0
    i = bisect.bisect_left(xs, n)
    if i < len(xs) and xs[i] == n:
        return ys[i]
    if i == 0:
        return ys[0]
    if i == len(xs):
        return ys[-1]
    x0, x1 = xs[i - 1], xs[i]
    return ys[i - 1] + (ys[i] - ys[i - 1]) * (n - x0) / (x1 - x0)


class OnlineCostModel:
    """Start-up profile × online corrections (see module docstring)."""

    def __init__(self, prior: LatencyProfile, load_rate: float = 0.1, shape_rate: float = 0.2,
                 error_rate: float = 0.02) -> None:
        self.prior = prior
        self.load_rate = float(load_rate)
        self.shape_rate = float(shape_rate)
        self.error_rate = float(error_rate)
        self._load = 0.0  # L
        self._shape_n: list[int] = []  # token counts seen, sorted
        self._shape_s: list[float] = []  # s(n) of each
        self._shape_w: list[float] = []  # recency weight of each (normalisation of L)
        self._shape_seen: list[int] = []  # step it was last seen
        self._shape_run: list[int] = []  # steps seen since it was last stale
        self._steps = 0
        self._ema: list[float] | None = None  # [corrected pred, start-up pred, measured]
        self._sums = [0.0, 0.0, 0.0]
        self._running_max: list[float] = []  # corrected T̂ at the counts seen, running max over n
        self._bias = 1.0  # k: arithmetic-mean correction of the log-space model

    # ---------------------------------------------------------------- predictions
    def prior_step_seconds(self, tokens: int, chain: int, head_rows: int) -> float:
        """P(n, g, h) = T(n) + g·D(h): the start-up profile's seconds for one step (h = 0: no draft cost)."""
        draft = chain * self.prior.draft(head_rows) if chain > 0 and head_rows > 0 else 0.0
        return self.prior.target(max(tokens, 1)) + draft

    def _log_shape(self, n: int) -> float:
        return _interp_log(self._shape_n, self._shape_s, n)

    def _relax_stale(self) -> None:
        seen, now = self._shape_seen, self._steps
        fresh = [j for j in range(len(seen)) if now - seen[j] <= _STALE_STEPS]
        if len(fresh) == len(seen):
            return
        fx = [self._shape_n[j] for j in fresh]
        fy = [self._shape_s[j] for j in fresh]
        for j in range(len(seen)):
            if now - seen[j] > _STALE_STEPS:
                target = _interp_log(fx, fy, self._shape_n[j])
                self._shape_s[j] += _STALE_DECAY * (target - self._shape_s[j])

    def correction(self, tokens: int) -> float:
        """exp(L + s(n)): the factor the corrected model applies to the prior at n target tokens."""
        return math.exp(self._load + self._log_shape(tokens))

    def _floor(self, tokens: int) -> float:
        """Largest corrected T̂(m) over the counts m < n seen (0 if none)."""
        i = bisect.bisect_left(self._shape_n, tokens)
        return self._running_max[i - 1] if i > 0 else 0.0

    def _update_floor(self) -> None:
        best, out = 0.0, []
        for n, s in zip(self._shape_n, self._shape_s, strict=True):
            best = max(best, self.prior.target(n) * math.exp(self._load + s))
            out.append(best)
        self._running_max = out

    def _predict(self, tokens: int, draft_prior: float) -> float:
        return self._bias * self._predict_log(tokens, draft_prior)

    def _predict_log(self, tokens: int, draft_prior: float) -> float:
        n = max(int(tokens), 1)
        scaled = (self.prior.target(n) + draft_prior) * self.correction(n)
        return max(scaled, self._floor(n) + draft_prior * math.exp(self._load))

    def predict(self, tokens: int, chain: int, head_rows: int) -> float:
        """P̂(n, g, h): corrected seconds of a step over n target tokens, g draft steps, h head rows."""
        draft = chain * self.prior.draft(head_rows) if chain > 0 and head_rows > 0 else 0.0
        return self._predict(tokens, draft)

    def step_seconds(self, batch: int, gamma: int, head_rows: float | None = None) -> float:
        """Corrected seconds of a uniform step: b rows verifying γ drafts each (n = b·(γ+1)); ``head_rows`` of
        them drafted by the head (None: all b)."""
        b = max(int(batch), 1)
        h = b if head_rows is None else head_rows
        draft = gamma * self.prior.draft(h) if gamma > 0 and h > 0 else 0.0
        return self._predict(b * (gamma + 1), draft)

    def target(self, n: int) -> float:
        """Corrected T(n)."""
        return self._predict(n, 0.0)

    # ---------------------------------------------------------------- observations
    def observe(self, tokens: int, chain: int, head_rows: int, seconds: float) -> None:
        """One timed decode step (no prompt chunk in it)."""
        if not (seconds > 0.0 and math.isfinite(seconds)) or tokens < 1:
            return
        prior = self.prior_step_seconds(tokens, chain, head_rows)
        predicted = self.predict(tokens, chain, head_rows)
        typical = predicted / self._bias
        self._bias += _BIAS_RATE * (min(seconds / typical, _BIAS_CAP) - self._bias)
        obs = (predicted, prior, seconds)
        if self._ema is None:
            self._ema = list(obs)
        else:
            r = self.error_rate
            self._ema = [e + r * (o - e) for e, o in zip(self._ema, obs, strict=True)]
        self._sums = [s + o for s, o in zip(self._sums, obs, strict=True)]
        self._steps += 1
        y = math.log(seconds / prior)
        s_n = self._log_shape(tokens)
        e = max(-_MAX_LOG_STEP, min(_MAX_LOG_STEP, y - self._load - s_n))
        self._load += self.load_rate * e
        rest = max(-_MAX_LOG_STEP, min(_MAX_LOG_STEP, y - self._load - s_n))
        i = bisect.bisect_left(self._shape_n, tokens)
        if not (i < len(self._shape_n) and self._shape_n[i] == tokens):
            if len(self._shape_n) >= _MAX_KEYS:
                return
            self._shape_n.insert(i, tokens)
            self._shape_s.insert(i, s_n)
            self._shape_w.insert(i, 0.0)
            self._shape_seen.insert(i, self._steps)
            self._shape_run.insert(i, 0)
        if self._steps - self._shape_seen[i] > _STALE_STEPS:
            self._shape_run[i] = 0
        rate = max(self.shape_rate, 1.0 / (self._shape_run[i] + 1))
        self._shape_run[i] += 1
        self._shape_seen[i] = self._steps
        self._shape_s[i] = s_n + rate * rest
        keep = 1.0 - self.load_rate
        self._relax_stale()
        w = self._shape_w
        for j in range(len(w)):
            w[j] *= keep
        w[i] += 1.0
        mean = sum(wj * sj for wj, sj in zip(w, self._shape_s, strict=True)) / sum(w)
        self._load += mean
        self._shape_s = [sj - mean for sj in self._shape_s]
        self._update_floor()

    @property
    def load_factor(self) -> float:
        return math.exp(self._load)

    def _error(self, k: int) -> float | None:
        if self._ema is None or self._ema[2] <= 0.0:
            return None
        return abs(self._ema[k] - self._ema[2]) / self._ema[2]

    @property
    def error(self) -> float | None:
        """Windowed prediction error of the corrected model (None before the first timed step)."""
        return self._error(0)

    @property
    def error_startup(self) -> float | None:
        """The same error for the start-up profile alone (what the controller used before issue 21)."""
        return self._error(1)

    def snapshot(self) -> CostModelState:
        return CostModelState(load_factor=self.load_factor, steps_observed=self._steps, error=self.error,
                              error_startup=self.error_startup, predicted_seconds=self._sums[0],
                              predicted_seconds_startup=self._sums[1], measured_seconds=self._sums[2])


class GoodputGuard:
    """Windows of normalised live goodput for speculative and plain steps (see module docstring)."""

    def __init__(self, window_steps: int, min_spec: int, min_plain: int, margin: float) -> None:
        self.window_steps = max(int(window_steps), 1)
        self.min_spec = max(int(min_spec), 1)
        self.min_plain = max(int(min_plain), 1)
        self.margin = float(margin)
        self._spec: deque[tuple[int, float]] = deque()
        self._plain: deque[tuple[int, float]] = deque()

    @staticmethod
    def normalised_rate(tokens: int, batch: int, seconds: float, plain_seconds: float) -> float:
        """Output tokens/s of a step over the start-up plain rate of its batch size (b / T_prior(b))."""
        return tokens * plain_seconds / (max(batch, 1) * seconds)

    def add(self, speculative: bool, step: int, value: float) -> None:
        if not (value > 0.0 and math.isfinite(value)):
            return
        (self._spec if speculative else self._plain).append((step, value))
        self._prune(step)

    def _prune(self, step: int) -> None:
        oldest = step - self.window_steps
        for q in (self._spec, self._plain):
            while q and q[0][0] <= oldest:
                q.popleft()

    def clear_speculative(self) -> None:
        """Forget speculation's samples (their verdict was acted on; the next ones come from a new probe)."""
        self._spec.clear()

    def counts(self, step: int) -> tuple[int, int]:
        self._prune(step)
        return len(self._spec), len(self._plain)

    def means(self, step: int) -> tuple[float | None, float | None]:
        """Mean normalised goodput of speculative and of plain steps in the window (None: no sample)."""
        self._prune(step)
        spec = sum(v for _, v in self._spec) / len(self._spec) if self._spec else None
        plain = sum(v for _, v in self._plain) / len(self._plain) if self._plain else None
        return spec, plain

    def measured_speedup(self, step: int) -> float | None:
        """Live speculative goodput / live plain goodput over the window (both measured under the same load)."""
        spec, plain = self.means(step)
        return spec / plain if spec is not None and plain is not None else None

    def speculation_loses(self, step: int) -> bool:
        """Enough samples of both kinds, and speculation's goodput is below plain's by more than the margin."""
        n_spec, n_plain = self.counts(step)
        if n_spec < self.min_spec or n_plain < self.min_plain:
            return False
        ratio = self.measured_speedup(step)
        return ratio is not None and ratio < 1.0 - self.margin
