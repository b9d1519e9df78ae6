"""Helpers shared by benchmarks: machine description, JSON output, prompt sets."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # AVX2 / AVX512: decides which GEMMs are fast
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_json(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        log.info("wrote %s", out)
    print(text)


def closed_loop(
    gen, prompts: list[list[int]], concurrency: int, max_new: int, policy, plugins=(), eos: tuple[int, ...] = ()
) -> dict:
    """Keep `concurrency` requests in flight (continuous batching) until every prompt is served.

    Returns output tokens, wall seconds, verification steps, drafted/accepted counts and τ.
    """
    from tide_trt.engine.generator import GenerationRequest
    from tide_trt.engine.hooks import run_step

    todo = list(enumerate(prompts))
    tokens = steps = drafted = accepted = decode_tokens = 0
    gammas: dict[int, int] = {}
    t0 = time.perf_counter()
    while todo or gen.num_active:
        while todo and gen.num_active < concurrency:
            i, p = todo.pop(0)
            gen.add(GenerationRequest(f"r{i}", p, max_new, stop_token_ids=eos))
        gamma, events, _ = run_step(gen, policy, list(plugins))
        gammas[gamma] = gammas.get(gamma, 0) + 1
        for ev in events:
            tokens += len(ev.new_token_ids)
            if not ev.is_prefill:
                steps += 1
                decode_tokens += len(ev.new_token_ids)
                drafted += ev.num_draft
                accepted += ev.num_accepted
        for rid, seq in list(gen.sequences.items()):
            if seq.finished:
                gen.release(rid)
    return _run_summary(tokens, time.perf_counter() - t0, steps, decode_tokens, drafted, accepted, gammas)


def _run_summary(tokens: int, seconds: float, steps: int, decode_tokens: int, drafted: int, accepted: int,
                 gammas: dict[int, int]) -> dict:
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "steps": steps,
        "decode_tokens": decode_tokens,
        "drafted": drafted,
        "accepted": accepted,
        "tau": decode_tokens / steps if steps else 1.0,
        "acceptance": accepted / drafted if drafted else None,
        "gamma_steps": gammas,
    }


def merge_runs(runs: list[dict]) -> dict:
    """Sum repeated `closed_loop` results of one system into one (throughput = all tokens / all seconds)."""
    gammas: dict[int, int] = {}
    for r in runs:
        for g, n in r["gamma_steps"].items():
            gammas[g] = gammas.get(g, 0) + n
    summed = ("tokens", "seconds", "steps", "decode_tokens", "drafted", "accepted")
    totals = {k: sum(r[k] for r in runs) for k in summed}
    return {**_run_summary(**totals, gammas=gammas), "repeats_tokens_per_s": [r["tokens_per_s"] for r in runs]}
