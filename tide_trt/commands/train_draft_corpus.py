"""`tide train-draft --data corpus`: train the EAGLE-3 draft on a token corpus (prompt + answer sequences).

Two resumable phases, both under `--state-cache` / `--work-dir` (scratch, never committed):
1. prefill: the serving target's prefill over the corpus sequences writes capture states + the target's own labels
   into shard caches (`tide_trt.training.corpus_prefill`);
2. training: the training-time-test objective over those shards with bounded RAM, checkpointed every few minutes
   (`tide_trt.training.corpus_train`). Stop at any time; the same command with `--resume` continues exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

from tide_trt.errors import TideError

log = logging.getLogger(__name__)

DEFAULT_CORPUS = "../shared/data/sharegpt_selfdistill_smollm2.npz"


def add_corpus_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--data corpus (token corpus: prompt + answer sequences, e.g. self-distillation)")
    g.add_argument("--corpus", default=DEFAULT_CORPUS, help="the .npz token corpus (see docs/TRAINING.md)")
    g.add_argument("--greedy-sequences", type=int, default=3072, help="greedy answers to train on (in corpus order)")
    g.add_argument("--sampled-sequences", type=int, default=0, help="sampled answers to train on")
    g.add_argument("--heldout-sequences", type=int, default=256,
                   help="greedy answers of held-out prompts for the simulated acceptance")
    g.add_argument("--eval-sequences", type=int, default=None,
                   help="evaluate on the first N held-out sequences only (quick ablations; default: all)")
    g.add_argument("--eval-every-epoch", action="store_true",
                   help="score the held-out set (γ = 3) after every epoch (kept in the checkpoint and manifest)")
    g.add_argument("--eval-gammas", type=int, nargs="+", default=[1, 3, 5], help="γ values of the held-out report")
    g.add_argument("--heldout-every", type=int, default=50,
                   help="prompts whose index is a multiple of this are held out of training (both answers)")
    g.add_argument("--max-seq-len", type=int, default=640, help="cut sequences to this many tokens")
    g.add_argument("--state-cache", default="runs/corpus_states",
                   help="directory of the prefilled state shards (shared by runs; grows by shards)")
    g.add_argument("--work-dir", help="training checkpoints (default: <out>.work)")
    g.add_argument("--resume", action="store_true", help="continue the training checkpoint in --work-dir")
    g.add_argument("--prefill-numerics", choices=["serving", "bf16"], default="serving",
                   help="serving: the serving engine's numbers (labels identical to serving); bf16: faster on "
                        "AMX CPUs, ~1 %% of labels differ")
    g.add_argument("--prefill-only", action="store_true", help="stop after the state caches are complete")
    g.add_argument("--chunk-len", type=int, default=256, help="positions per training chunk")
    g.add_argument("--checkpoint-minutes", type=float, default=5.0)
    g.add_argument("--max-train-steps", type=int, default=None,
                   help="stop (checkpointed) after this many optimizer steps in this run; --resume continues")
    g.add_argument("--pool-shards", type=int, default=4, help="shards held in RAM at once while training")


def run_corpus(args: argparse.Namespace) -> int:
    import torch

    from tide_trt.commands.common import config_from_args
    from tide_trt.commands.train_draft import command_line
    from tide_trt.draft.checkpoint import load_draft, save_draft
    from tide_trt.runtime import resolve_draft_path
    from tide_trt.training.corpus import load_corpus
    from tide_trt.training.corpus_prefill import prefill_corpus, prefill_engine
    from tide_trt.training.corpus_train import CorpusTrainSettings, evaluate_shards, train_on_shards
    from tide_trt.training.offline import new_head
    from tide_trt.training.state_cache import shard_label_counts
    from tide_trt.training.vocab import build_draft_vocab, t2d_from_d2t

    if args.greedy_sequences < 0 or args.sampled_sequences < 0 or args.greedy_sequences + args.sampled_sequences < 1:
        raise TideError("need --greedy-sequences + --sampled-sequences >= 1 (and neither negative)")
    if args.heldout_sequences < 1 or args.heldout_every < 2:
        raise TideError("need --heldout-sequences >= 1 and --heldout-every >= 2")
    if not 8 < args.chunk_len <= args.max_seq_len:
        raise TideError("need 8 < --chunk-len <= --max-seq-len")
    cfg = config_from_args(args)
    device = cfg.engine.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TideError(f"--device {device} but CUDA is not available")
    torch.manual_seed(args.seed)
    corpus = load_corpus(args.corpus)
    t0 = time.perf_counter()
    engine = prefill_engine(cfg.model, cfg.engine, args.prefill_numerics, args.max_seq_len)
    common = {"numerics": args.prefill_numerics, "heldout_every": args.heldout_every, "max_len": args.max_seq_len}
    heldout = prefill_corpus(engine, corpus, "greedy", "heldout", args.heldout_sequences, args.state_cache, **common)
    train: list[Path] = []
    for kind, n in (("greedy", args.greedy_sequences), ("sampled", args.sampled_sequences)):
        if n:
            train += prefill_corpus(engine, corpus, kind, "train", n, args.state_cache, **common)
    prefill_s = time.perf_counter() - t0
    info, embed = engine.info, engine.embedding_weight()
    if args.prefill_only:
        print(json.dumps({"train_shards": len(train), "heldout_shards": len(heldout), "seconds": prefill_s}))
        return 0

    parent_manifest: dict = {}
    if args.init:
        init = resolve_draft_path(args.init)
        if init is None:
            raise TideError("--init needs a draft checkpoint directory or a shipped draft name")
        head, parent_manifest = load_draft(init, info, embed)
        head = head.float()
        t2d = t2d_from_d2t(head.d2t, info.vocab_size)
    else:
        counts = shard_label_counts(train, info.vocab_size)
        d2t, t2d = build_draft_vocab(counts, args.draft_vocab)
        head = new_head(engine, d2t)
    heldout_counts = shard_label_counts(heldout, info.vocab_size)  # [V]
    coverage = float(heldout_counts[head.d2t].sum() / heldout_counts.sum().clamp(min=1))
    del engine  # the target's weights are not needed for training; free the RAM
    settings = CorpusTrainSettings(
        epochs=args.epochs, batch_size=args.batch_size, chunk_len=args.chunk_len, lr=args.lr,
        ttt_steps=args.ttt_steps, pool_shards=args.pool_shards, seed=args.seed, device=device,
        checkpoint_minutes=args.checkpoint_minutes)
    work = Path(args.work_dir or f"{args.out}.work")
    data_meta = {"corpus": str(corpus.path), "corpus_sha256_16": corpus.fingerprint, "init": args.init,
                 "draft_vocab": int(head.d2t.numel())}
    def epoch_eval(epoch: int, h) -> dict:
        r = evaluate_shards(h, t2d, heldout, device, (3,), max_sequences=args.eval_sequences)["3"]
        log.info("after epoch %d: held-out τ(γ=3) %.3f, α %.3f", epoch + 1, r.tau, r.alpha)
        return {"tau_gamma3": r.tau, "alpha_gamma3": r.alpha}

    history = train_on_shards(head, t2d, train, settings, work, resume=args.resume, meta=data_meta,
                              max_seconds=args.max_train_seconds, max_steps=args.max_train_steps,
                              on_epoch_end=epoch_eval if args.eval_every_epoch else None)
    if not history["finished"]:
        log.info("stopped at step %d of %d: run the same command with --resume to continue", history["step"],
                 history["total_steps"])
        print(json.dumps(history, indent=2))
        return 0
    report = evaluate_shards(head, t2d, heldout, device, tuple(args.eval_gammas), max_sequences=args.eval_sequences)
    manifest = {
        "version": 0, "parent": args.init, "parent_manifest_command": parent_manifest.get("command"),
        "trained_by": "tide train-draft --data corpus (recompute path over a token corpus)",
        "command": command_line(),
        "data": {"corpus": str(corpus.path), "corpus_sha256_16": corpus.fingerprint, "corpus_meta": corpus.meta,
                 "greedy_sequences": args.greedy_sequences, "sampled_sequences": args.sampled_sequences,
                 "heldout_sequences": args.heldout_sequences, "heldout_every": args.heldout_every,
                 "max_seq_len": args.max_seq_len, "prefill_numerics": args.prefill_numerics,
                 "train_positions": history["train_positions"], "corpus_positions": history["corpus_positions"]},
        "settings": dataclasses.asdict(settings), "draft_vocab_coverage": coverage, "ttt_steps": args.ttt_steps,
        "epochs": args.epochs, "prefill_seconds": prefill_s, "train_seconds_last_run": history["seconds_this_run"],
        "heldout_acceptance": {g: r.as_dict() for g, r in report.items()}, "heldout_by_epoch": history["epoch_evals"],
        "eval_acceptance": report[str(args.eval_gammas[0])].alpha,
        "model_name": info.name, "dtype_of_signals": cfg.engine.dtype,
    }
    head.to("cpu", torch.bfloat16)
    out = save_draft(head, args.out, manifest)
    print(json.dumps({"out": str(out), "heldout": manifest["heldout_acceptance"], "coverage": coverage, **history},
                     indent=2))
    return 0
