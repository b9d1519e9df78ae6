"""Algorithm 1: drift detection on acceptance EMAs, the training trigger, the deploy gate, plateaus."""

from __future__ import annotations

import random

import pytest

from tide_trt.config import SignalConfig, TrainerConfig
from tide_trt.online.drift import Decision, DriftDetector, TrainingGate


def bernoulli(rng: random.Random, p: float, n: int) -> list[float]:
    """Worst-case noise for an acceptance fraction with mean p (variance p(1-p))."""
    return [1.0 if rng.random() < p else 0.0 for _ in range(n)]


def armed_detector(cfg: SignalConfig | None = None) -> DriftDetector:
    det = DriftDetector(cfg or SignalConfig())
    det.pause("baseline")  # leave the cold-start collection phase
    return det


def test_cold_start_collects_and_disabled_never_does() -> None:
    det = DriftDetector(SignalConfig())
    assert det.collection_enabled
    assert det.snapshot().last_event == "cold_start"
    off = DriftDetector(SignalConfig(enabled=False))
    assert not off.collection_enabled
    for v in bernoulli(random.Random(0), 0.2, 100):
        off.update(v)
    assert not off.collection_enabled


def test_no_false_alarm_on_long_stable_noisy_stream() -> None:
    det = armed_detector()
    stream = bernoulli(random.Random(1), 0.5, 60_000)
    assert not any(det.update(v) for v in stream)
    snap = det.snapshot()
    assert snap.detections == 0 and not snap.collection_enabled
    assert snap.accepted_per_drafted_short == pytest.approx(0.5, abs=0.06)


def test_detects_a_drop_of_0_1_within_bounded_updates() -> None:
    rng = random.Random(2)
    det = armed_detector()
    for v in bernoulli(rng, 0.6, 20_000):
        assert not det.update(v)
    hits = [i for i, v in enumerate(bernoulli(rng, 0.5, 5_000)) if det.update(v)]
    assert hits and hits[0] < 2_000  # benchmark: max 1128 over 40 seeds
    snap = det.snapshot()
    assert snap.collection_enabled and snap.detections == 1 and snap.last_event == "drift"


def test_no_detection_before_warmup() -> None:
    cfg = SignalConfig(drift_warmup_updates=500)
    det = armed_detector(cfg)
    for _ in range(499):
        assert not det.update(0.0 if det.snapshot().updates > 10 else 1.0)
    assert not det.armed


def test_weighted_update_equals_repeated_updates() -> None:
    a, b = armed_detector(), armed_detector()
    a.update(0.8, weight=32)
    for _ in range(32):
        b.update(0.8)
    a.update(0.3, weight=5)
    for _ in range(5):
        b.update(0.3)
    sa, sb = a.snapshot(), b.snapshot()
    assert sa.accepted_per_drafted_short == pytest.approx(sb.accepted_per_drafted_short)
    assert sa.accepted_per_drafted_long == pytest.approx(sb.accepted_per_drafted_long)
    assert sa.updates == sb.updates == 37


def test_bias_correction_gives_sensible_first_values() -> None:
    det = DriftDetector(SignalConfig())
    det.update(0.7)
    assert det.snapshot().accepted_per_drafted_short == pytest.approx(0.7)
    assert det.snapshot().accepted_per_drafted_long == pytest.approx(0.7)


def test_non_finite_inputs_ignored() -> None:
    det = armed_detector()
    assert not det.update(float("nan"))
    assert not det.update(0.5, weight=0)
    assert det.snapshot().updates == 0


def test_pause_rebaselines_so_only_a_new_drop_resumes() -> None:
    rng = random.Random(3)
    det = armed_detector()
    for v in bernoulli(rng, 0.7, 20_000):
        det.update(v)
    assert any(det.update(v) for v in bernoulli(rng, 0.55, 5_000))
    det.apply(Decision(deploy=False, pause_collection=True, reason="no_improvement"))
    assert not det.collection_enabled
    # same lower level: the long EMA follows the (still settling) short one for the warm-up
    assert not det.armed
    assert not any(det.update(v) for v in bernoulli(rng, 0.55, 20_000))
    # a further drop is new drift
    assert any(det.update(v) for v in bernoulli(rng, 0.4, 5_000))
    assert det.snapshot().detections == 2 and det.snapshot().pauses == 2


def test_old_placeholder_defaults_would_false_alarm() -> None:
    cfg = SignalConfig(drift_ema_short=0.1, drift_ema_long=0.01, drift_warmup_updates=30)
    det = armed_detector(cfg)
    assert any(det.update(v) for v in bernoulli(random.Random(4), 0.5, 5_000))


# ---------------------------------------------------------------------------- gate
def test_should_train_threshold() -> None:
    gate = TrainingGate.from_config(SignalConfig(), TrainerConfig(min_new_tokens=100))
    assert not gate.should_train(99)
    assert gate.should_train(100)
    gate.add_samples(60)
    assert not gate.should_train()
    gate.add_samples(40)
    assert gate.should_train()
    assert gate.snapshot().samples_since_round == 100


def test_decide_deploys_only_when_better() -> None:
    gate = TrainingGate(100, min_gain=0.01)
    gate.add_samples(150)
    better = gate.decide(0.62, 0.55)
    assert better.deploy and not better.pause_collection and better.reason == "improved"
    assert better.gain == pytest.approx(0.07)
    assert gate.samples_since_round == 0
    worse = gate.decide(0.55, 0.56)
    assert not worse.deploy and worse.pause_collection and worse.reason == "no_improvement"
    tie = gate.decide(0.555, 0.55)  # within the margin
    assert not tie.deploy
    assert not gate.decide(float("nan"), 0.5).deploy
    snap = gate.snapshot()
    assert snap.rounds == 4 and snap.deployed == 1


def test_required_gain_uses_sample_counts() -> None:
    gate = TrainingGate(1, min_gain=0.01, z=1.645)
    assert gate.required_gain() == 0.01
    # N = 8192, eval 819: 1.645 · 0.5 · sqrt(1/819 + 1/7373) ≈ 0.0303
    assert gate.required_gain(819, 7373) == pytest.approx(0.0303, abs=5e-4)
    assert not gate.decide(0.57, 0.55, num_eval=819, num_train=7373).deploy
    assert gate.decide(0.59, 0.55, num_eval=819, num_train=7373).deploy


def test_plateau_pauses_collection_after_small_gains() -> None:
    gate = TrainingGate(1, min_gain=0.005, plateau_min_gain=0.02, plateau_rounds=2)
    first = gate.decide(0.60, 0.50)  # big gain
    assert first.deploy and not first.pause_collection
    small = gate.decide(0.61, 0.60)
    assert small.deploy and not small.pause_collection
    plateau = gate.decide(0.62, 0.61)
    assert plateau.deploy and plateau.pause_collection and plateau.reason == "plateau"
    det = armed_detector()
    det.resume("drift")
    det.apply(plateau)
    assert not det.collection_enabled and det.snapshot().last_event == "plateau"


def test_draft_limited_trigger_collects_until_rounds_stop_helping() -> None:
    det = armed_detector()
    assert not det.collection_enabled
    det.set_draft_limited(True)  # the controller holds speculation off for lack of acceptance
    assert det.collection_enabled
    assert det.snapshot().draft_limited and not det.snapshot().draft_limited_suspended
    det.set_draft_limited(False)  # speculating again (or a probe): the trigger lets go
    assert not det.collection_enabled
    det.set_draft_limited(True)
    det.apply(Decision(deploy=True, pause_collection=False, reason="improved", gain=0.05))
    assert det.collection_enabled
    rejected = Decision(deploy=False, pause_collection=True, reason="no_improvement")
    det.apply(rejected)
    assert det.collection_enabled  # one rejection: keep trying
    det.apply(rejected)
    assert not det.collection_enabled  # two in a row (the default): training stopped helping
    assert det.snapshot().draft_limited_suspended
    det.apply(Decision(deploy=True, pause_collection=False, reason="improved", gain=0.05))
    assert det.collection_enabled  # a deployed round (e.g. drift data) re-enables it
    det.apply(Decision(deploy=True, pause_collection=True, reason="plateau", gain=0.001))
    assert not det.collection_enabled  # a plateau suspends it at once
    det.observe_served(19_999)
    assert not det.collection_enabled
    det.observe_served(1)  # draft_limited_retry_steps (20000) served: the traffic may have changed, retry
    assert det.collection_enabled
    det.apply(rejected)
    det.apply(rejected)
    assert not det.collection_enabled
    det.observe_served(20_000)
    assert not det.collection_enabled  # second suspension: the retry interval doubled
    det.observe_served(20_000)
    assert det.collection_enabled


def test_draft_limited_trigger_can_be_disabled_and_respects_disabled_signals() -> None:
    det = armed_detector(SignalConfig(collect_when_draft_limited=False))
    det.set_draft_limited(True)
    assert not det.collection_enabled
    off = DriftDetector(SignalConfig(enabled=False))
    off.set_draft_limited(True)
    assert not off.collection_enabled
