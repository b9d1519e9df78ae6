"""How much of the target's answers is copyable, and does the draft head copy? (held-out corpus answers)

    tide bench draft_copy_analysis --out benchmarks/results/draft_copy_analysis.json

1. n-gram lookup: at each answer position, if the last n tokens occurred earlier in the sequence, the lookup
   proposes what followed their most recent occurrence (`draft/lookup.py`); coverage = share of answer positions
   where it proposes, precision = share of those where the proposal is the target's own next token (its label).
2. The head's step-0 accuracy (target features of position q + token q+1 -> the target's token after q+1) split
   into the positions where a lookup would be right and the rest: a head that copies scores high on the former.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from benchmarks.common import machine, write_json

log = logging.getLogger(__name__)


def lookup_stats(shards: list[Path], ngrams: list[int], max_sequences: int) -> dict:
    from tide_trt.draft.lookup import lookup_continuation
    from tide_trt.training.state_cache import iter_sequences

    out = {}
    for n in ngrams:
        proposed = right = total = 0
        for shard, a, b, plen in iter_sequences(shards, max_sequences):
            toks = shard.token_ids[a:b].numpy()
            labels = shard.labels[a:b].tolist()
            for q in range(max(plen - 1, 0), b - a):  # answer positions (+ the last prompt one)
                total += 1
                guess = lookup_continuation(toks[:q + 1], n, 1)
                if guess is not None:
                    proposed += 1
                    right += guess[0] == labels[q]
        out[str(n)] = {"coverage": proposed / total, "precision": right / max(proposed, 1),
                       "right_share": right / total, "positions": total}
    return out


@torch.no_grad()
def head_copy_split(draft: str, shards: list[Path], ngram: int, max_sequences: int) -> dict:
    """Step-0 accuracy of a draft head where an n-gram lookup would be right vs elsewhere."""
    from tide_trt.config import TideConfig
    from tide_trt.draft.checkpoint import load_draft
    from tide_trt.draft.lookup import lookup_continuation
    from tide_trt.online.trainer import load_target_identity
    from tide_trt.runtime import resolve_draft_path
    from tide_trt.training.state_cache import iter_sequences, masked_labels
    from tide_trt.training.vocab import t2d_from_d2t

    info, embed = load_target_identity(TideConfig(), "cpu")
    head, _ = load_draft(resolve_draft_path(draft), info, embed)
    head = head.float().eval()
    t2d = t2d_from_d2t(head.d2t, info.vocab_size)
    hits = {"copyable": [0, 0], "other": [0, 0]}  # [right, positions]
    for shard, a, b, plen in iter_sequences(shards, max_sequences):
        toks = shard.token_ids[a:b]
        labels = masked_labels(shard.labels[a:b], plen, train_on_prompt=False)
        # entry q: features of q, token q+1 -> the target's token after q+1 (labels[q+1])
        logits = head.ttt_forward(shard.hidden[None, a:b - 1].float(), toks[None, 1:], 1)[0][0]  # [T-1, Vd]
        pred = head.d2t[logits.argmax(-1)]  # [T-1] target ids
        arr = toks.numpy()
        for q in range(b - a - 1):
            target = int(labels[q + 1])
            if target < 0:
                continue
            guess = lookup_continuation(arr[:q + 2], ngram, 1)
            kind = "copyable" if guess is not None and guess[0] == target else "other"
            hits[kind][0] += int(pred[q]) == target and bool(t2d[target] >= 0)
            hits[kind][1] += 1
    return {k: {"accuracy": r / max(n, 1), "positions": n} for k, (r, n) in hits.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="tide bench draft_copy_analysis")
    p.add_argument("--state-cache", default="runs/corpus_states", help="holds heldout_greedy/ (tide train-draft)")
    p.add_argument("--sequences", type=int, default=128, help="held-out answers to read")
    p.add_argument("--ngrams", type=int, nargs="+", default=[2, 3, 4, 6])
    p.add_argument("--drafts", nargs="+", default=["v3", "v4"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    shards = sorted((Path(args.state_cache) / "heldout_greedy").glob("shard_*.safetensors"))
    if not shards:
        raise SystemExit(f"no held-out shards under {args.state_cache}/heldout_greedy: run tide train-draft first")
    result = {"benchmark": "draft_copy_analysis", "machine": machine(), "sequences": args.sequences,
              "lookup": lookup_stats(shards, args.ngrams, args.sequences),
              "heads": {d: head_copy_split(d, shards, 3, args.sequences) for d in args.drafts}}
    for n, r in result["lookup"].items():
        print(f"{n}-gram lookup: proposes at {r['coverage']:.3f} of answer positions, precision {r['precision']:.3f}")
    for d, r in result["heads"].items():
        print(f"{d}: step-0 accuracy {r['copyable']['accuracy']:.3f} where a 3-gram lookup is right "
              f"({r['copyable']['positions']} positions), {r['other']['accuracy']:.3f} elsewhere")
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
