"""Draft-training throughput from a token corpus: target prefill tokens/s and draft training positions/s.

    tide bench bench_draft_training --out benchmarks/results/bench_draft_training.json

Prefill (the recompute path) side by side, interleaved over rounds, on the same corpus sequences:
  serving_kernel  the serving engine as it serves on CPU (native batch-invariant kernel, bf16 weights, fp32 products)
  prefill_fp32    `--prefill-numerics serving`: float32 copies of the bf16 weights through PyTorch's GEMM
  prefill_bf16    `--prefill-numerics bf16`: bf16 end to end (AMX on CPUs that have it)
with the label agreement of each with the serving kernel (share of positions whose argmax is the same).
Training: TTT steps (γ-unrolled, forward + backward + AdamW) over the same shards' states, bf16 autocast on / off.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine, write_json

log = logging.getLogger(__name__)


def _prefill(engine, seqs, batch_tokens: int) -> tuple[float, list[torch.Tensor]]:
    from tide_trt.training.state_cache import prefill_sequences

    t0 = time.perf_counter()
    results = prefill_sequences(engine, seqs, batch_tokens)
    return time.perf_counter() - t0, [r.labels for r in results]


def bench_prefill(corpus_path: str, n_seqs: int, rounds: int, batch_tokens: int, max_len: int) -> dict:
    from tide_trt.config import EngineConfig, ModelConfig
    from tide_trt.engine.torch_engine import TorchTargetEngine
    from tide_trt.models.loader import load_checkpoint
    from tide_trt.training.corpus import load_corpus, select_sequences
    from tide_trt.training.corpus_prefill import prefill_engine

    corpus = load_corpus(corpus_path)
    seqs = select_sequences(corpus, "greedy", "train", 50, limit=n_seqs, max_len=max_len)
    tokens = sum(len(s.tokens) for s in seqs)
    serving = TorchTargetEngine(load_checkpoint("default"), EngineConfig(max_batch_size=8, max_seq_len=max_len + 8))
    engines = {
        "serving_kernel": serving,  # as it serves: no bulk-prefill switch
        "prefill_fp32": prefill_engine(ModelConfig(), EngineConfig(), "serving", max_len),
        "prefill_bf16": prefill_engine(ModelConfig(), EngineConfig(), "bf16", max_len),
    }
    seconds: dict[str, list[float]] = {k: [] for k in engines}
    labels: dict[str, list[torch.Tensor]] = {}
    for r in range(rounds):
        for name, eng in engines.items():
            dt, lab = _prefill(eng, seqs, batch_tokens)
            seconds[name].append(dt)
            labels[name] = lab
            log.info("round %d %s: %.0f tok/s", r, name, tokens / dt)
    ref = torch.cat(labels["serving_kernel"])
    out = {"sequences": len(seqs), "tokens": tokens, "batch_tokens": batch_tokens, "rounds": rounds,
           "native_kernel": serving.info.native_linears, "systems": {}}
    for name in engines:
        med = statistics.median(seconds[name])
        out["systems"][name] = {"tok_per_s": tokens / med, "seconds": seconds[name],
                                "label_agreement": float((torch.cat(labels[name]) == ref).float().mean())}
    return out


def bench_training(corpus_path: str, n_seqs: int, steps: int, threads: list[int]) -> dict:
    from tide_trt.config import EngineConfig, ModelConfig
    from tide_trt.kernels import fast_bf16_matmul
    from tide_trt.training.corpus import load_corpus, select_sequences
    from tide_trt.training.corpus_prefill import prefill_engine
    from tide_trt.training.corpus_train import CorpusTrainSettings, train_on_shards
    from tide_trt.training.offline import new_head
    from tide_trt.training.state_cache import build_state_cache
    from tide_trt.training.vocab import t2d_from_d2t

    corpus = load_corpus(corpus_path)
    seqs = select_sequences(corpus, "greedy", "train", 50, limit=n_seqs)
    eng = prefill_engine(ModelConfig(), EngineConfig(), "serving", 640)
    d2t = torch.arange(0, eng.info.vocab_size, 6)[:8192]
    t2d = t2d_from_d2t(d2t, eng.info.vocab_size)
    out: dict = {"fast_bf16_matmul": fast_bf16_matmul(), "steps": steps, "systems": {}}
    with tempfile.TemporaryDirectory() as tmp:
        shards = build_state_cache(eng, seqs, Path(tmp) / "states", {}, shard_sequences=len(seqs), progress=False)
        for n in threads:
            torch.set_num_threads(n)
            for autocast in (True, False):
                torch.manual_seed(0)
                head = new_head(eng, d2t)
                s = CorpusTrainSettings(epochs=100, autocast=autocast)
                r = train_on_shards(head, t2d, shards, s, Path(tmp) / f"w{n}{autocast}", resume=False, meta={},
                                    max_steps=steps, progress=False)
                name = f"threads{n}_{'bf16_autocast' if autocast else 'fp32'}"
                out["systems"][name] = {"positions_per_s": r["train_positions"] / r["seconds_this_run"],
                                        "positions": r["train_positions"], "seconds": r["seconds_this_run"]}
                log.info("%s: %.0f positions/s", name, out["systems"][name]["positions_per_s"])
    return out


def main(argv: list[str] | None = None) -> dict:
    from tide_trt.commands.train_draft_corpus import DEFAULT_CORPUS

    p = argparse.ArgumentParser(prog="tide bench bench_draft_training")
    p.add_argument("--corpus", default=DEFAULT_CORPUS)
    p.add_argument("--prefill-sequences", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--max-len", type=int, default=640)
    p.add_argument("--train-sequences", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--threads", type=int, nargs="+", default=[2])
    p.add_argument("--skip-prefill", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(max(args.threads))
    result = {"benchmark": "draft_training", "machine": machine(), "torch_threads": max(args.threads)}
    if not args.skip_prefill:
        result["prefill"] = bench_prefill(args.corpus, args.prefill_sequences, args.rounds, args.batch_tokens,
                                          args.max_len)
    result["training"] = bench_training(args.corpus, args.train_sequences, args.train_steps, args.threads)
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
