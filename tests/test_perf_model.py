"""Cost model (DESIGN §2, paper Eq. 5): hand-computed optima, edge cases, interpolation, JSON."""

from __future__ import annotations

import math

import pytest

from tide_trt.online.perf_model import (
    LatencyProfile,
    argmax_gamma,
    best_gamma,
    expected_tokens_per_step,
    mean_expected_tokens,
    predicted_speedup,
    speedup_curve,
)

MS = 1e-3


def linear_profile(slope_ms: float = 1.0, draft_ms: dict[int, float] | None = None) -> LatencyProfile:
    """T(n) = 10 ms + slope·(n-1) for n = 1..64; D from ``draft_ms`` (default D(1) = 1 ms)."""
    target = {n: (10.0 + slope_ms * (n - 1)) * MS for n in range(1, 65)}
    draft = {b: v * MS for b, v in (draft_ms or {1: 1.0}).items()}
    return LatencyProfile(target_s=target, draft_s=draft)


# ---------------------------------------------------------------------------- E[l]
@pytest.mark.parametrize(
    ("alpha", "gamma", "expected"),
    [
        (0.5, 2, 1.75),  # 1 + 0.5 + 0.25
        (0.6, 3, 2.176),  # 1 + 0.6 + 0.36 + 0.216
        (0.0, 5, 1.0),
        (1.0, 4, 5.0),  # limit γ + 1
        (0.7, 0, 1.0),
        (-0.3, 3, 1.0),  # clamped to 0
        (1.7, 3, 4.0),  # clamped to 1
    ],
)
def test_expected_tokens_per_step(alpha: float, gamma: int, expected: float) -> None:
    assert expected_tokens_per_step(alpha, gamma) == pytest.approx(expected)


def test_expected_tokens_continuous_near_one() -> None:
    assert expected_tokens_per_step(1.0 - 1e-9, 4) == pytest.approx(5.0, rel=1e-6)
    assert expected_tokens_per_step(float("nan"), 4) == 1.0


def test_mean_expected_tokens_matches_formula() -> None:
    alphas = [0.2, 0.55, 0.9]
    means = mean_expected_tokens(alphas, 6)
    for g in range(7):
        want = sum(expected_tokens_per_step(a, g) for a in alphas) / 3
        assert means[g] == pytest.approx(want)


# ---------------------------------------------------------------------------- interpolation
def test_interpolation_and_extrapolation() -> None:
    p = LatencyProfile(target_s={1: 10 * MS, 4: 16 * MS}, draft_s={1: 1 * MS, 8: 8 * MS})
    assert p.target(1) == pytest.approx(10 * MS)
    assert p.target(2) == pytest.approx(12 * MS)  # 10 + 6·(1/3)
    assert p.target(3) == pytest.approx(14 * MS)
    assert p.target(8) == pytest.approx(24 * MS)  # beyond: slope 2 ms/token
    assert p.target(0.5) == pytest.approx(9 * MS)  # below: same end slope
    assert p.draft(4) == pytest.approx(4 * MS)
    assert p.draft(16) == pytest.approx(16 * MS)


def test_single_point_scales_proportionally_and_never_negative() -> None:
    p = LatencyProfile(target_s={2: 10 * MS}, draft_s={1: 1 * MS})
    assert p.target(4) == pytest.approx(20 * MS)  # pessimistic: cost ∝ tokens
    assert p.draft(3) == pytest.approx(3 * MS)
    steep = LatencyProfile(target_s={1: 1 * MS, 2: 10 * MS}, draft_s={1: 1 * MS})
    assert steep.target(0.5) > 0.0


@pytest.mark.parametrize("bad", [{}, {0: 1.0}, {1: 0.0}, {1: -1.0}, {1: math.inf}])
def test_invalid_tables_rejected(bad: dict[int, float]) -> None:
    with pytest.raises(ValueError):
        LatencyProfile(target_s=bad, draft_s={1: 1.0})


def test_json_round_trip_keeps_keys_as_ints() -> None:
    p = LatencyProfile(
        target_s={1: 0.01, 4: 0.02},
        draft_s={1: 0.001},
        model_fingerprint="abc",
        device="cpu",
        dtype="bfloat16",
        threads=2,
        created=123.0,
    )
    q = LatencyProfile.from_json(p.to_json())
    assert q == p
    assert list(q.target_s) == [1, 4]
    assert q.target(2) == p.target(2)
    assert hash(q) == hash(p)


# ---------------------------------------------------------------------------- Eq. 5 and best γ
def test_predicted_speedup_eq5_by_hand() -> None:
    # T(n) = 10 + (n-1) ms, D(1) = 1 ms, b = 1, α = 0.6, γ = 2:
    # c = 1/10, β = T(3)/T(1) = 12/10, E = 1.96 -> S = 1.96 / (0.2 + 1.2) = 1.4
    p = linear_profile()
    assert predicted_speedup(0.6, 2, 1, p) == pytest.approx(1.4)
    assert predicted_speedup(0.9, 0, 1, p) == 1.0


def test_best_gamma_single_request_by_hand() -> None:
    # Same profile, α = 0.6: S(γ) = 10·E(γ) / (10 + 2γ)
    #   γ=1: 16/12 = 1.333   γ=2: 19.6/14 = 1.400   γ=3: 21.76/16 = 1.360   γ=4: 23.056/18 = 1.281
    p = linear_profile()
    curve = speedup_curve([0.6], 1, p, 4)
    assert curve == pytest.approx([1.0, 16 / 12, 19.6 / 14, 21.76 / 16, 23.056 / 18])
    assert best_gamma([0.6], 1, p, 8) == (2, pytest.approx(1.4))
    for g in range(5):  # the batch formula reduces to Eq. 5 for one request
        assert curve[g] == pytest.approx(predicted_speedup(0.6, g, 1, p))


def test_best_gamma_uses_per_request_acceptance_by_hand() -> None:
    # b = 2, α = [0.9, 0.3], D(2) = 1.5 ms, T(2) = 11 ms, T(2(γ+1)) = 11 + 2γ ms
    # S(γ) = mean_E(γ) · 11 / (11 + 3.5γ):
    #   γ=1: mean_E = (1.9 + 1.3)/2   = 1.600 -> 17.6/14.5    = 1.2138
    #   γ=2: mean_E = (2.71 + 1.39)/2 = 2.050 -> 22.55/18     = 1.2528  <- best
    #   γ=3: mean_E = (3.439+1.417)/2 = 2.428 -> 26.708/21.5  = 1.2422
    # With the batch-mean α = 0.6 instead: γ=1 1.2138 > γ=2 1.96·11/18 = 1.1978, i.e. γ=1 (Jensen).
    p = linear_profile(draft_ms={1: 1.0, 2: 1.5})
    g, s = best_gamma([0.9, 0.3], 2, p, 8)
    assert (g, s) == (2, pytest.approx(22.55 / 18))
    assert best_gamma([0.6, 0.6], 2, p, 8)[0] == 1


def test_alpha_zero_never_speculates() -> None:
    p = linear_profile(slope_ms=0.0)  # even with a free verification (β = 1) the draft costs time
    assert best_gamma([0.0], 1, p, 8) == (0, 1.0)
    assert best_gamma([1e-6] * 4, 4, p, 8)[0] == 0


def test_alpha_one_small_beta_uses_gamma_max() -> None:
    p = LatencyProfile(target_s={1: 10 * MS, 256: 10.5 * MS}, draft_s={1: 0.1 * MS, 64: 0.2 * MS})
    g, s = best_gamma([1.0], 1, p, 8)
    assert g == 8
    assert s == pytest.approx(9 / (0.08 + p.target(9) / p.target(1)))


def test_compute_bound_large_batch_disables_speculation() -> None:
    # T(n) ∝ n (β = γ+1): E[l] <= γ+1 can never pay for the draft, even at α = 0.99.
    p = LatencyProfile(target_s={1: 10 * MS, 512: 5120 * MS}, draft_s={1: 0.1 * MS, 64: 0.5 * MS})
    assert best_gamma([0.99] * 64, 64, p, 8) == (0, 1.0)
    assert all(predicted_speedup(0.99, g, 64, p) < 1.0 for g in range(1, 9))


def test_best_gamma_empty_or_no_room() -> None:
    p = linear_profile()
    assert best_gamma([], 1, p, 8) == (0, 1.0)
    assert best_gamma([0.9], 1, p, 0) == (0, 1.0)


def test_argmax_ties_prefer_smaller_gamma() -> None:
    assert argmax_gamma([1.0, 1.2, 1.2, 1.1]) == 1
