"""Issue 5 benchmark: no speculation vs static speculation (γ=3) vs the adaptive controller, at several
concurrencies, with the trained draft and with a mismatched (random) draft. Also the cost model's predicted
vs measured speedup of static speculation (paper: within 9 %).

    tide bench bench_controller --concurrency 1 4 16 32 --max-new-tokens 48 --out runs/bench_controller.json

The VM's speed drifts by tens of percent over minutes, so the three systems take turns: each turn serves a chunk
of max(2c, 4) new prompts closed-loop at concurrency c with every system (the order rotates), for at least
``--turns`` turns and ``--min-requests`` requests per system. The cost model predicts decode steps, so its error
is reported against the decode-only speedup (steps without a prefill), with α the censored-geometric estimate.
"""

from __future__ import annotations

import argparse
import logging
import statistics

import torch

from benchmarks.common import closed_loop, machine, merge_runs, write_json

log = logging.getLogger(__name__)


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
           paired: list[float]) -> dict:  # fmt: skip
    from tide_trt.online.perf_model import predicted_speedup

    best = max(base["tokens_per_s"], static["tokens_per_s"])
    measured = static["tokens_per_s"] / base["tokens_per_s"]
    decode = static["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    predicted = predicted_speedup(static["alpha"] or 0.0, static_gamma, c, profile)
    return {
        "concurrency": c,
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
    lines = ["| concurrency | draft | no spec tok/s | static γ=3 tok/s | adaptive tok/s "
             "| adaptive / max(no spec, static) | paired by turn: median (min) | same, decode-only steps "
             "| static decode-only speedup: predicted vs measured (error) | adaptive steps by γ |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for pt in result["points"]:
        ratio = pt["adaptive_vs_best"]
        floor = "met" if ratio >= 0.97 else f"missed by {100 * (0.97 - ratio):.1f} pts"
        steps = sorted(pt["adaptive"]["gamma_steps"].items(), key=lambda x: int(x[0]))
        gammas = ", ".join(f"{g}: {n}" for g, n in steps)
        lines.append(f"| {pt['concurrency']} | {pt['draft']} | {pt['no_spec']['tokens_per_s']:.1f} | "
                     f"{pt['static']['tokens_per_s']:.1f} | {pt['adaptive']['tokens_per_s']:.1f} | "
                     f"**{ratio:.3f}** ({floor}) | {pt['adaptive_vs_best_paired_median']:.3f} "
                     f"({min(pt['adaptive_vs_best_by_turn']):.3f}) | {pt['adaptive_vs_best_decode']:.3f} | "
                     f"{pt['static_predicted_speedup']:.3f} vs "
                     f"{pt['static_decode_speedup']:.3f} ({100 * pt['static_model_error']:.1f} %) | {gammas} |")
    errors = [pt["static_model_error"] for pt in result["points"]]
    lines.append(f"floor min {result['floor_adaptive_vs_best_min']:.3f}; cost-model error mean "
                 f"{100 * sum(errors) / len(errors):.1f} %, max {100 * max(errors):.1f} %")
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
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from tide_trt.config import ControllerConfig, EngineConfig, ModelConfig
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
    trained = build_drafter(engine, resolve_draft_path(args.draft), args.lookup_ngram, args.lookup_gamma)
    drafts = {"trained": trained} if args.skip_mismatched else {"trained": trained,
                                                                "mismatched": _mismatched(engine, trained)}
    profile = cached_engine_profile(engine, trained, args.gamma_max)
    extra = _point_turns(args.point_turns)
    plans = {c: _plan(c, max(args.turns, extra.get(c, 0)), args.min_requests) for c in args.concurrency}
    need = max(chunk * turns for chunk, turns in plans.values())
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
        "plans": {str(c): {"chunk": ch, "turns": t} for c, (ch, t) in plans.items()},
        "native_linears": engine.info.native_linears,
        "profile": profile.to_dict(),
        "points": [],
    }
    for c in args.concurrency:
        chunk, turns = plans[c]
        for name, drafter in drafts.items():
            plugin = ControllerPlugin(ControllerConfig(mode="adaptive"), profile, args.gamma_max, args.static_gamma)
            systems = {  # the adaptive controller keeps its state across turns, like a running server
                "no_spec": lambda: (SpeculativeGenerator(engine, None), StaticGamma(0), []),
                "static": lambda d=drafter: (SpeculativeGenerator(engine, d), StaticGamma(args.static_gamma), []),
                "adaptive": lambda d=drafter, pl=plugin: (SpeculativeGenerator(engine, d), pl, [pl]),
            }
            runs: dict[str, list[dict]] = {k: [] for k in systems}
            order = list(systems)
            for t in range(turns):
                part = prompts[t * chunk: (t + 1) * chunk]
                for k in order[t % 3:] + order[: t % 3]:
                    gen, policy, plugins = systems[k]()
                    runs[k].append(closed_loop(gen, part, c, args.max_new_tokens, policy, plugins, eos=eos,
                                               id_prefix=f"t{t}-"))
            point = _point(c, name, *(merge_runs(runs[k]) for k in order), args.static_gamma, profile,
                           _paired_turns(runs))
            log.info("c=%d %s: adaptive/best=%.3f static/none=%.3f decode-only %.3f (predicted %.3f)", c, name,
                     point["adaptive_vs_best"], point["static_vs_no_spec"], point["static_decode_speedup"],
                     point["static_predicted_speedup"])
            result["points"].append(point)
    result["floor_adaptive_vs_best_min"] = min(p["adaptive_vs_best"] for p in result["points"])
    write_json(result, args.out)
    print(table(result))
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
