"""Adaptation under workload drift: no speculation vs static draft vs TIDE (capture + trainer + refit).

    python benchmarks/bench_drift.py [--phase-requests 12] [--max-new-tokens 64] [--out runs/bench_drift.json]

Workload: phases ShareGPT -> HumanEval -> ShareGPT (different ShareGPT prompts in phases 1 and 3), served
greedily at --concurrency requests in flight (continuous batching), default model (bf16).
Systems, each over the identical request stream on the same engine:
  none    plain decoding (γ = 0);
  static  the draft (--draft, default: the shipped one) at fixed γ = --gamma, never updated;
  hybrid  the same static head + the suffix index (draft.suffix defaults: shipped corpus preloaded, finished
          requests of the stream join the global index), no training;
  tide    the same start draft + OnlineAdaptation (signal capture gated by the DriftDetector, refit watcher)
          and a `tide train` process (its own torch thread) training from the signal store and publishing
          versions the server refits between steps; γ per step from the adaptive controller
          (--tide-gamma adaptive, the full system) or fixed at --gamma (--tide-gamma static: adaptation only).
Algorithm 1 knobs are flags because the paper's scale (N = 8192 tokens, EMA rates per ~1000 request-steps)
needs far more traffic than a few minutes of 2 CPU cores serve; the values used are written to the JSON.
Outputs: JSON (per-request records, per-phase summary, TIDE events) and a PNG of τ and throughput over time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from tide_trt.config import ServingConfig, SignalConfig, TideConfig, TrainerConfig
from tide_trt.engine.generator import GenerationRequest, SpeculativeGenerator
from tide_trt.engine.hooks import StaticGamma, run_step
from tide_trt.engine.torch_engine import TorchTargetEngine
from tide_trt.online.adaptation import build_online_plugins

try:
    from benchmarks.common import machine, serving_engine
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from common import machine, serving_engine

log = logging.getLogger("bench_drift")
PHASES = ("sharegpt", "humaneval", "sharegpt2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase-requests", type=int, default=12, help="requests per phase (issue: >= 100)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-prompt-tokens", type=int, default=320)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--draft", default="default", help="start draft: 'default' or a checkpoint dir")
    p.add_argument("--systems", default="none,static,tide")
    p.add_argument("--tide-gamma", choices=("adaptive", "static"), default="adaptive",
                   help="TIDE's γ: the adaptive controller (default) or fixed --gamma like static")
    p.add_argument("--no-collect-when-draft-limited", dest="collect_when_draft_limited", action="store_false",
                   help="TIDE: collect only on drift (paper), not while the controller holds a weak draft off")
    p.add_argument("--draft-limited-retry", type=int, default=2000,
                   help="served request-steps before a suspended draft-limited trigger retries (a phase ≈ 6000)")
    p.add_argument("--warmup-requests", type=int, default=25,
                   help="requests of a phase counted as its warm-up in the after-warm-up throughput")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server (trainer: 1)")
    p.add_argument("--min-new-tokens", type=int, default=600, help="N_threshold for the trainer")
    p.add_argument("--steps-per-round", type=int, default=24)
    p.add_argument("--epochs-per-round", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--drift-ema-short", type=float, default=0.02)
    p.add_argument("--drift-ema-long", type=float, default=0.002)
    p.add_argument("--drift-warmup", type=int, default=150)
    p.add_argument("--drift-epsilon", type=float, default=0.05)
    p.add_argument("--trainer-nice", type=int, default=19, help="niceness of the co-located trainer (0: none)")
    p.add_argument("--work", help="directory for the TIDE stores (default: temporary)")
    p.add_argument("--reuse", help="a previous result JSON whose other systems join this one (same workload args)")
    p.add_argument("--out", default="runs/bench_drift.json")
    p.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    p.add_argument("--window", type=float, default=10.0, help="plot smoothing window, seconds")
    return p.parse_args(argv)


def workload(tokenizer, args: argparse.Namespace) -> list[tuple[str, list[int]]]:
    from tide_trt import workloads
    from tide_trt.runtime import encode_prompt

    n = args.phase_requests
    chat = workloads.sharegpt_prompts(2 * n, seed=3)
    code = workloads.humaneval_prompts(min(n, 164))
    texts = {"sharegpt": chat[:n], "humaneval": code, "sharegpt2": chat[n:]}
    return [(ph, encode_prompt(tokenizer, t)[: args.max_prompt_tokens]) for ph in PHASES for t in texts[ph]]


def tide_config(args: argparse.Namespace, work: Path) -> TideConfig:
    return TideConfig(
        signals=SignalConfig(
            store_dir=str(work / "signals"), shard_tokens=256, flush_seconds=2.0,
            drift_ema_short=args.drift_ema_short, drift_ema_long=args.drift_ema_long,
            drift_warmup_updates=args.drift_warmup, drift_epsilon=args.drift_epsilon,
            draft_limited_retry_steps=args.draft_limited_retry,
        ),
        trainer=TrainerConfig(
            drafts_dir=str(work / "drafts"), min_new_tokens=args.min_new_tokens,
            steps_per_round=args.steps_per_round, epochs_per_round=args.epochs_per_round, lr=args.lr,
            eval_fraction=0.2, poll_seconds=1.0,
        ),
        serving=ServingConfig(refit_poll_seconds=0.5),
    )


def start_trainer(cfg: TideConfig, draft: str, work: Path, nice: int) -> subprocess.Popen:
    doc = {
        "signals": {k: getattr(cfg.signals, k) for k in ("store_dir", "drift_epsilon")},
        "trainer": {
            k: getattr(cfg.trainer, k)
            for k in (
                "drafts_dir",
                "min_new_tokens",
                "steps_per_round",
                "epochs_per_round",
                "lr",
                "eval_fraction",
                "poll_seconds",
            )
        },
        "draft": {"path": draft},
    }
    work.mkdir(parents=True, exist_ok=True)
    path = work / "trainer.yaml"
    path.write_text(yaml.safe_dump(doc))
    err = (work / "trainer.log").open("w")
    cmd = [sys.executable, "-m", "tide_trt.cli", "train", "--config", str(path), "--threads", "1"]
    if nice:  # co-located on the serving machine: the trainer yields the CPU to serving
        cmd = ["nice", "-n", str(nice), *cmd]
    return subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, start_new_session=True)


def stop_trainer(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def serve(
    engine: TorchTargetEngine,
    drafter,
    plugins: list,
    reqs: list[tuple[str, list[int]]],
    args: argparse.Namespace,
    policy,
) -> tuple[list[dict], list[dict]]:
    """Continuous batching over the request stream. Returns per-request records and sampled TIDE events."""
    gen = SpeculativeGenerator(engine, drafter)
    if plugins:
        gen.signal_sink = plugins[0].signal_sink
    queue = list(enumerate(reqs))
    records, events = [], []
    phase_of: dict[str, str] = {}
    t0 = time.perf_counter()
    last_version = drafter.version if drafter is not None else None
    while queue or gen.sequences:
        while queue and len(gen.sequences) < args.concurrency:
            j, (phase, ids) = queue.pop(0)
            rid = f"{phase}-{j}"
            phase_of[rid] = phase
            eos = tuple(engine.info.eos_token_ids)
            gen.add(GenerationRequest(rid, ids, args.max_new_tokens, stop_token_ids=eos))
        gamma, evs, _ = run_step(gen, policy, plugins)
        now = time.perf_counter() - t0
        decode = [e for e in evs if not e.is_prefill]
        # per step: time, output tokens, decode request-steps, their output tokens (τ = tokens / request-steps)
        events.append({"t": now, "event": "step", "gamma": gamma, "tokens": sum(len(e.new_token_ids) for e in evs),
                       "decode": len(decode), "decode_tokens": sum(len(e.new_token_ids) for e in decode)})
        for e in evs:
            if e.finished:
                s = gen.release(e.request_id)
                records.append(
                    {
                        "request_id": e.request_id,
                        "phase": phase_of[e.request_id],
                        "t": now,
                        "tokens": len(s.output_ids),
                        "steps": s.steps,
                        "tau": s.mean_accepted_len,
                        "draft_version": gen.drafter.version if gen.drafter is not None else None,
                    }
                )
        version = gen.drafter.version if gen.drafter is not None else None
        if plugins and version != last_version:
            events.append({"t": now, "event": "refit", "version": version})
            last_version = version
        if plugins and len(records) and records[-1]["t"] == now:
            m = plugins[0].metrics()
            events.append(
                {
                    "t": now,
                    "event": "metrics",
                    "collection": m["signals_collection_enabled"],
                    "acc_short": m["drift_accepted_per_drafted_short"],
                    "acc_long": m["drift_accepted_per_drafted_long"],
                    "detections": m["drift_detections"],
                    "pauses": m["drift_pauses"],
                }
            )
    return records, events


def summarize(records: list[dict], warmup_requests: int = 0) -> dict[str, dict]:
    """Per phase: tokens/s over the phase's completion window, mean τ (token-weighted), and the same after the
    phase's first `warmup_requests` completions (the window starts at the warm-up's last completion)."""
    out, prev_t = {}, 0.0
    for ph in PHASES:
        rs = sorted((r for r in records if r["phase"] == ph), key=lambda r: r["t"])
        if not rs:
            continue
        out[ph] = _window(rs, prev_t)
        if 0 < warmup_requests < len(rs) - 1:
            out[ph]["after_warmup"] = _window(rs[warmup_requests:], rs[warmup_requests - 1]["t"])
        prev_t = rs[-1]["t"]
    total_t = max(r["t"] for r in records)
    out["all"] = {
        "tokens": sum(r["tokens"] for r in records),
        "seconds": total_t,
        "tokens_per_s": sum(r["tokens"] for r in records) / total_t,
    }
    return out


def _window(rs: list[dict], start: float) -> dict:
    end = rs[-1]["t"]
    tokens, steps = sum(r["tokens"] for r in rs), sum(r["steps"] for r in rs)
    return {"requests": len(rs), "tokens": tokens, "seconds": end - start,
            "tokens_per_s": tokens / max(end - start, 1e-9), "tau": (tokens - len(rs)) / steps if steps else 1.0}


def vs_static(results: list[dict], system: str) -> dict:
    """`system` / static tokens/s per phase and on the drifted (code) phase after warm-up ({} if either is absent)."""
    by = {r["system"]: r["summary"] for r in results}
    if system not in by or "static" not in by:
        return {}
    mine, static = by[system], by["static"]
    out = {f"{system}_vs_static_{ph}": mine[ph]["tokens_per_s"] / static[ph]["tokens_per_s"] for ph in PHASES}
    code_m, code_s = mine["humaneval"].get("after_warmup"), static["humaneval"].get("after_warmup")
    if code_m and code_s:
        out[f"{system}_vs_static_code_after_warmup"] = code_m["tokens_per_s"] / code_s["tokens_per_s"]
    return out


def floors(results: list[dict]) -> dict:
    """The issues' floors: code phase TIDE ≥ 1.15 × static after warm-up and TIDE ≥ 0.97 × static in every phase;
    the suffix index + head (hybrid) ≥ 1.3 × the static head on the code phase after warm-up."""
    out = vs_static(results, "tide")
    if out:
        out["code_floor_1.15_met"] = out.get("tide_vs_static_code_after_warmup", 0.0) >= 1.15
        out["every_phase_floor_0.97_met"] = min(out[f"tide_vs_static_{ph}"] for ph in PHASES) >= 0.97
    hybrid = vs_static(results, "hybrid")
    if hybrid:
        hybrid["hybrid_drift_floor_1.3_met"] = hybrid.get("hybrid_vs_static_code_after_warmup", 0.0) >= 1.3
    return {**out, **hybrid}


def run_system(
    name: str, engine: TorchTargetEngine, reqs: list, args: argparse.Namespace, work: Path
) -> dict:
    from tide_trt.config import SuffixConfig
    from tide_trt.runtime import build_drafter, resolve_draft_path

    # hybrid: the static head + the suffix index (draft.suffix defaults; shipped corpus preloaded, then the
    # finished requests of this stream) — what the live index adds on the drifted phases, no training
    suffix = SuffixConfig() if name == "hybrid" else None
    drafter = None if name == "none" else build_drafter(engine, resolve_draft_path(args.draft), suffix=suffix)
    plugins, trainer, cfg = [], None, None
    policy = StaticGamma(0 if drafter is None else args.gamma)
    adaptive = name == "tide" and args.tide_gamma == "adaptive"
    if adaptive:
        policy = tide_controller(engine, drafter, args)
    if name == "tide":
        cfg = tide_config(args, work)
        trainer = start_trainer(cfg, args.draft, work, args.trainer_nice)
        deadline = time.monotonic() + 120
        while not (work / "drafts" / "manifest.jsonl").exists() and time.monotonic() < deadline:
            if trainer.poll() is not None:
                raise RuntimeError(f"trainer exited: {(work / 'trainer.log').read_text()[-2000:]}")
            time.sleep(0.2)
        gen_probe = SpeculativeGenerator(engine, drafter)
        limited = policy.controller if adaptive and args.collect_when_draft_limited else None
        plugins = build_online_plugins(cfg, engine, gen_probe,
                                       draft_limited_fn=(lambda: limited.draft_limited) if limited else None)
    if adaptive:
        plugins.append(policy)  # after the adaptation plugin: plugins[0] stays OnlineAdaptation
    t_start = time.time()
    try:
        records, events = serve(engine, drafter, plugins, reqs, args, policy)
    finally:
        if trainer is not None:
            stop_trainer(trainer)
        for p in plugins:
            p.close()
    result = {"system": name, "records": records, "events": events,
              "summary": summarize(records, args.warmup_requests)}
    if name == "tide":
        from tide_trt.online.store import DraftStore

        rounds = DraftStore(cfg.trainer.drafts_dir).rounds()
        result["rounds"] = [
            {
                "t": r["time"] - t_start,
                **{
                    k: r.get(k)
                    for k in (
                        "round",
                        "version",
                        "deploy",
                        "reason",
                        "eval_acceptance",
                        "parent_eval_acceptance",
                        "served_acceptance",
                        "gain",
                        "required_gain",
                        "data",
                    )
                },
            }
            for r in rounds
        ]
        result["final_metrics"] = plugins[0].metrics()
        if len(plugins) > 1:
            result["controller"] = {"steps_by_gamma": plugins[1].steps_by_gamma, "final": plugins[1].state_dict()}
    return result


def tide_controller(engine: TorchTargetEngine, drafter, args: argparse.Namespace):
    """The adaptive controller over the engine's start-up latency profile (cached per model/threads)."""
    from tide_trt.config import ControllerConfig
    from tide_trt.online.control_plugin import ControllerPlugin
    from tide_trt.online.engine_profile import cached_engine_profile

    gamma_max = max(args.gamma, 4)
    profile = cached_engine_profile(engine, drafter, gamma_max)
    return ControllerPlugin(ControllerConfig(mode="adaptive"), profile, gamma_max, args.gamma)


def windowed(steps: list[dict], window: float) -> tuple[list[float], list[float], list[float]]:
    """Sliding time window over per-step events: (t, tokens/s, τ = decode tokens / decode request-steps)."""
    ts, tps, tau = [], [], []
    lo = 0
    for hi, st in enumerate(steps):
        while steps[lo]["t"] < st["t"] - window:
            lo += 1
        span = steps[lo : hi + 1]
        dt = min(window, st["t"]) or 1e-9  # the first window is shorter
        req = sum(x["decode"] for x in span)
        ts.append(st["t"])
        tps.append(sum(x["tokens"] for x in span) / dt)
        tau.append(sum(x["decode_tokens"] for x in span) / req if req else float("nan"))
    return ts, tps, tau


def plot(results: list[dict], path: Path, window: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tau, ax_tps) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    colors = {"none": "tab:gray", "static": "tab:blue", "tide": "tab:red", "hybrid": "tab:green"}
    for res in results:
        steps = [e for e in res["events"] if e["event"] == "step"]
        t, tps, tau = windowed(steps, window)
        c = colors.get(res["system"])
        ax_tau.plot(t, tau, label=res["system"], color=c)
        ax_tps.plot(t, tps, label=res["system"], color=c)
        for ph in PHASES[1:]:  # phase change: first completion of a request of the next phase
            first = next((r["t"] for r in res["records"] if r["phase"] == ph), None)
            if first is not None:
                for ax in (ax_tau, ax_tps):
                    ax.axvline(first, color=c, linestyle=":", alpha=0.6)
        for ev in res["events"]:
            if ev["event"] == "refit":
                for ax in (ax_tau, ax_tps):
                    ax.axvline(ev["t"], color=c, linestyle="--", alpha=0.9)
    ax_tau.set_ylabel(f"τ (output tokens per verification, {window:g} s window)")
    ax_tps.set_ylabel(f"throughput, tokens/s ({window:g} s window)")
    ax_tps.set_xlabel("seconds (dotted: phase change ShareGPT → HumanEval → ShareGPT; dashed: TIDE refit)")
    ax_tau.legend()
    ax_tau.set_title("Adaptation under drift: no speculation vs static draft vs TIDE")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(results: list[dict]) -> str:
    base = next((r["summary"] for r in results if r["system"] == "none"), None)
    lines = ["| system | phase | requests | tokens/s | τ | speedup vs none |", "|---|---|---|---|---|---|"]
    for res in results:
        for ph, s in res["summary"].items():
            rows = [(ph, s, base.get(ph) if base else None)]
            if "after_warmup" in s:
                rows.append((f"{ph} after warm-up", s["after_warmup"], (base or {}).get(ph, {}).get("after_warmup")))
            for label, row, ref in rows:
                sp = row["tokens_per_s"] / ref["tokens_per_s"] if ref else float("nan")
                lines.append(f"| {res['system']} | {label} | {row.get('requests', '')} | {row['tokens_per_s']:.2f} | "
                             f"{row.get('tau', float('nan')):.3f} | {sp:.3f} |")
    for res in results:
        for r in res.get("rounds", []):
            lines.append(
                f"tide round {r['round']} at {r['t']:.0f}s: {r['reason']} "
                f"(eval {r['eval_acceptance']:.3f} vs served {r['served_acceptance']}, "
                f"version {r['version']})"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("tide_trt.online.drift").setLevel(logging.WARNING)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = serving_engine(args.concurrency, args.max_prompt_tokens, args.max_new_tokens)
    reqs = workload(engine.tokenizer, args)
    work = Path(args.work or tempfile.mkdtemp(prefix="tide-bench-drift-"))
    results = []
    if args.reuse:  # systems measured earlier on the same request stream (the JSON records when and how)
        previous = json.loads(Path(args.reuse).read_text())
        same = ("phase_requests", "max_new_tokens", "max_prompt_tokens", "concurrency", "gamma", "draft", "threads")
        diff = {k: (previous["args"].get(k), getattr(args, k)) for k in same
                if previous["args"].get(k) != getattr(args, k)}
        if diff:
            raise SystemExit(f"--reuse {args.reuse}: workload differs (previous, now): {diff}")
        keep = [r for r in previous["results"] if r["system"] not in args.systems.split(",")]
        for r in keep:
            r["reused_from"] = {"path": args.reuse, "machine": previous["machine"], "args": previous["args"]}
        results.extend(keep)
    for name in args.systems.split(","):
        t0 = time.perf_counter()
        results.append(run_system(name, engine, reqs, args, work / name))
        log.info("%s done in %.0f s: %s", name, time.perf_counter() - t0, results[-1]["summary"]["all"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "drift", "machine": machine(), "args": vars(args),
           "floors": floors(results), "results": results}
    out.write_text(json.dumps(doc, indent=2))
    plot(results, Path(args.plot) if args.plot else out.with_suffix(".png"), args.window)
    print(table(results))
    print(json.dumps(doc["floors"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
