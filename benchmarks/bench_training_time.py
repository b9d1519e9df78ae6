"""Training time and storage: TIDE's reuse path vs the recompute path, on identical data.

    python benchmarks/bench_training_time.py [--tokens 50000] [--threads 1] [--out FILE.json]

1. Serve ShareGPT conversations with the default model (bf16, plain decoding, concurrency --batch) through
   SpeculativeGenerator + SignalBuffer until --tokens signal tokens are captured. To reach 50k tokens in
   minutes on a CPU, each request is a whole chat-templated conversation (cut to --max-len tokens) with
   --max-new-tokens generated tokens, so most captured positions are prompt positions; both paths therefore
   train with `train_on_prompt=True` (labels = next stored token at every position). Same data either way.
2. Reuse path (TIDE): read the shards, train one epoch (trainer.fit, the online trainer's loop).
3. Recompute path: keep only the served token ids; re-run the target prefill over them to regenerate the
   capture states (recompute.recompute_signals, logits of the last position only = its cheapest form),
   then the same training from the same initial head with the same seed.
Reports end-to-end seconds of both (load/prefill + train), the ratio, and bytes stored per token.
"""

from __future__ import annotations

import argparse
import copy
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from tide_trt.config import EngineConfig, ModelConfig, SignalConfig, TrainerConfig
from tide_trt.engine.generator import GenerationRequest, SpeculativeGenerator
from tide_trt.engine.hooks import StaticGamma, run_step
from tide_trt.engine.torch_engine import TorchTargetEngine
from tide_trt.online.adaptation import OnlineAdaptation
from tide_trt.online.drift import DriftDetector
from tide_trt.online.recompute import recompute_signals, served_texts, stored_bytes_per_token
from tide_trt.online.signals import ShardInfo, SignalBuffer, SignalSequence, read_shard
from tide_trt.online.store import SignalStore, dir_bytes
from tide_trt.online.trainer import fit, make_chunks
from tide_trt.training.data import encode_conversations
from tide_trt.training.offline import new_head
from tide_trt.training.vocab import build_draft_vocab, t2d_from_d2t

try:
    from benchmarks.common import emit, machine
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from common import emit, machine

log = logging.getLogger("bench_training_time")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=50_000, help="signal tokens to capture and train on")
    p.add_argument("--max-len", type=int, default=384, help="tokens per conversation (prompt)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--batch", type=int, default=4, help="serving concurrency and recompute prefill batch")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is robust on shared machines)")
    p.add_argument("--draft-vocab", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="directory for the signal store (default: a temporary one)")
    p.add_argument("--out", default="runs/bench_training_time.json")
    p.add_argument("--save-head", help="also save the reuse-path head as a draft checkpoint here")
    return p.parse_args(argv)


def capture(engine: TorchTargetEngine, seqs: list[list[int]], args: argparse.Namespace, root: Path) -> float:
    """Serve until --tokens signals are captured; returns serving seconds."""
    i = engine.info
    buf = SignalBuffer(
        SignalStore(root),
        ShardInfo(i.fingerprint, i.name, i.capture_layers, i.hidden_size),
        buffer_tokens=4 * args.tokens,
        shard_tokens=4096,
    )
    plugin = OnlineAdaptation(DriftDetector(SignalConfig()), buf, None)
    gen = SpeculativeGenerator(engine, None, signal_sink=plugin.signal_sink)
    queue = list(seqs)
    t0 = time.perf_counter()
    while True:
        while queue and len(gen.sequences) < args.batch and buf.counters["tokens_captured"] < args.tokens:
            gen.add(GenerationRequest(f"r{len(queue)}", queue.pop(0), args.max_new_tokens))
        if not gen.sequences:
            break
        _, events, _ = run_step(gen, StaticGamma(0), [plugin])
        for e in events:
            if e.finished:
                gen.release(e.request_id)
    seconds = time.perf_counter() - t0
    buf.close()
    log.info("captured %d tokens in %.1f s (%s)", buf.counters["tokens_written"], seconds, buf.metrics())
    return seconds


def train(head, seqs: list[SignalSequence], t2d: torch.Tensor, tc: TrainerConfig) -> dict:
    chunks = make_chunks(seqs, tc.chunk_len, train_on_prompt=True)
    return fit(head, chunks, t2d, tc, seed=0)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    from tide_trt import workloads

    engine = TorchTargetEngine.from_config(
        ModelConfig(), EngineConfig(max_batch_size=args.batch, max_seq_len=args.max_len + 64)
    )
    convs = workloads.load_sharegpt(limit=4 * args.tokens // args.max_len + 64, seed=args.seed)
    seqs = encode_conversations(engine.tokenizer, convs, args.max_len)
    root = Path(args.work or tempfile.mkdtemp(prefix="tide-bench-signals-"))
    shutil.rmtree(root, ignore_errors=True)
    serve_s = capture(engine, seqs, args, root)
    # ---- reuse path: shards -> training --------------------------------------------------------------------
    t0 = time.perf_counter()
    stored = [s for p in SignalStore(root).shard_paths() for s in read_shard(p)[0]]
    load_s = time.perf_counter() - t0
    n_tokens = sum(s.num_tokens for s in stored)
    counts = torch.zeros(engine.info.vocab_size)
    for s in stored:
        counts += torch.bincount(s.token_ids, minlength=engine.info.vocab_size).float()
    d2t, _ = build_draft_vocab(counts, args.draft_vocab)
    t2d = t2d_from_d2t(d2t, engine.info.vocab_size)
    torch.manual_seed(args.seed)
    head0 = new_head(engine, d2t)
    tc = TrainerConfig(epochs_per_round=1.0, steps_per_round=10**9, chunk_len=256, batch_size=8)
    head = _clone(head0)
    reuse_train = train(head, stored, t2d, tc)
    if args.save_head:
        from tide_trt.draft.checkpoint import save_draft

        save_draft(
            head.to(torch.bfloat16),
            args.save_head,
            {"version": 0, "trained_by": "bench_training_time (1 epoch, ShareGPT conversations)"},
        )
    # ---- recompute path: token ids -> target prefill -> training ------------------------------------------
    texts = served_texts(stored)
    del stored
    rebuilt, prefill_s = recompute_signals(engine, texts, batch_size=args.batch)
    recompute_train = train(_clone(head0), rebuilt, t2d, tc)
    reuse_total = load_s + reuse_train["seconds"]
    recompute_total = prefill_s + recompute_train["seconds"]
    shard_bytes = sum(p.stat().st_size for p in SignalStore(root).shard_paths())
    sizes = stored_bytes_per_token(rebuilt)
    result = {
        "benchmark": "training_time",
        "machine": machine(),
        "threads": args.threads,
        "signal_tokens": n_tokens,
        "sequences": len(texts),
        "serve_seconds": serve_s,
        "reuse": {
            "load_seconds": load_s,
            "train_seconds": reuse_train["seconds"],
            "total_seconds": reuse_total,
            "steps": reuse_train["steps"],
        },
        "recompute": {
            "prefill_seconds": prefill_s,
            "train_seconds": recompute_train["seconds"],
            "total_seconds": recompute_total,
            "steps": recompute_train["steps"],
        },
        "speedup_end_to_end": recompute_total / reuse_total,
        "bytes_per_token": {
            "reuse_tensors": sizes["reuse"],
            "reuse_on_disk": shard_bytes / n_tokens,
            "recompute_token_ids": sizes["recompute"],
            "ratio": shard_bytes / n_tokens / sizes["recompute"],
        },
        "store_bytes": dir_bytes(root),
        "args": vars(args),
    }
    if not args.work:
        shutil.rmtree(root, ignore_errors=True)
    return result


def _clone(head):
    embed = head.embed
    head.embed = None
    out = copy.deepcopy(head)
    head.embed = out.embed = embed
    return out


def table(r: dict) -> str:
    rows = [
        ("path", "load/prefill s", "train s", "total s"),
        (
            "reuse (TIDE)",
            f"{r['reuse']['load_seconds']:.1f}",
            f"{r['reuse']['train_seconds']:.1f}",
            f"{r['reuse']['total_seconds']:.1f}",
        ),
        (
            "recompute",
            f"{r['recompute']['prefill_seconds']:.1f}",
            f"{r['recompute']['train_seconds']:.1f}",
            f"{r['recompute']['total_seconds']:.1f}",
        ),
    ]
    lines = [f"| {a:<13} | {b:>14} | {c:>8} | {d:>8} |" for a, b, c, d in rows]
    b = r["bytes_per_token"]
    lines.append(
        f"{r['signal_tokens']} signal tokens, {r['threads']} thread(s): reuse is "
        f"{r['speedup_end_to_end']:.2f}x faster end to end; bytes/token stored: reuse "
        f"{b['reuse_on_disk']:.0f} (hidden states), recompute "
        f"{b['recompute_token_ids']:.0f} (token ids)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    result = run(args)
    emit(result, args.out, table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
