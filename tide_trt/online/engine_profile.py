"""Profile the real engine for the cost model: T(n) target step latency and D(b) draft step latency.

Measured on the actual device, dtype and thread count at start-up (cached per key), over a context of
`context_len` tokens so attention cost is representative.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from tide_trt.config import default_cache_dir
from tide_trt.draft.drafter import ChainDrafter
from tide_trt.engine.base import TargetEngine
from tide_trt.online.perf_model import LatencyProfile
from tide_trt.online.profiling import load_or_profile, profile_latency

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32)


def _batch_sizes(engine: TargetEngine, batch_sizes: tuple[int, ...]) -> list[int]:
    limit = min(engine.info.max_batch_size, engine.num_free_slots)
    return sorted({b for b in batch_sizes if b <= limit} | {1})


def profile_engine(engine: TargetEngine, drafter: ChainDrafter | None, gamma_max: int,
                   batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES, context_len: int = 128,
                   repeats: int = 7) -> LatencyProfile:
    """Time one target step of b·(γ+1) tokens and one draft step of b rows on the live engine."""
    sizes = _batch_sizes(engine, batch_sizes)
    b_max = max(sizes)
    context_len = min(context_len, engine.info.max_seq_len - gamma_max - 4)
    slots = [engine.allocate_slot() for _ in range(b_max)]
    gen = torch.Generator().manual_seed(0)
    try:
        ctx = torch.randint(100, engine.info.vocab_size, (b_max, context_len), generator=gen).tolist()
        engine.forward(slots, ctx)

        def target_step(b: int, tokens_per_seq: int) -> float:
            chosen = slots[:b]
            t0 = time.perf_counter()
            engine.forward(chosen, [[7] * tokens_per_seq] * b, logits="all")
            seconds = time.perf_counter() - t0
            for s in chosen:
                engine.truncate(s, context_len)
            return seconds

        def draft_step(b: int) -> float:
            if drafter is None:
                return 0.0
            chosen = slots[:b]
            hidden = [torch.zeros(1, len(engine.info.capture_layers), engine.info.hidden_size)] * b
            for s in chosen:
                drafter.cached[s] = context_len
            t0 = time.perf_counter()
            drafter.propose(chosen, hidden, [[7]] * b, 1, None)
            seconds = time.perf_counter() - t0
            for s in chosen:
                drafter.reset_slot(s)
            return seconds

        raw = profile_latency(target_step, draft_step, sizes, gamma_max if drafter is not None else 0,
                              repeats=repeats, model_fingerprint=engine.info.fingerprint,
                              device=engine.info.device, dtype=engine.info.dtype,
                              threads=torch.get_num_threads())
        return monotone_profile(raw)
    finally:
        for s in slots:
            engine.free_slot(s)


def monotone_profile(profile: LatencyProfile) -> LatencyProfile:
    """Timing noise can make T(n) dip as n grows (then β(b) < 1 and speculation looks free even at α = 0).
    A step over more tokens never costs less, so T and D are made non-decreasing (running max)."""
    import dataclasses

    def running_max(table: dict[int, float]) -> dict[int, float]:
        out, best = {}, 0.0
        for n in sorted(table):
            best = max(best, table[n])
            out[n] = best
        return out

    return dataclasses.replace(profile, target_s=running_max(profile.target_s), draft_s=running_max(profile.draft_s))


def cached_engine_profile(engine: TargetEngine, drafter: ChainDrafter | None, gamma_max: int,
                          cache_dir: str | Path | None = None, refresh: bool = False) -> LatencyProfile:
    """load_or_profile keyed by (model, device, dtype, kernels, weight format, threads, draft shape, batch sizes);
    the weight format enters the key only when it is not bf16, so existing bf16 profiles stay valid."""
    key = {"version": 4, "model": engine.info.fingerprint, "device": engine.info.device, "dtype": engine.info.dtype,
           "native_linears": engine.info.native_linears, "threads": torch.get_num_threads(), "gamma_max": gamma_max,
           **({"weights": engine.info.weights} if engine.info.weights != "bf16" else {}),
           "draft_vocab": drafter.cfg.draft_vocab_size if drafter else 0,
           "batch_sizes": _batch_sizes(engine, DEFAULT_BATCH_SIZES), "backend": type(engine).__name__}
    root = Path(cache_dir) if cache_dir else default_cache_dir() / "profiles"

    def fn() -> LatencyProfile:
        log.info("profiling target and draft latency (once per model/device/dtype/threads)")
        return profile_engine(engine, drafter, gamma_max)

    if refresh:
        from tide_trt.online.profiling import cache_path

        cache_path(root, key).unlink(missing_ok=True)
    return load_or_profile(root, key, fn)
