"""Issue 5 benchmark: no speculation vs static speculation (γ=3) vs the adaptive controller, at several
concurrencies, with the trained draft and with a mismatched (random) draft. Also the cost model's predicted
vs measured speedup of static speculation (paper: within 9 %).

    tide bench bench_controller --concurrency 1 4 16 32 --requests 32 --max-new-tokens 64 \
        --out runs/bench_controller.json
"""

from __future__ import annotations

import argparse
import logging

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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="tide bench bench_controller")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--requests", type=int, default=32, help="requests per (concurrency, system) run")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--gamma-max", type=int, default=4)
    p.add_argument("--static-gamma", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2,
                   help="the three systems take turns this many times per point (rotating who goes first)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from tide_trt.config import ControllerConfig, EngineConfig, ModelConfig
    from tide_trt.engine.generator import SpeculativeGenerator
    from tide_trt.engine.hooks import StaticGamma
    from tide_trt.engine.torch_engine import TorchTargetEngine
    from tide_trt.online.control_plugin import ControllerPlugin
    from tide_trt.online.engine_profile import cached_engine_profile
    from tide_trt.online.perf_model import predicted_speedup
    from tide_trt.runtime import build_drafter, encode_prompt, resolve_draft_path
    from tide_trt.workloads import sharegpt_prompts

    engine = TorchTargetEngine.from_config(
        ModelConfig(),
        EngineConfig(
            dtype="bfloat16", max_batch_size=max(args.concurrency), max_seq_len=384 + args.max_new_tokens + 16
        ),
    )
    trained = build_drafter(engine, resolve_draft_path("default"))
    drafts = {"trained": trained, "mismatched": _mismatched(engine, trained)}
    profile = cached_engine_profile(engine, trained, args.gamma_max)
    prompts = [encode_prompt(engine.tokenizer, t)[-384:] for t in sharegpt_prompts(args.requests, seed=99)]
    eos = engine.info.eos_token_ids
    result = {
        "benchmark": "controller",
        "machine": machine(),
        "requests": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "static_gamma": args.static_gamma,
        "gamma_max": args.gamma_max,
        "repeats": args.repeats,
        "native_linears": engine.info.native_linears,
        "profile": profile.to_dict(),
        "points": [],
    }
    for c in args.concurrency:
        for name, drafter in drafts.items():
            plugin = ControllerPlugin(ControllerConfig(mode="adaptive"), profile, args.gamma_max, args.static_gamma)
            systems = {  # the adaptive controller keeps its state across repeats, like a running server
                "no_spec": lambda: (SpeculativeGenerator(engine, None), StaticGamma(0), []),
                "static": lambda d=drafter: (SpeculativeGenerator(engine, d), StaticGamma(args.static_gamma), []),
                "adaptive": lambda d=drafter, pl=plugin: (SpeculativeGenerator(engine, d), pl, [pl]),
            }
            runs: dict[str, list[dict]] = {k: [] for k in systems}
            order = list(systems)
            for r in range(args.repeats):
                for k in order[r % 3:] + order[: r % 3]:
                    gen, policy, plugins = systems[k]()
                    runs[k].append(closed_loop(gen, prompts, c, args.max_new_tokens, policy, plugins, eos=eos))
            base, static, adaptive = (merge_runs(runs[k]) for k in order)
            best = max(base["tokens_per_s"], static["tokens_per_s"])
            alpha = static["acceptance"] or 0.0
            predicted = predicted_speedup(alpha, args.static_gamma, c, profile)
            measured = static["tokens_per_s"] / base["tokens_per_s"]
            point = {
                "concurrency": c,
                "draft": name,
                "no_spec": base,
                "static": static,
                "adaptive": adaptive,
                "adaptive_vs_best": adaptive["tokens_per_s"] / best,
                "static_vs_no_spec": measured,
                "adaptive_vs_no_spec": adaptive["tokens_per_s"] / base["tokens_per_s"],
                "static_predicted_speedup": predicted,
                "static_model_error": abs(predicted - measured) / measured,
            }
            log.info(
                "c=%d %s: adaptive/best=%.3f static/none=%.3f (predicted %.3f)",
                c,
                name,
                point["adaptive_vs_best"],
                measured,
                predicted,
            )
            result["points"].append(point)
    result["floor_adaptive_vs_best_min"] = min(p["adaptive_vs_best"] for p in result["points"])
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
