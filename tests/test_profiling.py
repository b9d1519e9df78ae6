"""Start-up profiling with fake step functions, the JSON cache, the printed table."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from tide_trt.online.perf_model import LatencyProfile
from tide_trt.online.profiling import (
    cache_path,
    format_profile_table,
    load_or_profile,
    profile_latency,
    target_shapes,
)


class FakeEngine:
    """T(b, t) = 10 ms + 1 ms per token; D(b) = 1 ms + 0.1 ms per sequence; every 3rd call is slow."""

    def __init__(self) -> None:
        self.target_calls: Counter[tuple[int, int]] = Counter()
        self.draft_calls: Counter[int] = Counter()

    def target_step(self, batch_size: int, tokens_per_seq: int) -> float:
        self.target_calls[(batch_size, tokens_per_seq)] += 1
        outlier = 5.0 if self.target_calls[(batch_size, tokens_per_seq)] % 3 == 0 else 1.0
        return (10.0 + batch_size * tokens_per_seq) * 1e-3 * outlier

    def draft_step(self, batch_size: int) -> float:
        self.draft_calls[batch_size] += 1
        return (1.0 + 0.1 * batch_size) * 1e-3


def test_target_shapes_cover_every_gamma_and_dedupe() -> None:
    shapes = target_shapes([1, 2, 4], gamma_max=3)
    wanted = {b * (g + 1) for b in (1, 2, 4) for g in range(4)}
    assert set(shapes) == wanted  # {1,2,3,4,6,8,12,16}
    assert shapes[4] == (1, 4)  # first shape producing n = 4 (b=1, γ=3) is measured once
    with pytest.raises(ValueError):
        target_shapes([0], 2)


def test_profile_latency_medians_and_call_counts() -> None:
    eng = FakeEngine()
    prof = profile_latency(eng.target_step, eng.draft_step, [4, 1, 2], gamma_max=3, repeats=3, warmup=1)
    # median of 3 after 1 warm-up: the warm-up call is #1, measurements #2 (normal) #3 (5x) #4 (normal)
    assert prof.target_s == pytest.approx({n: (10.0 + n) * 1e-3 for n in (1, 2, 3, 4, 6, 8, 12, 16)})
    assert prof.draft_s == pytest.approx({b: (1.0 + 0.1 * b) * 1e-3 for b in (1, 2, 4)})
    assert all(c == 4 for c in eng.target_calls.values())
    assert all(c == 4 for c in eng.draft_calls.values())
    # the controller can ask T(b·(γ+1)) for every profiled b and γ <= gamma_max without extrapolating
    assert all(b * (g + 1) in prof.target_s for b in (1, 2, 4) for g in range(4))


def test_profile_latency_with_real_sleeps() -> None:
    def target(b: int, t: int) -> float:
        start = time.perf_counter()
        time.sleep(0.001)
        return time.perf_counter() - start

    def draft(b: int) -> float:
        return 0.0005

    prof = profile_latency(target, draft, [1], gamma_max=1, repeats=1, warmup=0, device="cpu")
    assert set(prof.target_s) == {1, 2} and all(v >= 0.001 for v in prof.target_s.values())
    assert prof.device == "cpu"


def test_gamma_max_zero_needs_no_draft() -> None:
    def no_draft(b: int) -> float:
        raise AssertionError("draft must not run when gamma_max = 0")

    prof = profile_latency(FakeEngine().target_step, no_draft, [1, 2], gamma_max=0, repeats=1)
    assert set(prof.target_s) == {1, 2} and set(prof.draft_s) == {1, 2}


def test_load_or_profile_round_trip(tmp_path: Path) -> None:
    calls = []

    def fn() -> LatencyProfile:
        calls.append(1)
        eng = FakeEngine()
        return profile_latency(eng.target_step, eng.draft_step, [1, 2], 2, repeats=1, model_fingerprint="m")

    key = {"model": "m", "device": "cpu", "dtype": "bfloat16", "threads": 2}
    first = load_or_profile(tmp_path, key, fn)
    second = load_or_profile(tmp_path, dict(reversed(list(key.items()))), fn)  # key order irrelevant
    assert len(calls) == 1
    assert second == first
    assert cache_path(tmp_path, key).is_file()
    load_or_profile(tmp_path, {**key, "threads": 4}, fn)  # another key -> another profile
    assert len(calls) == 2


def test_corrupt_or_mismatching_cache_is_reprofiled(tmp_path: Path) -> None:
    key = {"model": "m"}
    prof = LatencyProfile(target_s={1: 0.01}, draft_s={1: 0.001})
    path = cache_path(tmp_path, key)
    path.write_text("{not json")
    assert load_or_profile(tmp_path, key, lambda: prof) == prof
    payload = json.loads(path.read_text())
    payload["key"] = {"model": "other"}
    path.write_text(json.dumps(payload))
    other = LatencyProfile(target_s={1: 0.02}, draft_s={1: 0.002})
    assert load_or_profile(tmp_path, key, lambda: other) == other
    assert not list(tmp_path.glob(".profile-*"))  # no temp files left behind


def test_format_profile_table() -> None:
    eng = FakeEngine()
    prof = profile_latency(eng.target_step, eng.draft_step, [1, 2], 2, repeats=1, model_fingerprint="fp")
    text = format_profile_table(prof, gammas=(1, 2))
    assert "model=fp" in text
    assert "T(n) ms" in text and "D(b) ms" in text and "best@0.8" in text
    lines = text.splitlines()
    row_b1 = next(line for line in lines if line.split()[:1] == ["1"] and len(line.split()) > 3)
    # b=1: T(1) = 11 ms, D(1) = 1.1 ms, c = 0.1, β(γ=1) = T(2)/T(1) = 12/11
    assert row_b1.split()[1:5] == ["11.000", "1.100", "0.100", f"{12 / 11:.3f}"]


def test_engine_profile_is_made_monotone():
    from tide_trt.online.engine_profile import monotone_profile
    from tide_trt.online.perf_model import LatencyProfile, predicted_speedup

    noisy = LatencyProfile(target_s={1: 0.030, 4: 0.034, 8: 0.029, 16: 0.050}, draft_s={1: 0.002, 4: 0.003})
    fixed = monotone_profile(noisy)
    assert fixed.target_s == {1: 0.030, 4: 0.034, 8: 0.034, 16: 0.050}
    # with the dip, γ=1 at α=0 looked like a speedup at batch 4; after the fix it does not
    assert predicted_speedup(0.0, 1, 4, noisy) > 1.0 > predicted_speedup(0.0, 1, 4, fixed)
