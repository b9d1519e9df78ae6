"""Draft training over state caches: bounded memory, resumable exactly, on CPU or CUDA.

Data order is a pure function of (seed, epoch): each epoch permutes the shards, takes them `pool_shards` at a
time, cuts the pool's sequences into chunks and permutes the chunks. RAM holds one pool. Progress is a position
(epoch, pool, batch) plus the optimizer step, so a checkpoint — head weights, AdamW moments, position, in
`<work>/train_state.safetensors` + `train_state.json`, written atomically every `checkpoint_minutes` — lets a
stopped run continue with the very batch it would have taken next. The learning rate follows the optimizer step
(warm-up, cosine to 10 %), never the wall clock, for the same reason.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from tide_trt.draft.eagle3 import Eagle3Head
from tide_trt.errors import TideError
from tide_trt.kernels import fast_bf16_matmul
from tide_trt.online.trainer import evaluate
from tide_trt.training.state_cache import ShardData, iter_sequences, load_shard, masked_labels
from tide_trt.training.ttt import ChainAcceptance, LossKind, collate, ttt_loss

log = logging.getLogger(__name__)

STATE_WEIGHTS = "train_state.safetensors"
STATE_JSON = "train_state.json"


@dataclass(frozen=True)
class CorpusTrainSettings:
    epochs: float = 2.0
    batch_size: int = 8  # chunks per optimizer step
    chunk_len: int = 256  # positions per chunk
    lr: float = 1e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine from lr down to lr * min_lr_ratio over the step budget
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm
    loss: LossKind = "hard"  # "soft": the target's top-K distribution (needs a format-2 cache); "hard": argmax
    ttt_steps: int = 3
    pool_shards: int = 4  # shards in RAM at once (~75k positions each, ~260 MB of bf16 states)
    train_on_prompt: bool = False  # prompt positions are context; only answer labels (+ the last prompt one) train
    seed: int = 0
    device: str = "cpu"
    autocast: bool = True  # bf16 autocast on CUDA and on CPUs with fast bf16 matmuls (AMX / AVX512-bf16)
    checkpoint_minutes: float = 5.0
    log_every_steps: int = 50  # a learning-curve line (step, lr, loss, step accuracies) in the log
    eval_every_steps: int = 0  # > 0: also run `on_epoch_end`'s evaluation every N optimizer steps (learning curve)


@dataclass
class Position:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    pool: int = 0  # index of the pool within the epoch
    batch: int = 0  # batches of the pool already taken
    tokens: int = 0  # positions trained on


def chunk_spans(labels: list[int], chunk_len: int) -> list[tuple[int, int]]:
    """(start, end) of each training chunk of a sequence: at least 8 positions and a label to learn."""
    spans = []
    for s in range(0, len(labels), chunk_len):
        e = min(len(labels), s + chunk_len)
        if e - s >= 8 and any(x >= 0 for x in labels[s + 1:e]):
            spans.append((s, e))
    return spans


def sequence_chunks(shard: ShardData, a: int, b: int, plen: int, chunk_len: int, train_on_prompt: bool
                    ) -> list[tuple]:
    """Cut the sequence in rows a..b of a shard into chunks (see `masked_labels`, `chunk_spans`):
    (hidden, tokens, labels) — plus (soft_ids, soft_probs) when the shard was loaded with its soft labels."""
    lab = masked_labels(shard.labels[a:b], plen, train_on_prompt).tolist()
    tok = shard.token_ids[a:b].tolist()
    if shard.soft_ids is not None and shard.soft_probs is not None:
        return [(shard.hidden[a + s:a + e], tok[s:e], lab[s:e], shard.soft_ids[a + s:a + e],
                 shard.soft_probs[a + s:a + e]) for s, e in chunk_spans(lab, chunk_len)]
    return [(shard.hidden[a + s:a + e], tok[s:e], lab[s:e]) for s, e in chunk_spans(lab, chunk_len)]


def shard_chunks(shard: ShardData, chunk_len: int, train_on_prompt: bool) -> list[tuple]:
    """Every sequence of a shard cut into chunks."""
    return [c for a, b, plen in shard.sequences() for c in sequence_chunks(shard, a, b, plen, chunk_len,
                                                                            train_on_prompt)]


def _generator(*parts: int) -> torch.Generator:
    seed = 0
    for x in parts:
        seed = (seed * 1_000_003 + x) % (1 << 62)
    return torch.Generator().manual_seed(seed)


def epoch_pools(num_shards: int, pool_shards: int, seed: int, epoch: int) -> list[list[int]]:
    order = torch.randperm(num_shards, generator=_generator(seed, epoch, 0)).tolist()
    return [order[i:i + pool_shards] for i in range(0, num_shards, pool_shards)]


def pool_batches(shards: list[Path], pool: list[int], s: CorpusTrainSettings, epoch: int, pool_index: int
                 ) -> list[list[tuple]]:
    chunks = [c for i in pool for c in shard_chunks(load_shard(shards[i], soft=s.loss == "soft"), s.chunk_len,
                                                    s.train_on_prompt)]
    perm = torch.randperm(len(chunks), generator=_generator(s.seed, epoch, pool_index + 1)).tolist()
    return [[chunks[i] for i in perm[k:k + s.batch_size]] for k in range(0, len(perm), s.batch_size)]


def count_positions(shards: list[Path], chunk_len: int, train_on_prompt: bool) -> tuple[int, int]:
    """(chunks, positions in them) per epoch, exactly as `shard_chunks` cuts them, from the small tensors only
    (for the step budget and the progress bar's ETA)."""
    chunks = positions = 0
    for path in shards:
        with safe_open(str(path), "pt") as f:
            off = f.get_tensor("seq_offsets").tolist()
            plen = f.get_tensor("prompt_lens").tolist()
            labels = f.get_tensor("labels")
        for a, b, p in zip(off[:-1], off[1:], plen, strict=True):
            spans = chunk_spans(masked_labels(labels[a:b], p, train_on_prompt).tolist(), chunk_len)
            chunks += len(spans)
            positions += sum(e - s for s, e in spans)
    return chunks, positions


def lr_at(step: int, total: int, s: CorpusTrainSettings) -> float:
    warm = min(1.0, (step + 1) / max(1, s.warmup_steps))
    cos = 0.5 * (1 + math.cos(math.pi * min(step / max(1, total), 1.0)))
    return s.lr * warm * (s.min_lr_ratio + (1 - s.min_lr_ratio) * cos)


# ---- checkpoints (safetensors + JSON; never pickle) ---------------------------------------------------------
def save_train_state(work: Path, head: Eagle3Head, opt: torch.optim.AdamW, pos: Position, meta: dict,
                     epoch_evals: list[dict] | None = None) -> None:
    tensors = {f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    names = {id(p): n for n, p in head.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                for k in ("exp_avg", "exp_avg_sq", "step"):
                    tensors[f"opt.{names[id(p)]}.{k}"] = torch.as_tensor(st[k]).detach().cpu().contiguous()
    doc = {"position": asdict(pos), "epoch_evals": epoch_evals or [], **meta}
    tmp_w, tmp_j = work / (STATE_WEIGHTS + ".tmp"), work / (STATE_JSON + ".tmp")
    save_file(tensors, str(tmp_w))
    tmp_j.write_text(json.dumps(doc, indent=2, sort_keys=True))
    os.replace(tmp_w, work / STATE_WEIGHTS)  # weights first: a JSON always points at weights at least as new
    os.replace(tmp_j, work / STATE_JSON)


def load_train_state(work: Path, head: Eagle3Head, opt: torch.optim.AdamW) -> tuple[Position, dict]:
    doc = json.loads((work / STATE_JSON).read_text())
    device = next(head.parameters()).device
    with safe_open(str(work / STATE_WEIGHTS), "pt") as f:
        names = set(f.keys())
        state = {k.removeprefix("head."): f.get_tensor(k) for k in names if k.startswith("head.")}
        head.load_state_dict(state, strict=False)
        for name, p in head.named_parameters():
            if f"opt.{name}.exp_avg" in names:
                opt.state[p] = {k: f.get_tensor(f"opt.{name}.{k}").to(device if k != "step" else "cpu")
                                for k in ("exp_avg", "exp_avg_sq", "step")}
    return Position(**doc["position"]), doc


def train_on_shards(head: Eagle3Head, t2d: torch.Tensor, shards: list[Path], s: CorpusTrainSettings, work: Path,
                    *, resume: bool, meta: dict, max_seconds: float | None = None, max_steps: int | None = None,
                    on_epoch_end: Callable[[int, Eagle3Head], dict] | None = None, progress: bool = True
                    ) -> dict[str, Any]:
    """Train `head` in place over the shards for `s.epochs` epochs, checkpointing into `work`. With `resume`,
    continue from the checkpoint there (which must come from the same settings and data). Returns a summary;
    `finished` is False when `max_seconds` or `max_steps` (this run's budgets) stopped it first; run again with
    resume to continue. `on_epoch_end(epoch, head)` (e.g. a held-out evaluation) runs after each full epoch, and
    every `s.eval_every_steps` steps when that is set; its results are kept in the checkpoint and returned as
    `epoch_evals` (the learning curve)."""
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device(s.device)
    head.to(device)
    t2d = t2d.to(device)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.95))
    n_chunks, n_positions = count_positions(shards, s.chunk_len, s.train_on_prompt)
    total_steps = max(1, math.ceil(n_chunks * s.epochs / s.batch_size))
    identity = {"settings": {k: v for k, v in asdict(s).items()
                             if k not in ("checkpoint_minutes", "device", "log_every_steps", "eval_every_steps")},
                "shards": [str(p) for p in shards], "total_steps": total_steps, **meta}
    pos = Position()
    epoch_evals: list[dict] = []
    if resume and (work / STATE_JSON).is_file():
        pos, doc = load_train_state(work, head, opt)
        epoch_evals = doc.get("epoch_evals", [])
        diff = sorted(k for k in identity if doc.get(k) != json.loads(json.dumps(identity[k])))
        if diff:
            raise TideError(f"{work}: the checkpoint was made with other {diff}; resume with the same arguments")
        log.info("resuming at step %d / %d (epoch %d, pool %d, batch %d)", pos.step, total_steps, pos.epoch,
                 pos.pool, pos.batch)
    elif (work / STATE_JSON).is_file():
        raise TideError(f"{work} holds a training checkpoint: pass --resume to continue it, or use another dir")
    use_autocast = s.autocast and (device.type == "cuda" or fast_bf16_matmul())
    head.train()
    t0 = last_ckpt = time.monotonic()
    start_step = pos.step
    accs: list[float] = []
    loss_v = float("nan")
    bar = tqdm(total=int(n_positions * s.epochs), initial=pos.tokens, unit="pos", unit_scale=True,
               desc="draft training", disable=not progress, smoothing=0.05)  # positions trained on: tok/s, ETA
    stopped = False
    while pos.step < total_steps and not stopped:
        pools = epoch_pools(len(shards), s.pool_shards, s.seed, pos.epoch)
        while pos.pool < len(pools) and pos.step < total_steps and not stopped:
            batches = pool_batches(shards, pools[pos.pool], s, pos.epoch, pos.pool)
            while pos.batch < len(batches) and pos.step < total_steps:
                batch = collate(batches[pos.batch]).to(device)
                for group in opt.param_groups:
                    group["lr"] = lr_at(pos.step, total_steps, s)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                    loss, step_accs = ttt_loss(head, batch, t2d, s.ttt_steps, with_accuracy=pos.step % 10 == 0,
                                               loss=s.loss)
                accs = step_accs or accs
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
                opt.step()
                n = int(batch.lengths.sum())
                pos.step, pos.batch, pos.tokens = pos.step + 1, pos.batch + 1, pos.tokens + n
                loss_v = float(loss.detach())
                bar.update(n)
                bar.set_postfix(loss=f"{loss_v:.3f}", acc0=f"{accs[0]:.2f}" if accs else "-", ep=pos.epoch)
                if s.log_every_steps and pos.step % s.log_every_steps == 0:
                    log.info("step %d/%d epoch %d lr %.2e loss %.4f step-acc %s positions %d", pos.step,
                             total_steps, pos.epoch, opt.param_groups[0]["lr"], loss_v,
                             "/".join(f"{a:.3f}" for a in accs), pos.tokens)
                if on_epoch_end is not None and s.eval_every_steps and pos.step % s.eval_every_steps == 0:
                    head.eval()  # no randomness: an evaluation leaves the run's result unchanged
                    epoch_evals.append({"epoch": pos.epoch + pos.pool / len(pools), "step": pos.step,
                                        **on_epoch_end(pos.epoch, head)})
                    head.train()
                now = time.monotonic()
                if now - last_ckpt > 60 * s.checkpoint_minutes:
                    save_train_state(work, head, opt, pos, identity, epoch_evals)
                    last_ckpt = now
                if (max_seconds is not None and now - t0 > max_seconds) or (
                        max_steps is not None and pos.step - start_step >= max_steps):
                    stopped = True
                    break
            if not stopped:
                pos.pool, pos.batch = pos.pool + 1, 0
        if not stopped:
            if on_epoch_end is not None and pos.pool >= len(pools):
                head.eval()
                epoch_evals.append({"epoch": pos.epoch + 1, "step": pos.step, **on_epoch_end(pos.epoch, head)})
                head.train()
            pos.epoch, pos.pool = pos.epoch + 1, 0
    bar.close()
    save_train_state(work, head, opt, pos, identity, epoch_evals)
    head.eval()
    seconds = time.monotonic() - t0
    return {"finished": pos.step >= total_steps, "step": pos.step, "total_steps": total_steps,
            "steps_this_run": pos.step - start_step, "seconds_this_run": seconds, "train_positions": pos.tokens,
            "corpus_positions": n_positions, "chunks": n_chunks, "last_loss": loss_v, "last_step_accuracy": accs,
            "epoch_evals": epoch_evals}


def evaluate_shards(head: Eagle3Head, t2d: torch.Tensor, shards: list[Path], device: str,
                    gammas: tuple[int, ...] = (1, 3, 5), chunk_len: int = 256, max_sequences: int | None = None
                    ) -> dict[str, ChainAcceptance]:
    """Held-out simulated acceptance at each γ (by str(γ)) over the first `max_sequences` sequences (answer
    positions; see ttt.simulated_acceptance for which positions count). Runs in float32, as the draft serves."""
    chunks = [c for shard, a, b, plen in iter_sequences(shards, max_sequences)
              for c in sequence_chunks(shard, a, b, plen, chunk_len, train_on_prompt=False)]
    head.to(device)
    with torch.inference_mode():
        return {str(g): evaluate(head, chunks, t2d.to(device), g, device, batch_size=32) for g in gammas}
