"""HF transformers generate vs our engine (plain) vs our engine + each static EAGLE-3 draft asked for, alone and
with the suffix index (`<draft>+suffix`: draft.suffix defaults — what `tide generate` / `tide serve` run).

Same prompts (ShareGPT eval-split first user turns — all, or the non-English ones —, HumanEval, or the everyday
prompts of benchmarks/data/everyday_prompts.json; chat template),
greedy, fixed new-token budget, one process, side by side. Throughput = output tokens / wall seconds of the
generation loop (model loading excluded); τ = decode tokens per verification step.

    tide bench bench_engine --prompts 32 --max-new-tokens 128 --batch-sizes 1 8 --drafts default --skip-hf \
        --out runs/bench_engine.json
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from benchmarks.common import everyday_prompts, machine, write_json

log = logging.getLogger(__name__)


class Tally:
    """Output tokens, wall seconds and engine steps of one system, summed over prompt chunks."""

    def __init__(self) -> None:
        self.tokens = self.steps = self.sequences = 0
        self.seconds = 0.0

    def add(self, tokens: int, seconds: float, steps: int, sequences: int) -> None:
        self.tokens += tokens
        self.seconds += seconds
        self.steps += steps
        self.sequences += sequences

    def summary(self) -> dict:
        decode_tokens = self.tokens - self.sequences  # the first token of each sequence comes from the prefill
        return {"tokens": self.tokens, "seconds": self.seconds, "tokens_per_s": self.tokens / self.seconds,
                "tau": decode_tokens / self.steps if self.steps else 1.0}


def _hf_chunk(model, chunk: list[list[int]], max_new: int, pad_id: int, eos: int) -> tuple[int, float, int]:
    width = max(len(p) for p in chunk)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                             pad_token_id=pad_id, eos_token_id=eos)
    seconds = time.perf_counter() - t0
    tokens = sum(next((j + 1 for j, t in enumerate(row) if t == eos), len(row)) for row in out[:, width:].tolist())
    return tokens, seconds, 0


def _ours_chunk(gen, chunk: list[list[int]], max_new: int, gamma: int, tag: str) -> tuple[int, float, int]:
    from tide_trt.engine.generator import GenerationRequest
    from tide_trt.runtime import run_to_completion

    eos = gen.engine.info.eos_token_ids
    reqs = [GenerationRequest(f"{tag}-{j}", p, max_new, stop_token_ids=eos) for j, p in enumerate(chunk)]
    res = run_to_completion(gen, reqs, gamma)
    return sum(len(s.output_ids) for s in res.sequences), res.seconds, sum(s.steps for s in res.sequences)


def _adaptive_chunk(gen, plugin, chunk: list[list[int]], max_new: int, tag: str) -> tuple[int, float, int]:
    from tide_trt.engine.generator import GenerationRequest
    from tide_trt.runtime import run_with_policy

    eos = gen.engine.info.eos_token_ids
    reqs = [GenerationRequest(f"{tag}-{j}", p, max_new, stop_token_ids=eos) for j, p in enumerate(chunk)]
    res = run_with_policy(gen, reqs, plugin, [plugin])
    return sum(len(s.output_ids) for s in res.sequences), res.seconds, sum(s.steps for s in res.sequences)


def run_batch_size(engine, drafters: dict, hf_model, prompts: list[list[int]], max_new: int, bs: int,
                   gamma: int, adaptive: dict | None = None) -> dict:
    """The systems take turns on each chunk of `bs` prompts (rotating who goes first), so slow drifts of a
    shared machine hit all of them alike. `adaptive`: name -> (drafter, ControllerPlugin), controller-driven
    systems (`tide serve`'s default; the plugin keeps its state across chunks like a running server)."""
    from tide_trt.engine.generator import SpeculativeGenerator

    eos = engine.info.eos_token_ids[0]
    systems = {"ours_ar": lambda c, i: _ours_chunk(SpeculativeGenerator(engine), c, max_new, 0, f"ar{i}")}
    for name, drafter in drafters.items():
        systems[f"ours_spec[{name}]"] = lambda c, i, d=drafter, n=name: _ours_chunk(
            SpeculativeGenerator(engine, d), c, max_new, gamma, f"sp{n}{i}")
    for name, (drafter, plugin) in (adaptive or {}).items():
        systems[f"ours_adaptive[{name}]"] = lambda c, i, d=drafter, pl=plugin, n=name: _adaptive_chunk(
            SpeculativeGenerator(engine, d), pl, c, max_new, f"ad{n}{i}")
    if hf_model is not None:
        systems["hf_generate_fp32"] = lambda c, i: _hf_chunk(hf_model, c, max_new, eos, eos)
    tallies = {name: Tally() for name in systems}
    names = list(systems)
    for k, i in enumerate(range(0, len(prompts), bs)):
        chunk = prompts[i : i + bs]
        for name in names[k % len(names):] + names[: k % len(names)]:
            tokens, seconds, steps = systems[name](chunk, i)
            tallies[name].add(tokens, seconds, steps, len(chunk))
        log.info("bs %d: %d/%d prompts done", bs, i + len(chunk), len(prompts))
    row = {name: t.summary() for name, t in tallies.items()}
    if hf_model is not None:
        row["ratio_ar_vs_hf"] = row["ours_ar"]["tokens_per_s"] / row["hf_generate_fp32"]["tokens_per_s"]
    for name in drafters:
        row[f"ratio_spec_vs_ar[{name}]"] = row[f"ours_spec[{name}]"]["tokens_per_s"] / row["ours_ar"]["tokens_per_s"]
    for name, (_, plugin) in (adaptive or {}).items():
        row[f"ratio_adaptive_vs_ar[{name}]"] = (row[f"ours_adaptive[{name}]"]["tokens_per_s"]
                                                / row["ours_ar"]["tokens_per_s"])
        state = plugin.state()
        row[f"controller[{name}]"] = {"committed_gamma": state.committed_gamma, "global_alpha": state.global_alpha,
                                      "index_drafting": state.index_drafting, "guard_offs": state.guard_offs,
                                      "index_offs": state.index_offs, "steps_by_gamma": dict(plugin.steps_by_gamma)}
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="tide bench bench_engine")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--drafts", nargs="+", default=["default"],
                   help="drafts to compare: shipped names (v3, v4, default) or checkpoint directories")
    p.add_argument("--lookup-ngrams", type=int, nargs="+", default=[0],
                   help="draft.lookup_ngram values to run each draft with (0: the EAGLE-3 head alone)")
    p.add_argument("--lookup-gammas", type=int, nargs="+", default=[0],
                   help="draft.lookup_gamma values for the lookup runs (0: lookup rows draft γ like the others)")
    p.add_argument("--suffix", nargs="+", choices=["off", "on"], default=["off", "on"],
                   help="run each draft without / with the suffix index (draft.suffix defaults, shipped corpus "
                        "preloaded; rebuilt per batch size so no run sees another's answers to the same prompts)")
    p.add_argument("--workload", choices=["sharegpt", "sharegpt-non-english", "humaneval", "everyday"],
                   default="sharegpt")
    p.add_argument("--adaptive", action="store_true",
                   help="also the adaptive controller (tide serve's default, `tide generate --adaptive`) with each "
                        "drafter: its own drafter and controller per batch size")
    p.add_argument("--gamma-max", type=int, default=4, help="the adaptive controller's γ range")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from tide_trt.config import EngineConfig, ModelConfig, SuffixConfig
    from tide_trt.draft.suffix import build_suffix_drafter
    from tide_trt.engine.torch_engine import TorchTargetEngine
    from tide_trt.runtime import build_drafter, encode_prompt, resolve_draft_path
    from tide_trt.workloads import humaneval_prompts, sharegpt_prompts

    engine = TorchTargetEngine.from_config(
        ModelConfig(),
        EngineConfig(
            dtype=args.dtype, max_batch_size=max(args.batch_sizes), max_seq_len=512 + args.max_new_tokens + 16
        ),
    )
    drafters = {}
    for name in args.drafts:
        for n in args.lookup_ngrams:
            for lg in (args.lookup_gammas if n > 0 else [0]):
                label = name if n == 0 else f"{name}+lookup{n}" + (f"@γ{lg}" if lg else "")
                drafters[label] = build_drafter(engine, resolve_draft_path(name), n, lg)
        if "on" in args.suffix:
            drafters[f"{name}+suffix"] = build_drafter(engine, resolve_draft_path(name), suffix=SuffixConfig())
        if "off" not in args.suffix:
            for n in args.lookup_ngrams:
                drafters.pop(name if n == 0 else f"{name}+lookup{n}", None)
    if args.workload == "humaneval":
        texts = humaneval_prompts(args.prompts)
    elif args.workload == "everyday":
        texts = everyday_prompts()[: args.prompts]
    else:
        texts = sharegpt_prompts(args.prompts, seed=1234,
                                 language="non-english" if args.workload == "sharegpt-non-english" else "any")
    prompts = [encode_prompt(engine.tokenizer, t)[-512:] for t in texts]
    result = {
        "benchmark": "engine",
        "machine": machine(),
        "model": engine.info.name,
        "dtype": args.dtype,
        "native_linears": engine.info.native_linears,
        "threads": torch.get_num_threads(),
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "gamma": args.gamma,
        "workload": args.workload,
        "drafts": {name: str(resolve_draft_path(name)) for name in args.drafts},
        "lookup_ngrams": args.lookup_ngrams,
        "lookup_gammas": args.lookup_gammas,
        "runs": {},
    }
    hf_model = None
    if not args.skip_hf:
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(str(engine.checkpoint_dir), dtype=torch.float32).eval()
    profile = None
    if args.adaptive:
        from tide_trt.online.engine_profile import cached_engine_profile

        profile = cached_engine_profile(engine, next(iter(drafters.values())), args.gamma_max)
        result["profile"] = profile.to_dict()
    for bs in args.batch_sizes:
        for d in drafters.values():  # a fresh global index per batch size: no answers to these prompts in it
            if d.suffix is not None:
                d.suffix = build_suffix_drafter(d.suffix.config, engine.info.max_batch_size, engine.info.max_seq_len)
        adaptive = None
        if profile is not None:
            from tide_trt.config import ControllerConfig
            from tide_trt.online.control_plugin import ControllerPlugin

            adaptive = {}
            for name, d in drafters.items():  # its own drafter: its own global index, the same head
                own = build_drafter(engine, resolve_draft_path(name.split("+")[0]), d.lookup_ngram, d.lookup_gamma,
                                    d.suffix.config if d.suffix is not None else None)
                adaptive[name] = (own, ControllerPlugin(ControllerConfig(), profile, args.gamma_max, args.gamma))
        result["runs"][f"bs{bs}"] = run_batch_size(engine, drafters, hf_model, prompts, args.max_new_tokens, bs,
                                                   args.gamma, adaptive)
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
