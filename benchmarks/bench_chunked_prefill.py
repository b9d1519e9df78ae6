"""Chunked prefill: time to first token of short requests queued behind a long prompt, one-shot vs chunked.

`tide bench bench_chunked_prefill --out benchmarks/results/bench_chunked_prefill.json`
The default model on the CPU engine (default dtype and kernels), plain decoding (γ = 0: prefill scheduling alone).
One long prompt (ShareGPT eval prompts joined to --long-tokens tokens) arrives first, then --short short ShareGPT
eval prompts at the same moment. Each engine step carries decode tokens first, then prompt chunks under
`engine.max_num_tokens`; a budget of at least the whole queue is the old one-shot prefill. Per budget: time to
first token (TTFT) of the short requests and of the long one, time to finish everything, the largest step. Budgets
run in turn on the same prompts (--repeats rounds, medians); JSON out.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from benchmarks.common import machine, write_json

log = logging.getLogger("bench_chunked_prefill")


def _prompts(tokenizer, n_short: int, long_tokens: int) -> tuple[list[int], list[list[int]]]:
    from tide_trt.runtime import encode_prompt
    from tide_trt.workloads import sharegpt_prompts

    texts = sharegpt_prompts(n_short + 40, seed=77)
    shorts = [encode_prompt(tokenizer, t)[-96:] for t in texts[:n_short]]
    body: list[int] = []
    for t in texts[n_short:]:
        body += tokenizer.encode(t)
        if len(body) >= long_tokens:
            break
    long = encode_prompt(tokenizer, tokenizer.decode(body[:long_tokens]))[:long_tokens]
    return long, shorts


def _run(engine, long: list[int], shorts: list[list[int]], max_new: int, long_after_steps: int = 0) -> dict:
    """long_after_steps = 0: the long prompt arrives first, the short ones with it (TTFT of queued shorts);
    > 0: the short requests decode first and the long prompt arrives after that many steps (decode stall)."""
    from tide_trt.engine.generator import GenerationRequest, SpeculativeGenerator

    gen = SpeculativeGenerator(engine)
    sizes: list[int] = []
    inner = engine.forward_step

    def counted(batch):
        sizes.append(batch.num_tokens)
        return inner(batch)

    engine.forward_step = counted
    try:
        t0 = time.perf_counter()
        if not long_after_steps:
            gen.add(GenerationRequest("long", long, max_new))
        for i, p in enumerate(shorts):
            gen.add(GenerationRequest(f"s{i}", p, max_new))
        ttft: dict[str, float] = {}
        finish: dict[str, float] = {}
        last: dict[str, float] = {}
        gaps: list[float] = []  # inter-token gaps of the short requests
        long_arrival = 0.0
        step = 0
        while gen.sequences:
            if long_after_steps and step == long_after_steps:
                long_arrival = time.perf_counter() - t0
                gen.add(GenerationRequest("long", long, max_new))
            events = gen.step(0)
            step += 1
            now = time.perf_counter() - t0
            for ev in events:
                if ev.request_id != "long" and ev.request_id in last:
                    gaps.append(now - last[ev.request_id])
                last[ev.request_id] = now
                ttft.setdefault(ev.request_id, now)
                if ev.finished:
                    finish[ev.request_id] = now
                    gen.release(ev.request_id)
    finally:
        del engine.forward_step
    short_ttft = [ttft[f"s{i}"] for i in range(len(shorts))]
    return {"short_ttft_mean_s": statistics.fmean(short_ttft), "short_ttft_max_s": max(short_ttft),
            "long_ttft_s": ttft["long"] - long_arrival, "short_max_gap_s": max(gaps, default=0.0),
            "all_done_s": max(finish.values()), "steps": len(sizes), "max_step_tokens": max(sizes)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--long-tokens", type=int, default=896)
    ap.add_argument("--short", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--budgets", type=int, nargs="+", default=[4096, 512, 256])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/bench_chunked_prefill.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from tide_trt.config import EngineConfig, ModelConfig
    from tide_trt.engine.torch_engine import TorchTargetEngine

    engines = {b: TorchTargetEngine.from_config(ModelConfig(), EngineConfig(
        max_batch_size=8, max_seq_len=args.long_tokens + args.max_new_tokens + 16, max_num_tokens=b))
        for b in args.budgets}
    long, shorts = _prompts(next(iter(engines.values())).tokenizer, args.short, args.long_tokens)
    scenarios = {"queued": 0, "stall": 3}  # shorts queued behind the long prompt; long prompt arriving mid-decode
    runs: dict[str, list[dict]] = {f"{sc}/{b}": [] for sc in scenarios for b in args.budgets}
    for _ in range(args.repeats):
        for sc, after in scenarios.items():
            for b, engine in engines.items():
                runs[f"{sc}/{b}"].append(_run(engine, long, shorts, args.max_new_tokens, after))
    rows = []
    for key, rs in runs.items():
        sc, b = key.split("/")
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        rows.append({"scenario": sc, "max_num_tokens": int(b),
                     "one_shot": int(b) >= len(long) + sum(map(len, shorts)), **med})
    table = ["| scenario | max_num_tokens | short TTFT mean (s) | short TTFT max (s) | short max inter-token gap (s) | "
             "long TTFT (s) | all done (s) | largest step (tokens) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"{r['max_num_tokens']}" + (" (one-shot)" if r["one_shot"] else "")
        table.append(f"| {r['scenario']} | {name} | {r['short_ttft_mean_s']:.3f} | {r['short_ttft_max_s']:.3f} | "
                     f"{r['short_max_gap_s']:.3f} | {r['long_ttft_s']:.3f} | {r['all_done_s']:.3f} | "
                     f"{int(r['max_step_tokens'])} |")
    result = {"benchmark": "bench_chunked_prefill", "machine": machine(), "args": vars(args),
              "long_prompt_tokens": len(long), "short_prompt_tokens": [len(s) for s in shorts], "rows": rows,
              "runs": {str(b): r for b, r in runs.items()}, "table": "\n".join(table)}
    log.info("\n%s", "\n".join(table))
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
