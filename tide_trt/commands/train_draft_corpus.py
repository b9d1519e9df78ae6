"""`tide train-draft --data corpus`: a thin front of the corpus training pipeline (`tide_trt.training.pipeline`).

It parses the arguments into a `CorpusPipelineConfig` (`pipeline_config`) and runs `run_corpus_pipeline`: corpus ->
prefill cache -> vocabulary -> head -> train -> evaluate -> write draft, resumable (`--resume`) under
`--state-cache` / `--work-dir` (scratch, never committed).
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tide_trt.training.pipeline import CorpusPipelineConfig

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
    g.add_argument("--loss", choices=["soft", "hard"], default="soft",
                   help="soft: cross-entropy to the target's top-K distribution over the draft vocabulary (as "
                        "EAGLE-3 / SpecForge train); hard: to the target's argmax label")
    g.add_argument("--soft-top-k", type=int, default=16, help="top-K soft labels stored per position at prefill")
    g.add_argument("--capture-norm", action="store_true",
                   help="a fresh head RMS-normalises each capture layer's state before the FC (kept in the draft)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="the cosine schedule ends at lr * this")
    g.add_argument("--warmup-steps", type=int, default=50, help="linear learning-rate warm-up steps")
    g.add_argument("--log-every-steps", type=int, default=50, help="a learning-curve line in the log every N steps")
    g.add_argument("--eval-every-steps", type=int, default=0,
                   help="with --eval-every-epoch, also score the held-out set (γ = 3) every N optimizer steps")


def pipeline_config(args: argparse.Namespace) -> CorpusPipelineConfig:
    """The parsed arguments as the pipeline's config (nothing else happens here)."""
    from tide_trt.commands.common import command_line, config_from_args
    from tide_trt.training.corpus_train import CorpusTrainSettings
    from tide_trt.training.pipeline import CorpusDataConfig, CorpusPipelineConfig, EvalConfig, HeadConfig

    cfg = config_from_args(args)
    return CorpusPipelineConfig(
        model=cfg.model, engine=cfg.engine, out=args.out,
        data=CorpusDataConfig(
            corpus=args.corpus, greedy_sequences=args.greedy_sequences, sampled_sequences=args.sampled_sequences,
            heldout_sequences=args.heldout_sequences, heldout_every=args.heldout_every, max_seq_len=args.max_seq_len,
            state_cache=args.state_cache, prefill_numerics=args.prefill_numerics, soft_top_k=args.soft_top_k),
        head=HeadConfig(init=args.init, draft_vocab=args.draft_vocab, capture_norm=args.capture_norm),
        train=CorpusTrainSettings(
            epochs=args.epochs, batch_size=args.batch_size, chunk_len=args.chunk_len, lr=args.lr,
            warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio, grad_clip=args.grad_clip, loss=args.loss,
            ttt_steps=args.ttt_steps, pool_shards=args.pool_shards, seed=args.seed, device=cfg.engine.device,
            checkpoint_minutes=args.checkpoint_minutes, log_every_steps=args.log_every_steps,
            eval_every_steps=args.eval_every_steps),
        eval=EvalConfig(gammas=tuple(args.eval_gammas), sequences=args.eval_sequences,
                        every_epoch=args.eval_every_epoch),
        work_dir=args.work_dir, resume=args.resume, prefill_only=args.prefill_only,
        max_train_seconds=args.max_train_seconds, max_train_steps=args.max_train_steps, command=command_line())


def run_corpus(args: argparse.Namespace) -> int:
    from tide_trt.training.pipeline import run_corpus_pipeline

    print(json.dumps(run_corpus_pipeline(pipeline_config(args)), indent=2))
    return 0
