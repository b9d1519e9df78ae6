"""Issues 5 and 21: no speculation vs static speculation (γ=3) vs the adaptive controller, at several
concurrencies, with the trained draft and with a mismatched (random) draft, in phases: "quiet" (the machine as it
is) and "loaded" (the benchmark starts `--hog-procs` CPU-bound processes for the phase, each ending by itself after
`--hog-max-seconds` at the latest and stopped when the phase ends). Also the cost model's predicted vs measured
speedup of static speculation (paper: within 9 %), and the adaptive controller's step-time prediction error over
each phase: its online-corrected cost model vs the start-up profile alone.

    tide bench bench_controller --concurrency 1 4 16 32 --max-new-tokens 48 --out runs/bench_controller.json

The VM's speed drifts by tens of percent over minutes, so the three systems take turns: each turn serves a chunk
of max(2c, 4) new prompts closed-loop at concurrency c with every system (the order rotates), for at least
``--turns`` turns and ``--min-requests`` requests per system and phase. The adaptive controller keeps its state
across turns and phases, like a running server. The cost model predicts decode steps, so its error is reported
against the decode-only speedup (steps without a prefill), with α the censored-geometric estimate.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import subprocess
import sys
from collections.abc import Iterator

import torch

from benchmarks.common import closed_loop, machine, merge_runs, write_json

log = logging.getLogger(__name__)


_HOG = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"


@contextlib.contextmanager
def cpu_hog(procs: int, max_seconds: float) -> Iterator[None]:
    """`procs` busy-looping Python processes for the duration of the block; each exits by itself after
    `max_seconds` (the bound holds even if this process dies) and is terminated when the block ends."""
    hogs = [subprocess.Popen([sys.executable, "-c", _HOG, str(max_seconds)]) for _ in range(max(procs, 0))]
    if hogs:
        log.info("started %d CPU hog process(es) (pids %s, at most %.0f s)", len(hogs), [h.pid for h in hogs],
                 max_seconds)
    try:
        yield
    finally:
        for h in hogs:
            h.terminate()
        for h in hogs:
            try:
                h.wait(timeout=10)
            except subprocess.TimeoutExpired:
                h.kill()
                h.wait()


def _prediction_error(before, after) -> dict:
    """|Σ predicted − Σ measured| / Σ measured over the adaptive system's timed steps between two cost-model
    snapshots: the corrected model's predictions (made before each step was observed) and the start-up profile's."""
    measured = after.measured_seconds - before.measured_seconds
    if measured <= 0:
        return {"steps": 0, "corrected": None, "startup": None}
    corrected = after.predicted_seconds - before.predicted_seconds
    startup = after.predicted_seconds_startup - before.predicted_seconds_startup
    return {"steps": after.steps_observed - before.steps_observed, "measured_seconds": measured,
            "corrected": abs(corrected - measured) / measured, "startup": abs(startup - measured) / measured,
            "load_factor_end": after.load_factor}


def _with_head_of(fresh, drafter):
    """`fresh` (a newly built drafter: its own suffix index) serving the head of `drafter`."""
    fresh.swap(drafter.head, drafter.version)
    return fresh


def _mismatched(engine, trained):
    from tide_trt.draft.drafter import ChainDrafter
    from tide_trt.training.offline import new_head

    torch.manual_seed(0)
    head = new_head(engine, trained.head.d2t.clone())
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.5)
    return ChainDrafter.for_engine(head, engine.info)


def _plan(concurrency: int, turns: int, min_requests: int) -> tuple[int, int]:
    """(prompts per turn, turns) for one concurrency: chunks of max(2c, 4) prompts, enough turns for both floors."""
    chunk = max(2 * concurrency, 4)
    return chunk, max(turns, -(-min_requests // chunk))


def _point_turns(specs: list[str]) -> dict[int, int]:
    """`--point-turns 4:6 16:6` -> {4: 6, 16: 6} (more turns where the noise is largest)."""
    out = {}
    for spec in specs:
        c, _, n = spec.partition(":")
        if not (c.isdigit() and n.isdigit()):
            raise SystemExit(f"--point-turns takes CONCURRENCY:TURNS, got {spec!r}")
        out[int(c)] = int(n)
    return out


def _paired_turns(runs: dict[str, list[dict]]) -> list[float]:
    """adaptive / max(no spec, static) within each turn: the three systems of a turn ran minutes apart at most,
    so the VM's slow drift cancels in each ratio (a paired estimate next to the pooled one)."""
    return [a["tokens_per_s"] / max(n["tokens_per_s"], s["tokens_per_s"])
            for n, s, a in zip(runs["no_spec"], runs["static"], runs["adaptive"], strict=True)]  # fmt: skip


def _point(c: int, draft: str, base: dict, static: dict, adaptive: dict, static_gamma: int, profile,
           paired: list[float], phase: str = "quiet") -> dict:  # fmt: skip
    from tide_trt.online.perf_model import predicted_speedup

    best = max(base["tokens_per_s"], static["tokens_per_s"])
    measured = static["tokens_per_s"] / base["tokens_per_s"]
    decode = static["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    predicted = predicted_speedup(static["alpha"] or 0.0, static_gamma, c, profile)
    return {
        "concurrency": c,
        "phase": phase,
        "draft": draft,
        "no_spec": base,
        "static": static,
        "adaptive": adaptive,
        "adaptive_vs_best": adaptive["tokens_per_s"] / best,
        "adaptive_vs_best_by_turn": paired,
        "adaptive_vs_best_paired_median": statistics.median(paired),
        # the controller only acts on decode steps: the same ratio over decode-only steps (prefill excluded)
        "adaptive_vs_best_decode": adaptive["decode_tokens_per_s"]
        / max(base["decode_tokens_per_s"], static["decode_tokens_per_s"]),
        "static_vs_no_spec": measured,
        "adaptive_vs_no_spec": adaptive["tokens_per_s"] / base["tokens_per_s"],
        "static_decode_speedup": decode,
        "static_predicted_speedup": predicted,
        "static_model_error": abs(predicted - decode) / decode,
    }


def table(result: dict) -> str:
    """Markdown table of a bench_controller result (the one in benchmarks/README.md)."""
    lines = ["| concurrency | phase | draft | no spec tok/s | static γ=3 tok/s | adaptive tok/s "
             "| adaptive / max(no spec, static) | paired by turn: median (min) | same, decode-only steps "
             "| adaptive step-time prediction error: corrected (start-up) | static decode-only speedup: predicted "
             "vs measured (error) | adaptive steps by γ |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for pt in result["points"]:
        ratio = pt["adaptive_vs_best"]
        floor = "met" if ratio >= 0.97 else f"missed by {100 * (0.97 - ratio):.1f} pts"
        steps = sorted(pt["adaptive"]["gamma_steps"].items(), key=lambda x: int(x[0]))
        gammas = ", ".join(f"{g}: {n}" for g, n in steps)
        err = pt.get("adaptive_prediction_error") or {}
        err_s = (f"{100 * err['corrected']:.1f} % ({100 * err['startup']:.1f} %)"
                 if err.get("corrected") is not None else "-")
        lines.append(f"| {pt['concurrency']} | {pt.get('phase', 'quiet')} | {pt['draft']} | "
                     f"{pt['no_spec']['tokens_per_s']:.1f} | "
                     f"{pt['static']['tokens_per_s']:.1f} | {pt['adaptive']['tokens_per_s']:.1f} | "
                     f"**{ratio:.3f}** ({floor}) | {pt['adaptive_vs_best_paired_median']:.3f} "
                     f"({min(pt['adaptive_vs_best_by_turn']):.3f}) | {pt['adaptive_vs_best_decode']:.3f} | {err_s} | "
                     f"{pt['static_predicted_speedup']:.3f} vs "
                     f"{pt['static_decode_speedup']:.3f} ({100 * pt['static_model_error']:.1f} %) | {gammas} |")
    errors = [pt["static_model_error"] for pt in result["points"]]
    lines.append(f"floor min {result['floor_adaptive_vs_best_min']:.3f}; static cost-model (start-up profile) error "
                 f"mean {100 * sum(errors) / len(errors):.1f} %, max {100 * max(errors):.1f} %")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="tide bench bench_controller")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--turns", type=int, default=4, help="turns per point (each system serves one chunk per turn)")
    p.add_argument("--min-requests", type=int, default=32, help="at least this many requests per (point, system)")
    p.add_argument("--point-turns", nargs="*", default=[], metavar="C:N", help="at least N turns at concurrency C")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--max-prompt-tokens", type=int, default=384,
                   help="prompts keep their last N tokens (shorter: a more decode-dominated run)")
    p.add_argument("--gamma-max", type=int, default=4)
    p.add_argument("--static-gamma", type=int, default=3)
    p.add_argument("--draft", default="default", help="the trained draft: a shipped name or a checkpoint dir")
    p.add_argument("--lookup-ngram", type=int, default=0, help="draft.lookup_ngram of the trained draft")
    p.add_argument("--lookup-gamma", type=int, default=0, help="draft.lookup_gamma of the trained draft")
    p.add_argument("--skip-mismatched", action="store_true", help="only the trained draft")
    p.add_argument("--suffix", choices=["on", "off"], default="on",
                   help="draft.suffix (the serving default: on): the suffix index + head hybrid; static and adaptive "
                        "then each get their own drafter, so that one system's served answers never reach the other's "
                        "global index")
    p.add_argument("--warmup-requests", type=int, default=2,
                   help="requests each system serves before the measured turns (first-call costs, not measured)")
    p.add_argument("--phases", nargs="+", default=["quiet", "loaded"], choices=["quiet", "loaded"],
                   help="phases in order; 'loaded' runs with --hog-procs CPU hog processes")
    p.add_argument("--hog-procs", type=int, default=2, help="busy-loop processes during a loaded phase")
    p.add_argument("--hog-max-seconds", type=float, default=900.0,
                   help="each hog process exits by itself after this long (a bound if the benchmark dies)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from tide_trt.config import ControllerConfig, EngineConfig, ModelConfig, SuffixConfig
    from tide_trt.engine.generator import SpeculativeGenerator
    from tide_trt.engine.hooks import StaticGamma
    from tide_trt.engine.torch_engine import TorchTargetEngine
    from tide_trt.online.control_plugin import ControllerPlugin
    from tide_trt.online.engine_profile import cached_engine_profile
    from tide_trt.runtime import build_drafter, encode_prompt, resolve_draft_path
    from tide_trt.workloads import sharegpt_prompts

    engine = TorchTargetEngine.from_config(
        ModelConfig(),
        EngineConfig(
            dtype="bfloat16", max_batch_size=max(args.concurrency),
            max_seq_len=args.max_prompt_tokens + args.max_new_tokens + 16,
        ),
    )
    suffix = SuffixConfig() if args.suffix == "on" else None

    def trained_drafter():
        return build_drafter(engine, resolve_draft_path(args.draft), args.lookup_ngram, args.lookup_gamma, suffix)

    trained = trained_drafter()
    drafts = {"trained": trained} if args.skip_mismatched else {"trained": trained,
                                                                "mismatched": _mismatched(engine, trained)}
    profile = cached_engine_profile(engine, trained, args.gamma_max)
    extra = _point_turns(args.point_turns)
    plans = {c: _plan(c, max(args.turns, extra.get(c, 0)), args.min_requests) for c in args.concurrency}
    need = max(chunk * turns for chunk, turns in plans.values()) * len(args.phases) + max(args.warmup_requests, 0)
    prompts = [encode_prompt(engine.tokenizer, t)[-args.max_prompt_tokens:]
               for t in sharegpt_prompts(need, seed=99)]
    eos = engine.info.eos_token_ids
    result = {
        "benchmark": "controller",
        "machine": machine(),
        "max_new_tokens": args.max_new_tokens,
        "max_prompt_tokens": args.max_prompt_tokens,
        "static_gamma": args.static_gamma,
        "gamma_max": args.gamma_max,
        "draft": str(resolve_draft_path(args.draft)),
        "lookup_ngram": args.lookup_ngram,
        "suffix": args.suffix,
        "phases": args.phases,
        "hog_procs": args.hog_procs,
        "plans": {str(c): {"chunk": ch, "turns": t} for c, (ch, t) in plans.items()},
        "native_linears": engine.info.native_linears,
        "profile": profile.to_dict(),
        "points": [],
    }
    for c in args.concurrency:
        chunk, turns = plans[c]
        for name, drafter in drafts.items():
            plugin = ControllerPlugin(ControllerConfig(mode="adaptive"), profile, args.gamma_max, args.static_gamma)
            # with the suffix index each speculating system has its own drafter (its own global index of what it
            # served); the head weights are the same
            static_d, adaptive_d = ((drafter, drafter) if suffix is None else
                                    (_with_head_of(trained_drafter(), drafter),
                                     _with_head_of(trained_drafter(), drafter)))
            systems = {  # the adaptive controller keeps its state across turns and phases, like a running server
                "no_spec": lambda: (SpeculativeGenerator(engine, None), StaticGamma(0), []),
                "static": lambda d=static_d: (SpeculativeGenerator(engine, d), StaticGamma(args.static_gamma), []),
                "adaptive": lambda d=adaptive_d, pl=plugin: (SpeculativeGenerator(engine, d), pl, [pl]),
            }
            order = list(systems)
            warm = prompts[-max(args.warmup_requests, 0):] if args.warmup_requests > 0 else []
            for k in order:  # kernels, allocator and caches warmed for every system (the adaptive state too)
                if warm:
                    gen, policy, plugins = systems[k]()
                    closed_loop(gen, warm, c, min(args.max_new_tokens, 16), policy, plugins, eos=eos, id_prefix="w-")
            for ph, phase in enumerate(args.phases):
                runs: dict[str, list[dict]] = {k: [] for k in systems}
                with cpu_hog(args.hog_procs if phase == "loaded" else 0, args.hog_max_seconds):
                    cost_before = plugin.controller.cost.snapshot()
                    for t in range(turns):
                        lo = (ph * turns + t) * chunk
                        part = prompts[lo: lo + chunk]
                        for k in order[t % 3:] + order[: t % 3]:
                            gen, policy, plugins = systems[k]()
                            runs[k].append(closed_loop(gen, part, c, args.max_new_tokens, policy, plugins, eos=eos,
                                                       id_prefix=f"{phase}{t}-"))
                    cost_after = plugin.controller.cost.snapshot()
                point = _point(c, name, *(merge_runs(runs[k]) for k in order), args.static_gamma, profile,
                               _paired_turns(runs), phase)
                point["adaptive_prediction_error"] = _prediction_error(cost_before, cost_after)
                state = plugin.state()
                point["adaptive_controller"] = {"guard_offs": state.guard_offs, "plain_probes": state.plain_probes,
                                                "switches": state.num_switches, "probes": state.num_probes,
                                                "schedule": state.schedule, "alpha": state.global_alpha,
                                                "measured_speedup": state.measured_speedup}
                err = point["adaptive_prediction_error"]
                log.info("c=%d %s %s: adaptive/best=%.3f static/none=%.3f decode-only %.3f (predicted %.3f); "
                         "prediction error corrected %s start-up %s", c, phase, name, point["adaptive_vs_best"],
                         point["static_vs_no_spec"], point["static_decode_speedup"],
                         point["static_predicted_speedup"], err.get("corrected"), err.get("startup"))
                result["points"].append(point)
    result["floor_adaptive_vs_best_min"] = min(p["adaptive_vs_best"] for p in result["points"])
    write_json(result, args.out)
    print(table(result))
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
