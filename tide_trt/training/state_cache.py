"""On-disk cache of the target's capture states over a token corpus, written shard by shard (resumable).

Prefill (the recompute path) is the slow half of training from a corpus, so its output is kept on disk and reused
across epochs and runs: RAM holds one batch while prefilling and a bounded pool of shards while training.

A cache directory holds `cache.json` (what was prefilled: corpus fingerprint, target fingerprint, engine
numerics, sequence selection, sequences per shard) and `shard_{i:05d}.safetensors` files. A shard is written to a
temporary name and renamed, so it is either complete or absent; a rerun skips the shards that exist and checks
they hold the expected sequences. Shard tensors:

| name | dtype | shape | what |
|---|---|---|---|
| `hidden_states` | bfloat16 (store dtype) | [N, C, H] | capture-layer states of every position |
| `token_ids` | int32 | [N] | the token at each position |
| `labels` | int32 | [N] | the target's greedy prediction after each position (its own label, not the corpus's) |
| `soft_ids` | int32 | [N, K] | the target's top-K next-token ids (target vocabulary, most likely first) |
| `soft_probs` | float16 | [N, K] | their probabilities under the target's full softmax (sum <= 1) |
| `seq_offsets` | int64 | [S + 1] | sequence s is rows `seq_offsets[s]:seq_offsets[s+1]` |
| `prompt_lens` | int32 | [S] | leading prompt positions of each sequence |

The safetensors header carries the sequence keys (JSON list) so a shard can be matched to the corpus.

Soft labels are kept over the *target* vocabulary: the draft vocabulary is chosen from the cache's own labels after
prefill (and may be rebuilt at another size), so training restricts the top-K to the draft vocabulary and
renormalises (`ttt.soft_targets`). `CACHE_FORMAT` is recorded in `cache.json`; a cache of another format (format 1:
argmax labels only) is refused with a message saying so.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from tide_trt.engine.base import TargetEngine
from tide_trt.errors import TideError
from tide_trt.training.corpus import CorpusSequence

log = logging.getLogger(__name__)

CACHE_FILE = "cache.json"
CACHE_FORMAT = 2  # 1: argmax labels only; 2: + top-K soft labels (soft_ids, soft_probs)
DEFAULT_SOFT_TOP_K = 16


@dataclass(frozen=True)
class ShardPlan:
    index: int
    sequences: tuple[CorpusSequence, ...]

    @property
    def num_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.sequences)

    @property
    def keys(self) -> list[str]:
        return [s.key for s in self.sequences]


def plan_shards(sequences: list[CorpusSequence], shard_sequences: int) -> list[ShardPlan]:
    """Consecutive groups of `shard_sequences` sequences. Prefix-stable: asking for more sequences later keeps
    every full shard's contents, so a cache grows by shards."""
    return [ShardPlan(i // shard_sequences, tuple(sequences[i:i + shard_sequences]))
            for i in range(0, len(sequences), shard_sequences)]


def shard_path(root: Path, index: int) -> Path:
    return root / f"shard_{index:05d}.safetensors"


def shard_keys(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("keys", "[]"))


def check_cache_identity(root: Path, identity: dict) -> None:
    """Create `cache.json`, or refuse a directory that was filled with other data or another target."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / CACHE_FILE
    identity = {"format": CACHE_FORMAT, **identity}
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("format", 1) != CACHE_FORMAT:
            raise TideError(f"{root} is a state cache of format {old.get('format', 1)} (this TIDE writes format "
                            f"{CACHE_FORMAT}: top-K soft labels beside the argmax labels); delete it or use another "
                            "cache directory")
        diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        if diff:
            raise TideError(f"{root} caches other states (differs in {diff}); use another cache directory")
    else:
        path.write_text(json.dumps(identity, indent=2, sort_keys=True))


@dataclass
class PrefillResult:
    """One sequence's prefill output, on CPU."""

    hidden: torch.Tensor  # [T, C, H] store dtype
    labels: torch.Tensor  # [T] int32 argmax
    soft_ids: torch.Tensor  # [T, K] int32 top-K target ids
    soft_probs: torch.Tensor  # [T, K] float16 their probabilities


def top_k_soft_labels(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [..., V] -> (ids [..., K] int32, probabilities [..., K] float16) of the K most likely tokens under
    the full softmax (float32 math)."""
    lf = logits.float()
    vals, ids = torch.topk(lf, k, dim=-1)  # [..., K]
    probs = torch.exp(vals - torch.logsumexp(lf, dim=-1, keepdim=True))  # [..., K]
    return ids.to(torch.int32), probs.to(torch.float16)


@torch.inference_mode()
def prefill_batch(engine: TargetEngine, seqs: list[CorpusSequence], store_dtype: torch.dtype,
                  soft_top_k: int = DEFAULT_SOFT_TOP_K) -> list[PrefillResult]:
    """One target forward over a few sequences -> per sequence states, argmax labels and top-K soft labels."""
    slots = [engine.allocate_slot() for _ in seqs]
    try:
        out = engine.forward(slots, [s.tokens.tolist() for s in seqs], logits="all")  # logits [B, T, V]
        preds = out.logits.argmax(-1).to("cpu", torch.int32)  # [B, T]
        ids, probs = top_k_soft_labels(out.logits, soft_top_k)  # [B, T, K]
        ids, probs = ids.cpu(), probs.cpu()
        hidden = out.hidden.to("cpu", store_dtype)  # [B, T, C, H]
        return [PrefillResult(hidden[b, :len(s.tokens)].clone(), preds[b, :len(s.tokens)].clone(),
                              ids[b, :len(s.tokens)].clone(), probs[b, :len(s.tokens)].clone())
                for b, s in enumerate(seqs)]
    finally:
        for slot in slots:
            engine.free_slot(slot)


def prefill_sequences(engine: TargetEngine, seqs: tuple[CorpusSequence, ...] | list[CorpusSequence],
                      batch_tokens: int, store_dtype: torch.dtype = torch.bfloat16, bar: tqdm | None = None,
                      soft_top_k: int = DEFAULT_SOFT_TOP_K) -> list[PrefillResult]:
    """One `PrefillResult` per sequence, in order: similar lengths batched together, at most `batch_tokens`
    padded positions and `max_batch_size` sequences per forward."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].tokens))
    results: dict[int, PrefillResult] = {}
    max_b = engine.info.max_batch_size
    i = 0
    while i < len(order):
        j = i + 1
        while j < len(order) and j - i < max_b and (j + 1 - i) * len(seqs[order[j]].tokens) <= batch_tokens:
            j += 1
        idx = order[i:j]
        results.update(zip(idx, prefill_batch(engine, [seqs[k] for k in idx], store_dtype, soft_top_k), strict=True))
        if bar is not None:
            bar.update(sum(len(seqs[k].tokens) for k in idx))
        i = j
    return [results[k] for k in range(len(seqs))]


def prefill_shard(engine: TargetEngine, plan: ShardPlan, path: Path, batch_tokens: int,
                  store_dtype: torch.dtype = torch.bfloat16, bar: tqdm | None = None,
                  soft_top_k: int = DEFAULT_SOFT_TOP_K) -> None:
    """Prefill one shard's sequences (`prefill_sequences`) and write the shard atomically."""
    results = prefill_sequences(engine, plan.sequences, batch_tokens, store_dtype, bar, soft_top_k)
    offsets = [0]
    for s in plan.sequences:
        offsets.append(offsets[-1] + len(s.tokens))
    tensors = {
        "hidden_states": torch.cat([r.hidden for r in results]).contiguous(),  # [N, C, H]
        "token_ids": torch.from_numpy(np.concatenate([s.tokens for s in plan.sequences])).to(torch.int32),  # [N]
        "labels": torch.cat([r.labels for r in results]),  # [N]
        "soft_ids": torch.cat([r.soft_ids for r in results]).contiguous(),  # [N, K]
        "soft_probs": torch.cat([r.soft_probs for r in results]).contiguous(),  # [N, K]
        "seq_offsets": torch.tensor(offsets, dtype=torch.long),  # [S + 1]
        "prompt_lens": torch.tensor([s.num_prompt for s in plan.sequences], dtype=torch.int32),  # [S]
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"keys": json.dumps(plan.keys)})
    tmp.replace(path)


def build_state_cache(engine: TargetEngine, sequences: list[CorpusSequence], cache_dir: str | Path,
                      identity: dict, shard_sequences: int = 256, batch_tokens: int = 4096,
                      progress: bool = True, soft_top_k: int = DEFAULT_SOFT_TOP_K) -> list[Path]:
    """Prefill every shard that is not on disk yet; returns all shard paths in order. Stop any time (Ctrl-C, a
    session's end): the next call continues with the first missing shard. `soft_top_k` is part of the cache's
    identity."""
    if soft_top_k < 1:
        raise TideError(f"soft_top_k must be >= 1, got {soft_top_k}")
    root = Path(cache_dir)
    check_cache_identity(root, {**identity, "soft_top_k": soft_top_k})
    plans = plan_shards(sequences, shard_sequences)
    todo = []
    for plan in plans:
        path = shard_path(root, plan.index)
        if path.is_file():
            keys = shard_keys(path)
            if keys == plan.keys:
                continue
            if len(keys) < len(plan.keys) and keys == plan.keys[:len(keys)]:
                log.info("%s was the partial last shard of a smaller run: prefilling it whole", path)
            else:
                raise TideError(f"{path} holds other sequences than this run plans; use another cache directory")
        todo.append(plan)
    total = sum(p.num_tokens for p in plans)
    missing = sum(p.num_tokens for p in todo)
    log.info("state cache %s: %d shards, %d tokens; %d shards (%d tokens) to prefill", root, len(plans), total,
             len(todo), missing)
    if todo:
        t0 = time.perf_counter()
        with tqdm(total=missing, unit="tok", unit_scale=True, desc="target prefill", disable=not progress,
                  smoothing=0.05) as bar:
            for plan in todo:
                prefill_shard(engine, plan, shard_path(root, plan.index), batch_tokens, bar=bar,
                              soft_top_k=soft_top_k)
                log.info("wrote %s (%d sequences, %d tokens)", shard_path(root, plan.index), len(plan.sequences),
                         plan.num_tokens)
        dt = time.perf_counter() - t0
        log.info("prefilled %d tokens in %.0f s (%.0f tok/s)", missing, dt, missing / max(dt, 1e-9))
    return [shard_path(root, p.index) for p in plans]


@dataclass
class ShardData:
    hidden: torch.Tensor  # [N, C, H]
    token_ids: torch.Tensor  # [N] int64
    labels: torch.Tensor  # [N] int64
    seq_offsets: list[int]  # [S + 1]
    prompt_lens: list[int]  # [S]
    soft_ids: torch.Tensor | None = None  # [N, K] int64 target ids (None: read without soft labels)
    soft_probs: torch.Tensor | None = None  # [N, K] float32

    def sequences(self) -> Iterator[tuple[int, int, int]]:
        """(start row, end row, prompt length) of each sequence."""
        for s in range(len(self.prompt_lens)):
            yield self.seq_offsets[s], self.seq_offsets[s + 1], self.prompt_lens[s]


def load_shard(path: str | Path, soft: bool = False) -> ShardData:
    """A shard in RAM; with `soft`, its top-K soft labels too (refused if the shard has none)."""
    with safe_open(str(path), "pt") as f:
        names = set(f.keys())
        if soft and "soft_ids" not in names:
            raise TideError(f"{path} has no soft labels (a format-1 state cache): rebuild it, or train with the "
                            "hard (argmax) loss")
        return ShardData(
            hidden=f.get_tensor("hidden_states"),
            token_ids=f.get_tensor("token_ids").long(),
            labels=f.get_tensor("labels").long(),
            seq_offsets=f.get_tensor("seq_offsets").tolist(),
            prompt_lens=f.get_tensor("prompt_lens").tolist(),
            soft_ids=f.get_tensor("soft_ids").long() if soft else None,
            soft_probs=f.get_tensor("soft_probs").float() if soft else None,
        )


def iter_sequences(paths: list[Path], limit: int | None = None) -> Iterator[tuple[ShardData, int, int, int]]:
    """(shard, start row, end row, prompt length) of the first `limit` sequences across the shards, in order."""
    seen = 0
    for path in paths:
        shard = load_shard(path)
        for a, b, plen in shard.sequences():
            if limit is not None and seen >= limit:
                return
            seen += 1
            yield shard, a, b, plen


def masked_labels(labels: torch.Tensor, prompt_len: int, train_on_prompt: bool) -> torch.Tensor:
    """A sequence's labels [T] with prompt positions before the last one set to -1 unless `train_on_prompt`
    (the draft never drafts inside a prompt)."""
    out = labels.clone()
    if not train_on_prompt:
        out[:max(prompt_len - 1, 0)] = -1
    return out


def shard_label_counts(paths: list[Path], vocab_size: int) -> torch.Tensor:
    """Counts [V] of the target's labels over answer positions (plus each prompt's last position) of the shards,
    reading only the small tensors."""
    counts = torch.zeros(vocab_size)
    for path in paths:
        with safe_open(str(path), "pt") as f:
            labels = f.get_tensor("labels").long()
            off = f.get_tensor("seq_offsets").tolist()
            plen = f.get_tensor("prompt_lens").tolist()
        kept = torch.cat([masked_labels(labels[a:b], p, train_on_prompt=False)
                          for a, b, p in zip(off[:-1], off[1:], plen, strict=True)])
        counts += torch.bincount(kept[kept >= 0], minlength=vocab_size).float()
    return counts
