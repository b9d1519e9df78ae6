"""Helpers shared by benchmarks: machine description, JSON output, prompt sets."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
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


EVERYDAY_PROMPTS = Path(__file__).parent / "data" / "everyday_prompts.json"


def everyday_prompts() -> list[str]:
    """Prompts a new user would try (benchmarks/data/everyday_prompts.json; not from ShareGPT or HumanEval)."""
    return list(json.loads(EVERYDAY_PROMPTS.read_text())["prompts"])


def write_json(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        log.info("wrote %s", out)
    print(text)


def serving_engine(concurrency: int, max_prompt_tokens: int, max_new_tokens: int):
    """The default model on the PyTorch engine (default dtype and kernels) sized for a serving benchmark."""
    from tide_trt.config import EngineConfig, ModelConfig
    from tide_trt.engine.torch_engine import TorchTargetEngine

    return TorchTargetEngine.from_config(
        ModelConfig(),
        EngineConfig(max_batch_size=concurrency, max_seq_len=max_prompt_tokens + max_new_tokens + 16),
    )


def emit(result: dict, out: str | Path, table: str, summary: dict | None = None) -> None:
    """Write the result JSON to `out`, print the markdown table and a one-line JSON summary."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    log.info("wrote %s", out)
    print(table)
    print(json.dumps(result if summary is None else summary))


def closed_loop(
    gen, prompts: list[list[int]], concurrency: int, max_new: int, policy, plugins=(), eos: tuple[int, ...] = (),
    id_prefix: str = "r",
) -> dict:
    """Keep `concurrency` requests in flight (continuous batching) until every prompt is served.

    Returns output tokens, wall seconds, verification steps, drafted/accepted counts, τ, the censored-geometric
    acceptance α̂ = Σk / Σ(k + [k<γ]) (the α of the cost model, not accepted/drafted) and the time and tokens of
    the decode-only steps (steps that ran no prefill: what the cost model predicts).
    """
    from tide_trt.engine.generator import GenerationRequest
    from tide_trt.engine.hooks import run_step

    todo = list(enumerate(prompts))
    c = {k: 0 for k in ("tokens", "steps", "drafted", "accepted", "trials", "decode_tokens", "pure_tokens")}
    pure_seconds = 0.0
    gammas: dict[int, int] = {}
    t0 = time.perf_counter()
    while todo or gen.num_active:
        while todo and gen.num_active < concurrency:
            i, p = todo.pop(0)
            gen.add(GenerationRequest(f"{id_prefix}{i}", p, max_new, stop_token_ids=eos))
        gamma, events, seconds = run_step(gen, policy, list(plugins))
        gammas[gamma] = gammas.get(gamma, 0) + 1
        if events and gen.last_step_prompt_tokens == 0:
            pure_seconds += seconds
            c["pure_tokens"] += sum(len(ev.new_token_ids) for ev in events)
        for ev in events:
            c["tokens"] += len(ev.new_token_ids)
            if not ev.is_prefill:
                c["steps"] += 1
                c["decode_tokens"] += len(ev.new_token_ids)
                c["drafted"] += ev.num_draft
                c["accepted"] += ev.num_accepted
                if ev.num_draft:
                    c["trials"] += ev.num_accepted + (ev.num_accepted < ev.num_draft)
        for rid, seq in list(gen.sequences.items()):
            if seq.finished:
                gen.release(rid)
    return _run_summary(**c, seconds=time.perf_counter() - t0, pure_seconds=pure_seconds, gammas=gammas)


_SUMMED = ("tokens", "seconds", "steps", "decode_tokens", "drafted", "accepted", "trials", "pure_tokens",
           "pure_seconds")


def _run_summary(tokens: int, seconds: float, steps: int, decode_tokens: int, drafted: int, accepted: int,
                 gammas: dict[int, int], trials: int = 0, pure_tokens: int = 0, pure_seconds: float = 0.0) -> dict:
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "steps": steps,
        "decode_tokens": decode_tokens,
        "drafted": drafted,
        "accepted": accepted,
        "trials": trials,
        "pure_tokens": pure_tokens,
        "pure_seconds": pure_seconds,
        "decode_tokens_per_s": pure_tokens / pure_seconds if pure_seconds else None,
        "tau": decode_tokens / steps if steps else 1.0,
        "acceptance": accepted / drafted if drafted else None,
        "alpha": accepted / trials if trials else None,
        "gamma_steps": gammas,
    }


def merge_runs(runs: list[dict]) -> dict:
    """Sum repeated `closed_loop` results of one system into one (throughput = all tokens / all seconds)."""
    gammas: dict[int, int] = {}
    for r in runs:
        for g, n in r["gamma_steps"].items():
            gammas[g] = gammas.get(g, 0) + n
    totals = {k: sum(r.get(k, 0) for r in runs) for k in _SUMMED}
    return {**_run_summary(**totals, gammas=gammas), "repeats_tokens_per_s": [r["tokens_per_s"] for r in runs]}


def paired_overhead_ci(on: list[float], off: list[float]) -> list[float] | None:
    """95 % confidence interval of the overhead 1 − on/off from the adjacent (on, off) pairs: a t interval on
    the mean log ratio (pairs cancel slow drifts; the log makes the ratio symmetric). None with < 3 pairs."""
    logs = [math.log(a / b) for a, b in zip(on, off, strict=True)]
    if len(logs) < 3:
        return None
    from scipy.stats import t as student_t

    t95 = float(student_t.ppf(0.975, len(logs) - 1))
    half = t95 * statistics.stdev(logs) / math.sqrt(len(logs))
    mean = statistics.fmean(logs)
    return [1.0 - math.exp(mean + half), 1.0 - math.exp(mean - half)]
