"""Recompute baseline: the data path TIDE avoids, for benchmarks.

A recompute-style online trainer keeps only the served text (token ids + per-request metadata) and, when a
round starts, re-runs the target's prefill over it to regenerate the capture-layer states. The resulting
records are the same `SignalSequence`s the reuse path reads from shards (same positions, tokens, labels and
served statistics), so `trainer.train_round` consumes either one unchanged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch

from tide_trt.engine.base import TargetEngine
from tide_trt.online.signals import STORE_DTYPES, SignalSequence

log = logging.getLogger(__name__)

TEXT_BYTES_PER_TOKEN = 4  # an int32 token id: all the recompute path has to keep per token


@dataclass
class ServedText:
    """What the recompute path stores per request: the served token ids (no hidden states)."""

    sequence: SignalSequence  # metadata carrier; its `hidden` is an empty [0, C, H] tensor
    token_ids: list[int]  # positions start_pos .. start_pos + T, i.e. captured positions + the final token

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) - 1


def served_texts(seqs: list[SignalSequence]) -> list[ServedText]:
    """Drop the hidden states of captured sequences, keeping exactly what recompute needs."""
    out = []
    for s in seqs:
        empty = s.hidden[:0].clone()  # [0, C, H]
        ids = s.token_ids.tolist() + [s.next_token_id]
        out.append(ServedText(replace(s, hidden=empty, token_ids=s.token_ids.clone()), ids))
    return out


def stored_bytes_per_token(seqs: list[SignalSequence]) -> dict[str, float]:
    """Storage per captured token: reuse path (hidden states + token id) vs recompute path (token id)."""
    if not seqs:
        return {"reuse": 0.0, "recompute": float(TEXT_BYTES_PER_TOKEN)}
    h = seqs[0].hidden
    per_token = h[0].numel() * h.element_size() + 4  # [C, H] states + an int32 token id
    return {
        "reuse": float(per_token),
        "recompute": float(TEXT_BYTES_PER_TOKEN),
        "ratio": per_token / TEXT_BYTES_PER_TOKEN,
    }


@torch.inference_mode()
def recompute_signals(
    engine: TargetEngine, texts: list[ServedText], *, batch_size: int = 4, dtype: str = "bfloat16"
) -> tuple[list[SignalSequence], float]:
    """Re-run the target prefill over each served text (all positions but the final token, exactly the
    positions serving captured). Returns the rebuilt sequences and the prefill seconds."""
    store_dtype = STORE_DTYPES[dtype]
    out: list[SignalSequence | None] = [None] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i].token_ids))  # similar lengths per batch
    t0 = time.perf_counter()
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        slots = [engine.allocate_slot() for _ in idx]
        try:
            if any(texts[j].sequence.start_pos for j in idx):
                raise ValueError(
                    "recompute needs sequences captured from position 0 (signals.capture_prompt)"
                )
            inputs = [texts[j].token_ids[:-1] for j in idx]
            fwd = engine.forward(slots, inputs, logits="last")  # hidden [B, T, C, H]
            for b, j in enumerate(idx):
                n = len(inputs[b])
                hidden = fwd.hidden[b, :n].to("cpu", store_dtype).clone()  # [n, C, H]
                out[j] = replace(texts[j].sequence, hidden=hidden)
        finally:
            for s in slots:
                engine.free_slot(s)
    seconds = time.perf_counter() - t0
    log.info(
        "recompute: %d sequences, %d tokens re-prefilled in %.1f s",
        len(texts),
        sum(t.num_tokens for t in texts),
        seconds,
    )
    return [s for s in out if s is not None], seconds
