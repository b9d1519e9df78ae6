"""`tide train-draft`: offline EAGLE-3 training from a workload (the static speculative-decoding baseline).

Recompute path: the target's prefill over the workload's conversations produces the capture states and the
target's own next-token predictions; the head is trained with the training-time-test objective and reported
with a held-out simulated acceptance.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from tide_trt.draft.eagle3 import Eagle3Config, Eagle3Head
from tide_trt.engine.base import TargetEngine
from tide_trt.kernels import fast_bf16_matmul
from tide_trt.training.data import Example
from tide_trt.training.ttt import ChainAcceptance, collate, simulated_acceptance, ttt_loss
from tide_trt.training.vocab import build_draft_vocab

log = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    epochs: float = 2.0
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    ttt_steps: int = 3
    eval_gamma: int = 3
    seed: int = 0
    chunk_len: int = 256  # examples are cut into chunks of at most this many positions for training
    # bf16 autocast where bf16 matmuls are fast (AVX512-bf16/AMX CPUs, GPUs); master weights stay float32.
    # On AVX2-only CPUs bf16 GEMMs run ~4x slower than float32, so training stays float32 there.
    bf16_autocast: bool = dataclasses.field(default_factory=fast_bf16_matmul)


def new_head(engine: TargetEngine, d2t: torch.Tensor, capture_norm: bool = False) -> Eagle3Head:
    """A fresh head for `engine`'s target; LM head rows and final norm start from the target's own.
    `capture_norm`: per-capture-layer RMSNorm before the FC (see `Eagle3Head.fuse`)."""
    i = engine.info
    cfg = Eagle3Config(hidden_size=i.hidden_size, num_heads=i.num_heads, num_kv_heads=i.num_kv_heads,
                       head_dim=i.head_dim, intermediate_size=i.intermediate_size, rms_norm_eps=i.rms_norm_eps,
                       rope_theta=i.rope_theta, target_vocab_size=i.vocab_size, draft_vocab_size=d2t.numel(),
                       capture_layers=tuple(i.capture_layers), model_fingerprint=i.fingerprint,
                       max_position=max(8192, i.max_seq_len), capture_norm=capture_norm)
    head = Eagle3Head(cfg, engine.embedding_weight())
    with torch.no_grad():
        head.d2t.copy_(d2t)
        head.lm_head.weight.copy_(engine.lm_head_weight()[d2t].float())
        norm = getattr(engine, "final_norm_weight", None)
        if norm is not None:
            head.final_norm.copy_(norm().float())
    return head


def count_labels(examples: list[Example], vocab_size: int) -> torch.Tensor:
    counts = torch.zeros(vocab_size)
    for e in examples:
        labels = torch.tensor(e.labels)
        counts += torch.bincount(labels[labels >= 0], minlength=vocab_size).float()
    return counts


def _chunks(examples: list[Example], chunk_len: int) -> list[tuple[torch.Tensor, list[int], list[int]]]:
    out = []
    for e in examples:
        for s in range(0, len(e.tokens), chunk_len):
            if len(e.tokens) - s >= 8:
                out.append((e.hidden[s:s + chunk_len], e.tokens[s:s + chunk_len], e.labels[s:s + chunk_len]))
    return out


def train_head(head: Eagle3Head, train: list[Example], t2d: torch.Tensor, s: TrainSettings,
               progress: bool = True, max_seconds: float | None = None) -> dict:
    """Optimise `head` in place on the examples; returns a small history dict."""
    rng = random.Random(s.seed)
    chunks = _chunks(train, s.chunk_len)
    steps = max(1, math.ceil(len(chunks) * s.epochs / s.batch_size))
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.95))
    head.train()
    order: list[int] = []
    accs: list[float] = []
    t0 = time.time()
    bar = tqdm(range(steps), desc="draft training", disable=not progress)
    for k in bar:
        # warm-up, then cosine to 10 % over the step budget or the time budget, whichever runs out first
        progress = k / steps if max_seconds is None else max(k / steps, (time.time() - t0) / max_seconds)
        for group in opt.param_groups:
            group["lr"] = s.lr * min(1.0, (k + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1))))
        if len(order) < s.batch_size:
            fresh = list(range(len(chunks)))
            rng.shuffle(fresh)
            order.extend(fresh)
        batch = collate([chunks[i] for i in order[: s.batch_size]])
        del order[: s.batch_size]
        batch.hidden = batch.hidden.float()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.bf16_autocast):
            loss, accs = ttt_loss(head, batch, t2d, s.ttt_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", acc0=f"{accs[0]:.2f}")
        if max_seconds is not None and time.time() - t0 > max_seconds:
            log.info("training stopped at its time budget (%.0f s)", max_seconds)
            break
    head.eval()
    return {"steps": steps, "last_step_accuracy": accs, "seconds": time.time() - t0,
            "train_tokens": sum(len(c[1]) for c in chunks)}


def evaluate_head(head: Eagle3Head, examples: list[Example], t2d: torch.Tensor, gamma: int,
                  chunk_len: int = 256, batch_size: int = 8) -> ChainAcceptance:
    """Held-out simulated acceptance (ttt.simulated_acceptance summed over the examples' chunks)."""
    chunks = _chunks(examples, chunk_len)
    total = ChainAcceptance(gamma)
    head.eval()
    for i in range(0, len(chunks), batch_size):
        batch = collate(chunks[i:i + batch_size])
        batch.hidden = batch.hidden.float()
        total += simulated_acceptance(head, batch, t2d, gamma)
    return total


def build_vocab_and_head(engine: TargetEngine, train: list[Example], draft_vocab_size: int):
    counts = count_labels(train, engine.info.vocab_size)
    d2t, t2d = build_draft_vocab(counts, draft_vocab_size)
    coverage = float(counts[d2t].sum() / counts.sum().clamp(min=1))
    return new_head(engine, d2t), t2d, coverage
