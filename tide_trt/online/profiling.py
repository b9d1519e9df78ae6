"""Start-up latency profiling for the cost model: T(n) of the target and D(b) of the draft.

The engine supplies two callables that run ONE real step and return its seconds:
``target_step(batch_size, tokens_per_seq)`` (a verification-shaped target forward over
``batch_size · tokens_per_seq`` tokens) and ``draft_step(batch_size)``. For every batch size ``b`` and
every ``γ`` in 0..gamma_max the controller may ask for ``T(b·(γ+1))``; shapes with the same total ``n``
are measured once. Each point is the median of ``repeats`` runs after ``warmup`` runs; the runs are
interleaved (round r times every shape once) so that a slow spell of the machine (shared CPUs drift by tens of
percent over seconds to minutes) lands on all shapes alike instead of bending the curve. Results are cached as
JSON per (model fingerprint, device, dtype, threads, ...) key.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from tide_trt.online.perf_model import LatencyProfile, best_gamma

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


def interleaved_medians(fns: Mapping[Any, Callable[[], float]], repeats: int, warmup: int) -> dict[Any, float]:
    """Median seconds of every callable; rounds visit every callable once, so machine drift is shared."""
    for fn in fns.values():
        for _ in range(max(warmup, 0)):
            fn()
    samples: dict[Any, list[float]] = {k: [] for k in fns}
    for _ in range(max(repeats, 1)):
        for k, fn in fns.items():
            samples[k].append(float(fn()))
    return {k: statistics.median(v) for k, v in samples.items()}


def target_shapes(batch_sizes: Iterable[int], gamma_max: int) -> dict[int, tuple[int, int]]:
    """Total tokens ``n`` -> the first (batch_size, tokens_per_seq) shape that produces it."""
    shapes: dict[int, tuple[int, int]] = {}
    for b in sorted({int(b) for b in batch_sizes}):
        if b < 1:
            raise ValueError(f"batch sizes must be >= 1, got {b}")
        for g in range(max(int(gamma_max), 0) + 1):
            shapes.setdefault(b * (g + 1), (b, g + 1))
    return dict(sorted(shapes.items()))


def profile_latency(
    target_step: Callable[[int, int], float],
    draft_step: Callable[[int], float],
    batch_sizes: Iterable[int],
    gamma_max: int,
    repeats: int = 3,
    warmup: int = 1,
    *,
    model_fingerprint: str = "",
    device: str = "",
    dtype: str = "",
    threads: int = 0,
) -> LatencyProfile:
    """Measure T(n) for every n = b·(γ+1) and D(b) for every b; medians of ``repeats`` runs."""
    sizes = sorted({int(b) for b in batch_sizes})
    if not sizes:
        raise ValueError("profile_latency needs at least one batch size")
    started = time.perf_counter()
    shapes = target_shapes(sizes, gamma_max)
    target_s = interleaved_medians({n: functools.partial(target_step, b, tps) for n, (b, tps) in shapes.items()},
                                   repeats, warmup)
    for n, (b, tps) in shapes.items():
        logger.debug("T(%d) [b=%d x %d] = %.3f ms", n, b, tps, target_s[n] * 1e3)
    draft_s: dict[int, float] = {}
    if gamma_max > 0:
        draft_s = interleaved_medians({b: functools.partial(draft_step, b) for b in sizes}, repeats, warmup)
        for b in sizes:
            logger.debug("D(%d) = %.3f ms", b, draft_s[b] * 1e3)
    else:  # no speculation possible: the draft cost is never used, keep the profile valid
        draft_s = {b: target_s[b] for b in sizes}
    logger.info(
        "profiled %d target and %d draft shapes in %.1f s",
        len(target_s),
        len(draft_s),
        time.perf_counter() - started,
    )
    return LatencyProfile(
        target_s=target_s,
        draft_s=draft_s,
        model_fingerprint=model_fingerprint,
        device=device,
        dtype=dtype,
        threads=threads,
    )


def cache_path(cache_dir: str | Path, key: Mapping[str, Any]) -> Path:
    """``<cache_dir>/profile-<sha256 of the canonical key JSON>[:16].json``."""
    canonical = json.dumps({"v": CACHE_VERSION, **key}, sort_keys=True, default=str)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"profile-{digest}.json"


def _normalised(key: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(key), sort_keys=True, default=str))


def load_or_profile(
    cache_dir: str | Path, key: Mapping[str, Any], fn: Callable[[], LatencyProfile]
) -> LatencyProfile:
    """Return the cached profile for ``key`` or run ``fn()`` and cache its result (atomic write).

    ``key`` should hold everything that changes latencies: model fingerprint, device, dtype, threads,
    engine backend, batch sizes, gamma_max. A corrupt or mismatching cache file is re-profiled.
    """
    path = cache_path(cache_dir, key)
    want = _normalised(key)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.get("version") == CACHE_VERSION and data.get("key") == want:
                logger.info("latency profile loaded from %s", path)
                return LatencyProfile.from_dict(data["profile"])
            logger.warning("latency profile %s does not match its key; re-profiling", path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("latency profile %s unreadable (%s); re-profiling", path, exc)
    profile = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"version": CACHE_VERSION, "key": want, "profile": profile.to_dict()}
    fd, tmp = tempfile.mkstemp(prefix=".profile-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("latency profile cached at %s", path)
    return profile


def format_profile_table(profile: LatencyProfile, gammas: Iterable[int] = (1, 2, 3, 4, 6, 8)) -> str:
    """Human-readable tables for ``tide profile``: T(n), D(b), and per b the cost factors c(b), β(b,γ)
    plus the γ the cost model would pick at α = 0.6 and α = 0.8."""
    gs = [g for g in gammas if g >= 1]
    lines = [
        f"latency profile: model={profile.model_fingerprint or '-'} device={profile.device or '-'} "
        f"dtype={profile.dtype or '-'} threads={profile.threads}",
        "",
        f"{'n tokens':>9} {'T(n) ms':>10}",
    ]
    lines += [f"{n:>9d} {s * 1e3:>10.3f}" for n, s in profile.target_s.items()]
    gmax = max(gs, default=0)
    header = f"{'batch':>6} {'T(b) ms':>9} {'D(b) ms':>9} {'c(b)':>7} "
    header += " ".join(f"{'β γ=' + str(g):>7}" for g in gs) + f" {'best@0.6':>10} {'best@0.8':>10}"
    lines += ["", header]
    for b in profile.draft_s:
        t_b = profile.target(b)
        betas = " ".join(f"{profile.target(b * (g + 1)) / t_b:>7.3f}" for g in gs)
        picks = []
        for alpha in (0.6, 0.8):
            g, s = best_gamma([alpha], b, profile, gmax)
            picks.append(f"{g:d} ({s:.2f}x)")
        lines.append(
            f"{b:>6d} {t_b * 1e3:>9.3f} {profile.draft(b) * 1e3:>9.3f} {profile.draft(b) / t_b:>7.3f} "
            f"{betas} {picks[0]:>10} {picks[1]:>10}"
        )
    return "\n".join(lines)
