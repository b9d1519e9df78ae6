"""Adaptive controller: modes, estimator, hysteresis (no flapping), re-probing, snapshot."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tide_trt.config import ControllerConfig
from tide_trt.errors import ConfigError
from tide_trt.online.controller import AdaptiveController
from tide_trt.online.perf_model import LatencyProfile

MS = 1e-3
# bf16-CPU-like: a 4-token step costs ~1.1x a 1-token step; the draft step ~9 % of a target step
PROFILE = LatencyProfile(
    target_s={1: 44 * MS, 2: 46 * MS, 4: 49 * MS, 8: 58 * MS, 16: 80 * MS, 32: 130 * MS, 64: 240 * MS},
    draft_s={1: 4 * MS, 4: 5 * MS, 16: 8 * MS, 32: 12 * MS},
)


def sample_accepted(rng: random.Random, alpha: float, gamma: int) -> int:
    """Truncated geometric: drafts accepted one by one with prob α until the first rejection."""
    k = 0
    while k < gamma and rng.random() < alpha:
        k += 1
    return k


def simulate(cfg: ControllerConfig, alpha: float, batch: int, seed: int, steps: int = 1000):
    rng = random.Random(seed)
    ctl = AdaptiveController(cfg, PROFILE, gamma_max=8, static_gamma=3)
    ids = list(range(batch))
    gammas = []
    for _ in range(steps):
        g = ctl.choose_gamma(ids)
        gammas.append(g)
        drafting = ctl.drafting(ids)
        per_request = [g if drafting is None or r in drafting else 0 for r in ids]
        ctl.observe(ids, per_request, [sample_accepted(rng, alpha, x) for x in per_request], None)
    return ctl, gammas


def test_modes_off_and_static() -> None:
    off = AdaptiveController(ControllerConfig(mode="off"), PROFILE, 8, 3)
    assert [off.choose_gamma([1, 2]) for _ in range(5)] == [0] * 5
    static = AdaptiveController(ControllerConfig(mode="static"), PROFILE, 8, 3)
    assert [static.choose_gamma([1]) for _ in range(5)] == [3] * 5
    clamped = AdaptiveController(ControllerConfig(mode="static"), PROFILE, 2, 5)
    assert clamped.choose_gamma([1]) == 2
    assert AdaptiveController(ControllerConfig(), PROFILE, 0, 3).choose_gamma([1]) == 0
    assert AdaptiveController(ControllerConfig(), PROFILE, 8, 3).choose_gamma([]) == 0


def test_invalid_mode_rejected() -> None:
    with pytest.raises(ConfigError):
        AdaptiveController(ControllerConfig(mode="sometimes"), PROFILE, 8, 3)


def test_estimator_is_censored_geometric_mle() -> None:
    # k accepted of γ: k successes plus one failure if k < γ. Steps (γ=3): k=3, 1, 0 ->
    # successes 4, trials 3 + 2 + 1 = 6 -> α = 2/3 (with no discounting: ema = tiny).
    cfg = ControllerConfig(ema_short=1e-9, ema_long=1e-9, request_prior_trials=0.0)
    ctl = AdaptiveController(cfg, PROFILE, 8, 3)
    ctl._global = [0.0, 0.0]  # drop the prior for an exact check
    for k in (3, 1, 0):
        ctl.observe([7], 3, [k], None)
    assert ctl.acceptance(7) == pytest.approx(4 / 6)
    assert ctl.global_alpha == pytest.approx(4 / 6)


def test_estimates_converge_to_true_alpha() -> None:
    ctl, _ = simulate(ControllerConfig(mode="static"), alpha=0.7, batch=4, seed=3, steps=600)
    assert ctl.global_alpha == pytest.approx(0.7, abs=0.05)
    assert all(ctl.acceptance(r) == pytest.approx(0.7, abs=0.12) for r in range(4))


def test_unknown_request_uses_global_and_forget() -> None:
    ctl, _ = simulate(ControllerConfig(), alpha=0.8, batch=2, seed=1, steps=200)
    assert ctl.acceptance(999) == ctl.global_alpha
    ctl.forget(0)
    assert ctl.snapshot().tracked_requests == 1
    assert ctl.acceptance(0) == ctl.global_alpha


@pytest.mark.parametrize(("alpha", "expect_spec"), [(0.02, False), (0.9, True)])
def test_adaptive_follows_acceptance(alpha: float, expect_spec: bool) -> None:
    ctl, gammas = simulate(ControllerConfig(), alpha=alpha, batch=1, seed=0, steps=300)
    snap = ctl.snapshot()
    assert (snap.committed_gamma > 0) == expect_spec
    if expect_spec:
        assert snap.committed_gamma >= 3  # high α, cheap verification -> long drafts
        assert snap.predicted_speedup > 1.5
    assert gammas[:4] == [2, 2, 2, 2]  # cold-start probe at probe_gamma


def test_large_compute_bound_batch_stays_off() -> None:
    ctl, gammas = simulate(ControllerConfig(reprobe_interval_steps=0), alpha=0.7, batch=32, seed=0, steps=200)
    assert ctl.snapshot().committed_gamma == 0
    assert set(gammas[10:]) == {0}


def count_changes(seq: list[int]) -> int:
    return sum(a != b for a, b in zip(seq, seq[1:], strict=False))


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    alpha=st.floats(min_value=0.2, max_value=0.95),
    batch=st.sampled_from([1, 2, 4, 8]),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_no_flapping_under_stationary_noise(alpha: float, batch: int, seed: int) -> None:
    # plain probes (one step in 16 while speculating) are scheduled, not flapping: off here, tested below
    ctl, gammas = simulate(ControllerConfig(reprobe_interval_steps=0, plain_probe_interval_steps=0), alpha, batch,
                           seed)
    assert ctl.snapshot().num_switches <= 15
    assert count_changes(gammas[4:]) <= 15  # after the cold-start probe


def test_plain_argmax_flaps_where_the_controller_does_not() -> None:
    # α = 0.8 at batch 1: the predicted speedup curve is flat over γ = 3..8 (2.13..2.21), so
    # estimate noise moves the argmax around; hysteresis + confirmation + dwell hold γ still.
    naive_cfg = ControllerConfig(hysteresis=0.0, min_dwell_steps=0, confirm_steps=1, plain_probe_interval_steps=0)
    _, naive = simulate(naive_cfg, alpha=0.8, batch=1, seed=11)
    _, damped = simulate(ControllerConfig(plain_probe_interval_steps=0), alpha=0.8, batch=1, seed=11)
    assert count_changes(naive) >= 100
    assert count_changes(damped[4:]) <= 15


def test_reprobe_after_interval_and_switch_back_on_better_draft() -> None:
    cfg = ControllerConfig(reprobe_interval_steps=20, probe_steps=3, probe_gamma=2)
    ctl = AdaptiveController(cfg, PROFILE, 8, 3)
    ids = [1]
    gammas = []
    for _ in range(150):  # useless draft: everything rejected
        g = ctl.choose_gamma(ids)
        gammas.append(g)
        ctl.observe(ids, g, [0], None)
    assert gammas[:3] == [2, 2, 2]  # cold-start probe
    assert set(gammas[3:23]) == {0}  # 20 steps off
    assert gammas[23:26] == [2, 2, 2]  # re-probe
    assert set(gammas[26:66]) == {0}  # the probe failed again: the interval doubles
    assert gammas[66:69] == [2, 2, 2]
    assert set(gammas[69:149]) == {0}
    assert gammas[149] == 2
    assert ctl.snapshot().num_probes == 4
    assert ctl.reprobe_interval == 80  # the 4th probe is running, not judged yet
    # an improved draft is deployed: the next probe sees acceptance and speculation resumes
    ctl.on_draft_updated()
    for _ in range(10):
        g = ctl.choose_gamma(ids)
        ctl.observe(ids, g, [g], None)
    snap = ctl.snapshot()
    assert snap.committed_gamma > 0
    assert snap.global_alpha > 0.5
    assert ctl.reprobe_interval == 20  # a new draft resets the back-off


def test_reprobe_backoff_is_capped() -> None:
    cfg = ControllerConfig(reprobe_interval_steps=10, reprobe_backoff=3.0, reprobe_max_interval_steps=50,
                           probe_steps=2)
    ctl = AdaptiveController(cfg, PROFILE, 8, 3)
    intervals = set()
    for _ in range(400):
        g = ctl.choose_gamma([1])
        ctl.observe([1], g, [0], None)
        intervals.add(ctl.reprobe_interval)
    assert intervals == {10, 30, 50}


def test_probe_drafts_for_a_few_least_observed_requests() -> None:
    cfg = ControllerConfig(probe_steps=3, probe_gamma=2, probe_max_requests=2, reprobe_interval_steps=10)
    ctl = AdaptiveController(cfg, PROFILE, 8, 3)
    ids = list(range(6))
    members = []
    for step in range(3):  # the cold-start probe
        assert ctl.choose_gamma(ids) == 2
        members.append(set(ctl.drafting(ids)))
        ctl.observe(ids, [2 if r in members[-1] else 0 for r in ids], [0] * len(ids), None)
        if step == 0:
            ctl.forget(0)  # a member finishes mid-probe: its place goes to the next least-observed request
            ids = ids[1:]
    assert members == [{0, 1}, {1, 2}, {1, 2}]
    assert ctl.choose_gamma(ids) == 0 and ctl.drafting(ids) is None  # probe failed: plain decoding, all rows
    for _ in range(10):
        ctl.observe(ids, 0, [0] * len(ids), None)
        g = ctl.choose_gamma(ids)
    assert g == 2 and set(ctl.drafting(ids)) == {3, 4}  # the re-probe samples requests not observed yet
    small = AdaptiveController(cfg, PROFILE, 8, 3)
    assert small.choose_gamma([7, 8]) == 2 and small.drafting([7, 8]) is None  # batch <= k: all draft


def test_observe_per_request_draft_lengths() -> None:
    ctl = AdaptiveController(ControllerConfig(prior_acceptance=0.5, ema_long=1.0), PROFILE, 8, 3)
    ctl.observe([1, 2, 3], [3, 0, 2], [3, 0, 1], 0.05)
    # request 1: 3 successes, 3 trials (not censored); request 3: 1 success + 1 failure; request 2 drafted nothing
    assert ctl.global_alpha == pytest.approx(4 / 5)
    assert ctl.snapshot().measured_speedup is None  # a mixed step is not timed
    with pytest.raises(ValueError):
        ctl.observe([1, 2], [3], [1, 0], None)


def test_snapshot_measured_speedup_compares_live_plain_with_live_speculation() -> None:
    ctl = AdaptiveController(ControllerConfig(mode="static"), PROFILE, 8, 2)
    g = ctl.choose_gamma([5])
    predicted = ctl.speedup_curve([5])[2]
    # the machine runs 2x slower than the start-up profile for both kinds of step: a plain step takes 88 ms,
    # a γ = 2 step (2 accepted + 1 bonus token) 88 ms as well -> live speedup 3.0 (vs the profile's plain: 1.5)
    ctl.observe([5], g, [2], 0.088)
    assert ctl.snapshot().measured_speedup is None  # no live plain sample yet: nothing to compare with
    ctl.observe([5], 0, [0], 0.088)
    snap = ctl.snapshot()
    assert snap.gamma == 2 and snap.mode == "static"
    assert snap.measured_speedup == pytest.approx(3.0)
    assert snap.predicted_speedup == pytest.approx(predicted)
    with pytest.raises(ValueError):
        ctl.observe([5, 6], 2, [1], None)


def test_config_replace_keeps_validation() -> None:
    with pytest.raises(ConfigError):
        AdaptiveController(replace(ControllerConfig(), ema_short=0.0), PROFILE, 8, 3)


def test_long_off_period_does_not_underflow_to_the_prior() -> None:
    cfg = ControllerConfig(reprobe_interval_steps=0, prior_acceptance=0.9)
    ctl = AdaptiveController(cfg, PROFILE, 8, 3)
    for _ in range(5):
        g = ctl.choose_gamma([1])
        ctl.observe([1], g, [0], None)
    before = ctl.global_alpha
    assert before < 0.3
    for _ in range(50_000):
        ctl.observe([1], 0, [0], None)
    assert ctl.global_alpha == pytest.approx(before)
    assert ctl.choose_gamma([1]) == 0


def test_draft_limited_when_off_for_lack_of_acceptance_only() -> None:
    ctl = AdaptiveController(ControllerConfig(reprobe_interval_steps=1000), PROFILE, 8, 3)
    ids = [1]
    for _ in range(3):  # cold-start probe, nothing accepted
        assert ctl.choose_gamma(ids) == 2
        assert not ctl.draft_limited  # probing
        ctl.observe(ids, 2, [0], None)
    for _ in range(5):
        g = ctl.choose_gamma(ids)
        ctl.observe(ids, g, [0], None)
    assert g == 0 and ctl.draft_limited  # off, and at batch 1 an α = 0.8 draft would pay
    assert ctl.snapshot().draft_limited
    # where even a good draft cannot pay (verification far costlier than decoding), training would not help
    flat = LatencyProfile(target_s={1: 10 * MS, 2: 40 * MS, 16: 400 * MS}, draft_s={1: 5 * MS})
    hopeless = AdaptiveController(ControllerConfig(reprobe_interval_steps=1000), flat, 4, 3)
    for _ in range(10):
        g = hopeless.choose_gamma(ids)
        hopeless.observe(ids, g, [0], None)
    assert g == 0 and not hopeless.draft_limited
    # speculating with a good draft: not limited
    good = AdaptiveController(ControllerConfig(), PROFILE, 8, 3)
    for _ in range(20):
        g = good.choose_gamma(ids)
        good.observe(ids, g, [g], None)
    assert good.snapshot().committed_gamma > 0 and not good.draft_limited
