"""Draft recipe ablation on held-out data: each variant of `tide train-draft --data corpus` trains on the same
corpus slice for the same epochs and is scored by the held-out simulated acceptance (γ = 1 and 3).

    tide bench draft_ablation --out benchmarks/results/draft_ablation.json

Variants whose output directory already holds a draft are collected, not retrained (the runs are long on 2 cores:
stop and rerun to continue). One variant changes one setting of the base recipe. The session-6 variants ran when
the hard (argmax) loss was the only one; they pass `--loss hard` to mean what they meant then. The `v5_*` variants
walk from that recipe to the v5 one (issue 22 item 5), one change at a time: soft labels, the 16k vocabulary,
per-capture-layer norm, lr 5e-4 + clip 0.5.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
from pathlib import Path

from benchmarks.common import machine, write_json

log = logging.getLogger(__name__)

HARD = ["--loss", "hard"]
V5_SOFT16K = ["--loss", "soft", "--draft-vocab", "16384"]
VARIANTS: dict[str, list[str]] = {
    "base": HARD,
    "lr3e-3": [*HARD, "--lr", "3e-3"],
    "init_v3": [*HARD, "--init", "v3"],
    "vocab16k": [*HARD, "--draft-vocab", "16384", "--lr", "3e-3"],
    "init_v3_lr3e-4": [*HARD, "--init", "v3", "--lr", "3e-4"],
    "init_v3_lr1e-4": [*HARD, "--init", "v3", "--lr", "1e-4"],
    "init_v3_lr1e-4_chunk512": [*HARD, "--init", "v3", "--lr", "1e-4", "--chunk-len", "512"],
    "init_v3_lr1e-4_ttt4": [*HARD, "--init", "v3", "--lr", "1e-4", "--ttt-steps", "4"],
    "init_v3_lr1e-4_greedy+sampled": [*HARD, "--init", "v3", "--lr", "1e-4", "--greedy-sequences", "256",
                                      "--sampled-sequences", "256"],
    # issue 22 item 5: from the session-6 recipe (hard, 8k, lr 1e-3, clip 1) to v5's, one change at a time
    "v5_hard8k": HARD,
    "v5_soft8k": ["--loss", "soft"],
    "v5_soft16k": V5_SOFT16K,
    "v5_soft16k_norm": [*V5_SOFT16K, "--capture-norm"],
    "v5_soft16k_norm_lr5e-4_clip0.5": [*V5_SOFT16K, "--capture-norm", "--lr", "5e-4", "--grad-clip", "0.5"],
    "v5_hard16k_norm_lr5e-4_clip0.5": [*HARD, "--draft-vocab", "16384", "--capture-norm", "--lr", "5e-4",
                                       "--grad-clip", "0.5"],
    # the soft loss on a trained head: v4 fine-tuned with each loss (v4's vocabulary, no norm)
    "v5_init_v4_hard_lr1e-4": [*HARD, "--init", "v4", "--lr", "1e-4"],
    "v5_init_v4_soft_lr1e-4": ["--loss", "soft", "--init", "v4", "--lr", "1e-4"],
}


def base_args(corpus: str, sequences: int, eval_sequences: int, epochs: float, threads: int, state_cache: str,
              numerics: str) -> list[str]:
    return ["train-draft", "--data", "corpus", "--corpus", corpus, "--greedy-sequences", str(sequences),
            "--eval-sequences", str(eval_sequences), "--eval-gammas", "1", "3", "--epochs", str(epochs),
            "--threads", str(threads), "--state-cache", state_cache, "--prefill-numerics", numerics]


def reference_scores(name: str, state_cache: str, eval_sequences: int) -> dict:
    """A shipped draft's held-out simulated acceptance on the variants' held-out answers (γ = 1, 3)."""
    from tide_trt.config import TideConfig
    from tide_trt.draft.checkpoint import load_draft
    from tide_trt.online.trainer import load_target_identity
    from tide_trt.runtime import resolve_draft_path
    from tide_trt.training.corpus_train import evaluate_shards
    from tide_trt.training.vocab import t2d_from_d2t

    info, embed = load_target_identity(TideConfig(), "cpu")
    head, _ = load_draft(resolve_draft_path(name), info, embed)
    head = head.float()
    shards = sorted((Path(state_cache) / "heldout_greedy").glob("shard_*.safetensors"))
    report = evaluate_shards(head, t2d_from_d2t(head.d2t, info.vocab_size), shards, "cpu", (1, 3),
                             max_sequences=eval_sequences)
    return {g: r.as_dict() for g, r in report.items()}


def main(argv: list[str] | None = None) -> dict:
    from tide_trt.cli import main as tide_main
    from tide_trt.commands.train_draft_corpus import DEFAULT_CORPUS

    p = argparse.ArgumentParser(prog="tide bench draft_ablation")
    p.add_argument("--corpus", default=DEFAULT_CORPUS)
    p.add_argument("--sequences", type=int, default=512, help="greedy answers per variant (2 shards)")
    p.add_argument("--eval-sequences", type=int, default=128)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--runs", default="runs/ablation", help="one output directory per variant")
    p.add_argument("--collect-only", action="store_true", help="do not train missing variants")
    p.add_argument("--reference", nargs="*", default=["v3", "v4"],
                   help="shipped drafts scored untouched on the same held-out answers (rows for comparison)")
    p.add_argument("--state-cache", default="runs/corpus_states", help="the variants' and references' states")
    p.add_argument("--prefill-numerics", choices=["serving", "bf16"], default="serving")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    common = base_args(args.corpus, args.sequences, args.eval_sequences, args.epochs, args.threads,
                       args.state_cache, args.prefill_numerics)
    rows = {}
    for name in args.variants:
        out = Path(args.runs) / name
        cmd = [*common, *VARIANTS[name], "--out", str(out)]
        if not (out / "config.json").is_file() and not args.collect_only:
            log.info("training %s: tide %s", name, shlex.join(cmd))
            tide_main(cmd)
        if not (out / "config.json").is_file():
            continue
        manifest = json.loads((out / "config.json").read_text())["manifest"]
        held = manifest["heldout_acceptance"]
        rows[name] = {"command": manifest["command"], "args": VARIANTS[name],  # as it ran (threads may differ)
                      "tau_gamma1": held["1"]["tau"], "tau_gamma3": held["3"]["tau"],
                      "alpha_gamma3": held["3"]["alpha"],
                      "coverage": manifest["draft_vocab_coverage"],
                      "train_positions": manifest["data"]["train_positions"],
                      "train_seconds": manifest["train_seconds_last_run"]}
    references = {name: reference_scores(name, args.state_cache, args.eval_sequences) for name in args.reference}
    for name, held in references.items():
        print(f"reference {name}: held-out τ (γ=1) {held['1']['tau']:.3f}, τ (γ=3) {held['3']['tau']:.3f}, "
              f"α (γ=3) {held['3']['alpha']:.3f}")
    result = {"benchmark": "draft_ablation", "references": references, "machine": machine(),
              "sequences": args.sequences, "eval_sequences": args.eval_sequences, "epochs": args.epochs,
              "variants": rows}
    print("| variant | change | held-out τ (γ=1) | held-out τ (γ=3) | p (γ=3) | vocab coverage | train s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {' '.join(r['args']) or '—'} | {r['tau_gamma1']:.3f} | {r['tau_gamma3']:.3f} | "
              f"{r['alpha_gamma3']:.3f} | {r['coverage']:.3f} | {r['train_seconds']:.0f} |")
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
