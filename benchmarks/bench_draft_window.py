"""Draft catch-up window: τ and decode speed with the draft's catch-up bounded to W positions (0 = unbounded).

`tide bench bench_draft_window --out benchmarks/results/bench_draft_window.json`
Batch 1, greedy, static γ, the shipped draft, ShareGPT prompts of at least --min-prompt-tokens tokens (the
window only acts when more positions are pending than W: a new prompt, or a sequence speculation skipped). Greedy
outputs are identical for every W (lossless), so τ differences come from the draft's context alone. Also times one
catch-up at batch --catch-up-batch over --catch-up-context positions per W (what a full-batch probe pays after
speculation was off). Windows are run in turn on the same prompts; JSON out.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from benchmarks.common import closed_loop, machine, serving_engine, write_json

log = logging.getLogger("bench_draft_window")


def _catch_up_seconds(engine, drafter, batch: int, context: int, windows: list[int], repeats: int = 3) -> dict:
    """Median seconds of one proposal (γ = 2) whose catch-up covers min(W, context) positions per row."""
    gen = torch.Generator().manual_seed(0)
    slots = [engine.allocate_slot() for _ in range(batch)]
    try:
        ctx = torch.randint(100, engine.info.vocab_size, (batch, context), generator=gen).tolist()
        hidden = engine.forward(slots, ctx).hidden  # [B, context, C, H]
        out = {}
        for w in windows:
            m = context if w == 0 else min(w, context)
            times = []
            for _ in range(repeats):
                for s in slots:
                    drafter.reset_slot(s)
                t0 = time.perf_counter()
                drafter.propose(slots, [hidden[b, context - m:] for b in range(batch)],
                                [ctx[b][context - m:] for b in range(batch)], 2, None)
                times.append(time.perf_counter() - t0)
            out[str(w)] = sorted(times)[repeats // 2]
        return out
    finally:
        for s in slots:
            drafter.reset_slot(s)
            engine.free_slot(s)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="tide bench bench_draft_window")
    p.add_argument("--windows", type=int, nargs="+", default=[0, 32, 64, 128])
    p.add_argument("--prompts", type=int, default=10)
    p.add_argument("--min-prompt-tokens", type=int, default=200)
    p.add_argument("--max-prompt-tokens", type=int, default=384)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--catch-up-batch", type=int, default=32)
    p.add_argument("--catch-up-context", type=int, default=400)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from tide_trt.engine.generator import SpeculativeGenerator
    from tide_trt.engine.hooks import StaticGamma
    from tide_trt.runtime import build_drafter, encode_prompt, resolve_draft_path
    from tide_trt.workloads import sharegpt_prompts

    engine = serving_engine(max(args.catch_up_batch, 1), max(args.max_prompt_tokens, args.catch_up_context),
                            args.max_new_tokens)
    drafter = build_drafter(engine, resolve_draft_path("default"))
    candidates = (encode_prompt(engine.tokenizer, t)[-args.max_prompt_tokens:]
                  for t in sharegpt_prompts(30 * args.prompts, seed=7))
    prompts = [q for q in candidates if len(q) >= args.min_prompt_tokens][: args.prompts]
    eos = engine.info.eos_token_ids
    runs = {}
    for w in args.windows:
        drafter.catch_up_window = w
        gen = SpeculativeGenerator(engine, drafter)
        r = closed_loop(gen, prompts, 1, args.max_new_tokens, StaticGamma(args.gamma), eos=eos, id_prefix=f"w{w}-")
        runs[str(w)] = {k: r[k] for k in ("tau", "alpha", "tokens", "seconds", "decode_tokens_per_s")}
        log.info("window %d: tau %.3f alpha %.3f", w, r["tau"], r["alpha"] or 0.0)
    result = {
        "benchmark": "draft_window", "machine": machine(), "gamma": args.gamma, "prompts": len(prompts),
        "prompt_tokens": [len(q) for q in prompts], "max_new_tokens": args.max_new_tokens, "runs": runs,
        "catch_up_seconds": _catch_up_seconds(engine, drafter, args.catch_up_batch, args.catch_up_context,
                                              args.windows),
        "catch_up_batch": args.catch_up_batch, "catch_up_context": args.catch_up_context,
    }
    write_json(result, args.out)
    print("| window | τ | α | decode tok/s | catch-up, batch "
          f"{args.catch_up_batch} × {args.catch_up_context} positions |\n|---|---|---|---|---|")
    for w in args.windows:
        r = runs[str(w)]
        print(f"| {w or 'unbounded'} | {r['tau']:.3f} | {r['alpha'] or 0:.3f} | {r['decode_tokens_per_s']:.1f} | "
              f"{1e3 * result['catch_up_seconds'][str(w)]:.0f} ms |")
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
