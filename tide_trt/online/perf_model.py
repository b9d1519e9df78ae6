"""Speculative-decoding cost model (DESIGN §2, paper Eq. 5) as pure functions.

Notation (all latencies in seconds, profiled once at start-up, see :mod:`tide_trt.online.profiling`):

* ``T(n)``: one target forward step that processes ``n`` tokens in total (a batch of ``b`` sequences
  verifying ``γ`` draft tokens each processes ``n = b·(γ+1)`` tokens).
* ``D(b)``: one draft step for a batch of ``b`` sequences (γ draft steps per speculative step).
* ``α``: per-token acceptance rate; ``E[l](α, γ) = (1 - α^(γ+1)) / (1 - α)`` output tokens per step
  (accepted + recovered/bonus).

Predicted speedup over plain decoding (one token per sequence per ``T(b)``)::

    S(α, γ, b) = E[l] / (c(b)·γ + β(b)),   c(b) = D(b)/T(b),   β(b) = T(b·(γ+1))/T(b)

For a batch with per-request estimates ``α_i`` the goodput of ``γ`` is
``Σ_i E[l](α_i, γ) / (γ·D(b) + T(b·(γ+1)))`` against ``b / T(b)`` for plain decoding.
"""

from __future__ import annotations

import bisect
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

_MIN_SECONDS = 1e-9  # floor for extrapolated latencies (never zero or negative)


def _clamp01(x: float) -> float:
    if math.isnan(x):
        return 0.0
    return 0.0 if x < 0.0 else 1.0 if x > 1.0 else float(x)


_Count = TypeVar("_Count", int, float, "torch.Tensor")


def censored_trials(accepted: _Count, drafted: int) -> _Count:
    """Trials of one verification step under the acceptance model behind E[l] (each draft token accepted
    independently with probability α until the first rejection): ``k`` accepted of ``γ`` drafted are ``k``
    successes plus one failure when ``k < γ``, so ``α̂ = Σk / Σ(k + [k<γ])`` is the (censored-geometric) MLE of α.
    Works on ints and on tensors of accepted counts."""
    return accepted + (accepted < drafted)  # type: ignore[return-value,operator]


def expected_tokens_per_step(alpha: float, gamma: int) -> float:
    """E[l] = (1 - α^(γ+1)) / (1 - α): output tokens of one verification step (bonus included).

    ``α`` is clamped into [0, 1]; ``α → 1`` gives the limit ``γ + 1`` and ``γ = 0`` gives exactly 1.0.
    """
    if gamma <= 0:
        return 1.0
    a = _clamp01(alpha)
    if a >= 1.0 - 1e-12:
        return float(gamma + 1)
    return (1.0 - a ** (gamma + 1)) / (1.0 - a)


def _interp(xs: tuple[float, ...], ys: tuple[float, ...], x: float) -> float:
    """Piecewise-linear interpolation, linear extrapolation from the two end points on either side.

    A single measured point scales proportionally (``y·x/x0``): the pessimistic choice for a cost.
    """
    if len(xs) == 1:
        return max(ys[0] * x / xs[0], _MIN_SECONDS)
    i = bisect.bisect_left(xs, x)
    if i < len(xs) and xs[i] == x:
        return ys[i]
    lo = min(max(i - 1, 0), len(xs) - 2)
    x0, x1, y0, y1 = xs[lo], xs[lo + 1], ys[lo], ys[lo + 1]
    return max(y0 + (y1 - y0) * (x - x0) / (x1 - x0), _MIN_SECONDS)


def _table(raw: Mapping[Any, Any], name: str) -> dict[int, float]:
    table = {int(k): float(v) for k, v in raw.items()}
    if not table:
        raise ValueError(f"LatencyProfile.{name} is empty")
    for k, v in table.items():
        if k < 1 or not math.isfinite(v) or v <= 0.0:
            raise ValueError(f"LatencyProfile.{name}[{k}] = {v}: keys must be >= 1, values finite > 0")
    return dict(sorted(table.items()))


@dataclass(frozen=True)
class LatencyProfile:
    """Profiled latencies: ``target_s[n]`` = T(n) and ``draft_s[b]`` = D(b), in seconds, + metadata."""

    target_s: dict[int, float]
    draft_s: dict[int, float]
    model_fingerprint: str = ""
    device: str = ""
    dtype: str = ""
    threads: int = 0
    created: float = field(default_factory=time.time)  # unix seconds
    _t_xy: tuple[tuple[float, ...], tuple[float, ...]] = field(init=False, repr=False, compare=False)
    _d_xy: tuple[tuple[float, ...], tuple[float, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        t = _table(self.target_s, "target_s")
        d = _table(self.draft_s, "draft_s")
        object.__setattr__(self, "target_s", t)
        object.__setattr__(self, "draft_s", d)
        object.__setattr__(self, "_t_xy", (tuple(map(float, t)), tuple(t.values())))
        object.__setattr__(self, "_d_xy", (tuple(map(float, d)), tuple(d.values())))

    def __hash__(self) -> int:
        return hash((tuple(self.target_s.items()), tuple(self.draft_s.items()), self.model_fingerprint))

    def target(self, n: float) -> float:
        """T(n): seconds of one target step over ``n`` tokens in total (interpolated)."""
        return _interp(*self._t_xy, float(n))

    def draft(self, b: float) -> float:
        """D(b): seconds of one draft step for a batch of ``b`` sequences (interpolated)."""
        return _interp(*self._d_xy, float(b))

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_s": {str(k): v for k, v in self.target_s.items()},
            "draft_s": {str(k): v for k, v in self.draft_s.items()},
            "model_fingerprint": self.model_fingerprint,
            "device": self.device,
            "dtype": self.dtype,
            "threads": self.threads,
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyProfile:
        return cls(
            target_s=dict(data["target_s"]),
            draft_s=dict(data["draft_s"]),
            model_fingerprint=str(data.get("model_fingerprint", "")),
            device=str(data.get("device", "")),
            dtype=str(data.get("dtype", "")),
            threads=int(data.get("threads", 0)),
            created=float(data.get("created", 0.0)),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LatencyProfile:
        return cls.from_dict(json.loads(text))


def step_cost_ratios(batch_size: int, profile: LatencyProfile, gamma_max: int) -> list[float]:
    """``r[γ] = T(b) / (γ·D(b) + T(b·(γ+1)))`` for γ in 0..gamma_max (``r[0]`` = 1.0 exactly).

    The speedup of γ for a batch is ``mean_i E[l](α_i, γ) · r[γ]``; callers may cache this per ``b``.
    """
    b = max(int(batch_size), 1)
    t_b = profile.target(b)
    d_b = profile.draft(b)
    ratios = [1.0]
    for g in range(1, max(gamma_max, 0) + 1):
        ratios.append(t_b / (g * d_b + profile.target(b * (g + 1))))
    return ratios


def predicted_speedup(alpha: float, gamma: int, batch_size: int, profile: LatencyProfile) -> float:
    """Paper Eq. 5: ``E[l] / (c(b)·γ + β(b))``; ``γ = 0`` gives exactly 1.0."""
    if gamma <= 0:
        return 1.0
    b = max(int(batch_size), 1)
    t_b = profile.target(b)
    c = profile.draft(b) / t_b
    beta = profile.target(b * (gamma + 1)) / t_b
    return expected_tokens_per_step(alpha, gamma) / (c * gamma + beta)


def mean_expected_tokens(alphas: Sequence[float], gamma_max: int) -> list[float]:
    """``m[γ] = mean_i E[l](α_i, γ)`` for γ in 0..gamma_max, in O(len(alphas)·gamma_max) multiplies."""
    n = len(alphas)
    out = [1.0]
    if n == 0:
        return out + [1.0] * max(gamma_max, 0)
    clamped = [_clamp01(a) for a in alphas]
    powers = list(clamped)  # α_i^γ
    total = float(n)  # Σ_i Σ_{k<=γ} α_i^k
    for _ in range(max(gamma_max, 0)):
        total += sum(powers)
        out.append(total / n)
        powers = [p * a for p, a in zip(powers, clamped, strict=True)]
    return out


def speedup_curve(
    alphas: Sequence[float], batch_size: int, profile: LatencyProfile, gamma_max: int
) -> list[float]:
    """Predicted batch goodput of each γ in 0..gamma_max relative to plain decoding (``[0]`` = 1.0)."""
    means = mean_expected_tokens(alphas, gamma_max)
    ratios = step_cost_ratios(batch_size, profile, gamma_max)
    return [m * r for m, r in zip(means, ratios, strict=True)]


def argmax_gamma(curve: Sequence[float]) -> int:
    """Index of the largest value; ties go to the smallest γ (less work for the same goodput)."""
    best = 0
    for g in range(1, len(curve)):
        if curve[g] > curve[best]:
            best = g
    return best


def best_gamma(
    alphas: Sequence[float], batch_size: int, profile: LatencyProfile, gamma_max: int
) -> tuple[int, float]:
    """γ in 0..gamma_max maximising predicted batch goodput, and its predicted speedup vs γ = 0.

    An empty ``alphas`` (no request to speculate for) returns ``(0, 1.0)``.
    """
    if not alphas or gamma_max <= 0:
        return 0, 1.0
    curve = speedup_curve(alphas, batch_size, profile, gamma_max)
    g = argmax_gamma(curve)
    return g, curve[g]


def draft_len_schedule(alpha: float, step_seconds: Callable[[int, int], float], gamma_max: int,
                       batch_sizes: Iterable[int]) -> dict[int, int]:
    """γ per batch size that maximises ``E[l](α, γ) · P(b, 0) / P(b, γ)`` (``step_seconds(b, γ)`` = P(b, γ), the
    seconds of one step of b rows at γ): the draft-length schedule the cost model implies (TRT-LLM configures its
    ``draft_len_schedule`` by hand; here it follows α and the costs as they are measured). 0 = plain decoding."""
    out: dict[int, int] = {}
    for b in sorted({max(int(x), 1) for x in batch_sizes}):
        plain = step_seconds(b, 0)
        curve = [1.0] + [expected_tokens_per_step(alpha, g) * plain / step_seconds(b, g)
                         for g in range(1, max(gamma_max, 0) + 1)]
        out[b] = argmax_gamma(curve)
    return out
