"""Issue 2 benchmark: HF transformers generate vs our engine (plain) vs our engine + static EAGLE-3 draft.

Same prompts (ShareGPT first user turns, chat template), greedy, fixed new-token budget, one process, side by
side. Throughput = output tokens / wall seconds of the generation loop (model loading excluded).

    tide bench bench_engine --prompts 32 --max-new-tokens 128 --batch-sizes 1 8 --out runs/bench_engine.json
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from benchmarks.common import machine, write_json

log = logging.getLogger(__name__)


def _hf_generate(model_dir, prompts: list[list[int]], max_new: int, batch_size: int, pad_id: int, eos: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokens = 0
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=eos,
            )
        for row in out[:, width:].tolist():
            tokens += next((j + 1 for j, t in enumerate(row) if t == eos), len(row))
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "tau": 1.0}


def _ours(engine, drafter, prompts: list[list[int]], max_new: int, batch_size: int, gamma: int) -> dict:
    from tide_trt.engine.generator import GenerationRequest, SpeculativeGenerator
    from tide_trt.runtime import run_to_completion

    gen = SpeculativeGenerator(engine, drafter)
    tokens = steps = 0
    seconds = 0.0
    for i in range(0, len(prompts), batch_size):
        reqs = [
            GenerationRequest(f"{i}-{j}", p, max_new, stop_token_ids=engine.info.eos_token_ids)
            for j, p in enumerate(prompts[i : i + batch_size])
        ]
        res = run_to_completion(gen, reqs, gamma)
        seconds += res.seconds
        tokens += sum(len(s.output_ids) for s in res.sequences)
        steps += sum(s.steps for s in res.sequences)
    decode_tokens = tokens - len(prompts)  # the first token of each sequence comes from the prefill
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "tau": decode_tokens / steps if steps else 1.0,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="tide bench bench_engine")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--draft", default="default")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from tide_trt.config import EngineConfig, ModelConfig
    from tide_trt.engine.torch_engine import TorchTargetEngine
    from tide_trt.runtime import build_drafter, encode_prompt, resolve_draft_path
    from tide_trt.workloads import sharegpt_prompts

    engine = TorchTargetEngine.from_config(
        ModelConfig(),
        EngineConfig(
            dtype=args.dtype, max_batch_size=max(args.batch_sizes), max_seq_len=512 + args.max_new_tokens + 16
        ),
    )
    drafter = build_drafter(engine, resolve_draft_path(args.draft))
    tok = engine.tokenizer
    prompts = [encode_prompt(tok, t)[-512:] for t in sharegpt_prompts(args.prompts, seed=1234)]
    eos = engine.info.eos_token_ids[0]
    result = {
        "benchmark": "engine",
        "machine": machine(),
        "model": engine.info.name,
        "dtype": args.dtype,
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "gamma": args.gamma,
        "draft": str(resolve_draft_path(args.draft)),
        "runs": {},
    }
    for bs in args.batch_sizes:
        row = {}
        log.info("batch size %d: ours plain", bs)
        row["ours_ar"] = _ours(engine, None, prompts, args.max_new_tokens, bs, 0)
        log.info("batch size %d: ours + static draft", bs)
        row["ours_spec"] = _ours(engine, drafter, prompts, args.max_new_tokens, bs, args.gamma)
        if not args.skip_hf:
            log.info("batch size %d: HF generate fp32", bs)
            row["hf_generate_fp32"] = _hf_generate(engine.checkpoint_dir, prompts, args.max_new_tokens, bs, eos, eos)
            row["ratio_ar_vs_hf"] = row["ours_ar"]["tokens_per_s"] / row["hf_generate_fp32"]["tokens_per_s"]
        row["ratio_spec_vs_ar"] = row["ours_spec"]["tokens_per_s"] / row["ours_ar"]["tokens_per_s"]
        result["runs"][f"bs{bs}"] = row
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
