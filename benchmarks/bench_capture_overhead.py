"""Serving throughput with signal capture on vs off (same requests, interleaved repetitions).

    python benchmarks/bench_capture_overhead.py [--requests 8] [--max-new-tokens 64] [--reps 4] [--out FILE]

Default model (bf16), greedy, continuous batching at --concurrency. "on": the OnlineAdaptation plugin
with a SignalBuffer that captures every request (prompt + output positions) into a temporary signal
store; "off": the same plugin without a buffer and no signal sink. Repetitions alternate the order
(on/off, off/on, ...) so machine noise hits both. The draft is the shipped default draft when installed
(γ = --gamma), else plain decoding; capture does the same work either way (one sink call per sequence
per step). Output: per-run tokens/s, the mean of each mode, and the overhead (1 − on/off).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tide_trt.config import SignalConfig
from tide_trt.engine.generator import GenerationRequest, SpeculativeGenerator
from tide_trt.engine.hooks import StaticGamma, run_step
from tide_trt.engine.torch_engine import TorchTargetEngine
from tide_trt.online.adaptation import OnlineAdaptation
from tide_trt.online.drift import DriftDetector
from tide_trt.online.signals import ShardInfo, SignalBuffer
from tide_trt.online.store import SignalStore

try:
    from benchmarks.common import emit, machine, paired_overhead_ci, serving_engine
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from common import emit, machine, paired_overhead_ci, serving_engine

log = logging.getLogger("bench_capture_overhead")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-prompt-tokens", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--reps", type=int, default=4, help="repetitions of each mode")
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--draft", default="default", help="'default', a checkpoint dir, or 'none'")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/bench_capture_overhead.json")
    return p.parse_args(argv)


def load_drafter(engine: TorchTargetEngine, which: str):
    from tide_trt.errors import TideError
    from tide_trt.runtime import build_drafter, resolve_draft_path

    try:
        path = resolve_draft_path(which)
    except TideError as exc:
        log.warning("%s; running plain decoding", exc)
        return None
    return build_drafter(engine, path) if path else None


def serve_all(
    engine: TorchTargetEngine,
    drafter,
    prompts: list[list[int]],
    args: argparse.Namespace,
    capture: bool,
    root: Path,
) -> dict:
    buf = None
    if capture:
        i = engine.info
        info = ShardInfo(i.fingerprint, i.name, i.capture_layers, i.hidden_size)
        buf = SignalBuffer(SignalStore(root), info, collect_fn=lambda: True)  # capture every request
    plugin = OnlineAdaptation(DriftDetector(SignalConfig()), buf, None)
    sink_s = [0.0]

    def timed_sink(*a) -> None:  # time spent on the engine thread inside the sink (the hot-path cost)
        t = time.perf_counter()
        buf.sink(*a)
        sink_s[0] += time.perf_counter() - t

    gen = SpeculativeGenerator(engine, drafter, signal_sink=timed_sink if buf is not None else None)
    gamma = StaticGamma(args.gamma if drafter is not None else 0)
    queue = list(enumerate(prompts))
    outputs: dict[str, list[int]] = {}
    t0, c0 = time.perf_counter(), time.process_time()
    while queue or gen.sequences:
        while queue and len(gen.sequences) < args.concurrency:
            j, ids = queue.pop(0)
            gen.add(GenerationRequest(f"r{j}", ids, args.max_new_tokens))
        _, events, _ = run_step(gen, gamma, [plugin])
        for e in events:
            if e.finished:
                outputs[e.request_id] = gen.release(e.request_id).output_ids
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    plugin.close()
    flush_s = time.perf_counter() - t1
    cpu_s = time.process_time() - c0  # every thread of this process, the writer's final flush included
    tokens = sum(len(v) for v in outputs.values())
    return {
        "capture": capture,
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "final_flush_seconds": flush_s,
        "cpu_ms_per_token": 1e3 * cpu_s / tokens,
        "sink_seconds": sink_s[0],
        "sink_fraction": sink_s[0] / seconds,
        "outputs": outputs,
        "signals": buf.metrics() if buf is not None else {},
    }


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    from tide_trt import workloads
    from tide_trt.runtime import encode_prompt

    engine = serving_engine(args.concurrency, args.max_prompt_tokens, args.max_new_tokens)
    drafter = load_drafter(engine, args.draft)
    prompts = [
        encode_prompt(engine.tokenizer, t)[: args.max_prompt_tokens]
        for t in workloads.sharegpt_prompts(args.requests, seed=1)
    ]
    serve_all(engine, drafter, prompts[:2], args, True, Path(tempfile.mkdtemp()))  # warm-up
    runs = []
    for rep in range(args.reps):
        for capture in (True, False) if rep % 2 == 0 else (False, True):
            with tempfile.TemporaryDirectory(prefix="tide-bench-capture-") as root:
                r = serve_all(engine, drafter, prompts, args, capture, Path(root))
            log.info("rep %d capture=%s: %.2f tok/s", rep, capture, r["tokens_per_s"])
            runs.append(r)
    ref = runs[0]["outputs"]
    identical = all(r["outputs"] == ref for r in runs)
    on = [r["tokens_per_s"] for r in runs if r["capture"]]
    off = [r["tokens_per_s"] for r in runs if not r["capture"]]
    for r in runs:
        r.pop("outputs")
    return {
        "benchmark": "capture_overhead",
        "machine": machine(),
        "threads": args.threads,
        "gamma": args.gamma if drafter else 0,
        "draft": args.draft if drafter else "none",
        "outputs_identical": identical,
        "tokens_per_s_on": statistics.mean(on),
        "tokens_per_s_off": statistics.mean(off),
        "overhead": 1.0 - statistics.mean(on) / statistics.mean(off),
        "overhead_median_runs": 1.0 - statistics.median(on) / statistics.median(off),
        "sink_fraction": statistics.mean(r["sink_fraction"] for r in runs if r["capture"]),
        "noise_cv_off": statistics.pstdev(off) / statistics.mean(off),
        # repetitions are adjacent (on, off) pairs: the median pair ratio cancels slow machine drifts
        "overhead_paired_median": 1.0 - statistics.median(a / b for a, b in zip(on, off, strict=True)),
        "overhead_paired_ci95": paired_overhead_ci(on, off),
        "cpu_overhead": statistics.mean(r["cpu_ms_per_token"] for r in runs if r["capture"])
        / statistics.mean(r["cpu_ms_per_token"] for r in runs if not r["capture"])
        - 1.0,
        "runs": runs,
        "args": vars(args),
    }


def table(r: dict) -> str:
    return "\n".join(
        [
            "| capture | tokens/s (mean) | runs |",
            f"| on      | {r['tokens_per_s_on']:15.2f} | "
            + ", ".join(f"{x['tokens_per_s']:.2f}" for x in r["runs"] if x["capture"])
            + " |",
            f"| off     | {r['tokens_per_s_off']:15.2f} | "
            + ", ".join(f"{x['tokens_per_s']:.2f}" for x in r["runs"] if not x["capture"])
            + " |",
            f"overhead {100 * r['overhead']:.2f}% (medians: {100 * r['overhead_median_runs']:.2f}%; "
            f"run-to-run "
            f"noise of 'off' {100 * r['noise_cv_off']:.1f}% CV); time inside the sink on the engine thread: "
            f"{100 * r['sink_fraction']:.3f}% of serving time; paired-median overhead "
            f"{100 * r['overhead_paired_median']:.2f}% (95 % CI {_pct_range(r['overhead_paired_ci95'])}); "
            f"CPU time per token (all threads) "
            f"{100 * r['cpu_overhead']:+.2f}%; "
            f"γ={r['gamma']}, draft={r['draft']}, outputs identical: {r['outputs_identical']}",
        ]
    )


def _pct_range(ci: list[float] | None) -> str:
    return "n/a" if ci is None else f"{100 * ci[0]:+.2f}% … {100 * ci[1]:+.2f}%"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    result = run(args)
    emit(result, args.out, table(result), {k: v for k, v in result.items() if k != "runs"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
