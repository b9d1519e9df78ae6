"""Training examples for the draft: capture states + tokens + target labels.

Recompute path (offline, SpecForge-style): run the target's prefill over conversation text to obtain the
capture states and the target's own next-token predictions (labels). The online path (TIDE) reads the same
records from the signal store instead, where they were captured while serving.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from tide_trt.engine.base import TargetEngine
from tide_trt.errors import TideError

log = logging.getLogger(__name__)


@dataclass
class Example:
    hidden: torch.Tensor  # [T, C, H] (bf16 by default: 2 bytes per value)
    tokens: list[int]  # [T]
    labels: list[int]  # [T] the target's greedy prediction after each position


def encode_conversations(tokenizer, conversations: Iterable, max_len: int) -> list[list[int]]:
    """Chat-template each conversation (all turns) and cut to max_len tokens."""
    out = []
    for conv in conversations:
        msgs = [{"role": t.role, "content": t.text} for t in conv.turns]
        if not msgs:
            continue
        ids = tokenizer.apply_chat_template(msgs, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = list(ids)[:max_len]
        if len(ids) >= 16:
            out.append(ids)
    return out


@torch.inference_mode()
def recompute_examples(engine: TargetEngine, sequences: list[list[int]], batch_size: int = 4,
                       store_dtype: torch.dtype = torch.bfloat16, progress: bool = True) -> list[Example]:
    """Prefill each sequence through the target (the 'second pass' TIDE avoids) and keep states + labels."""
    examples: list[Example] = []
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths per batch
    bar = tqdm(total=sum(len(s) for s in sequences), unit="tok", desc="target prefill", disable=not progress)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        seqs = [sequences[j] for j in idx]
        slots = [engine.allocate_slot() for _ in seqs]
        try:
            out = engine.forward(slots, seqs, logits="all")  # logits [B, T, V], hidden [B, T, C, H]
            preds = out.logits.argmax(-1)  # [B, T]
            for b, s in enumerate(seqs):
                n = len(s)
                examples.append(Example(out.hidden[b, :n].to(store_dtype).clone(), list(s), preds[b, :n].tolist()))
        finally:
            for slot in slots:
                engine.free_slot(slot)
        bar.update(sum(len(s) for s in seqs))
    bar.close()
    return examples


@torch.inference_mode()
def regenerate_examples(engine: TargetEngine, prompts: list[list[int]], max_new_tokens: int,
                        progress: bool = True) -> list[Example]:
    """Self-distillation data: the target answers each prompt (greedy, continuous batching) and the capture
    states it produced while generating are kept — no second pass. Labels are the target's own next tokens
    on the response (and the last prompt position); earlier prompt positions are unlabeled (-1)."""
    from tide_trt.engine.generator import GenerationRequest, SpeculativeGenerator

    states: dict[str, list[torch.Tensor]] = {}  # request id -> capture states of its committed positions, in order

    def keep(request_id: str, start: int, hidden: torch.Tensor, tokens: list[int], is_prompt: bool) -> None:
        states.setdefault(request_id, []).append(hidden.to(torch.bfloat16))  # [n, C, H]

    gen = SpeculativeGenerator(engine, signal_sink=keep)
    todo = list(enumerate(prompts))
    done: dict[int, Example] = {}
    bar = tqdm(total=len(prompts), unit="seq", desc="target generation", disable=not progress)
    while todo or gen.num_active:
        while todo and engine.num_free_slots > 0:
            i, p = todo.pop(0)
            gen.add(GenerationRequest(str(i), p, max_new_tokens, stop_token_ids=engine.info.eos_token_ids))
        gen.step(0)
        for rid, seq in list(gen.sequences.items()):
            if seq.finished:
                n = len(seq.tokens) - 1  # the last token is pending: no capture state yet
                hidden = torch.cat(states.pop(rid))[:n].clone()  # [n, C, H]
                labels = [-1] * (seq.num_prompt - 1) + seq.tokens[seq.num_prompt:]
                done[int(rid)] = Example(hidden, seq.tokens[:n], labels[:n])
                gen.release(rid)
                bar.update(1)
    bar.close()
    return [done[i] for i in range(len(prompts))]  # prompt order


def regenerate_chunked(engine: TargetEngine, prompts: list[list[int]], max_new_tokens: int, cache_dir: str,
                       chunk_size: int = 256, progress: bool = True,
                       metadata: dict[str, str] | None = None) -> list[Example]:
    """`regenerate_examples` in resumable chunks: chunk i (prompts [i*chunk_size, (i+1)*chunk_size)) is saved to
    `cache_dir/chunk_{i:05d}.safetensors` as soon as it is done and loaded instead of regenerated next time, so
    a long self-distillation run can be stopped and continued, or grown by asking for more prompts."""
    from pathlib import Path

    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    examples: list[Example] = []
    for i in range(0, len(prompts), chunk_size):
        path = root / f"chunk_{i // chunk_size:05d}_of{chunk_size}.safetensors"
        part = prompts[i:i + chunk_size]
        if path.is_file():
            chunk = load_examples(str(path))
            if len(chunk) != len(part) or any(e.tokens[:len(p)] != p for e, p in zip(chunk, part, strict=True)):
                raise ValueError(f"{path} holds other prompts than this run's chunk {i // chunk_size}; "
                                 "use another --examples-cache directory")
        else:
            chunk = regenerate_examples(engine, part, max_new_tokens, progress=progress)
            tmp = path.with_suffix(".tmp")
            save_examples(chunk, str(tmp), metadata)
            tmp.replace(path)  # a chunk is either complete or absent
            log.info("saved %s (%d sequences, %d tokens)", path, len(chunk), sum(len(e.tokens) for e in chunk))
        examples.extend(chunk)
    return examples


def save_examples(examples: list[Example], path: str, metadata: dict[str, str] | None = None) -> None:
    """Store examples as one safetensors file (hidden states, tokens, labels, sequence offsets); `metadata`
    (how they were made: command, workload, model) goes into the safetensors header."""
    from safetensors.torch import save_file

    offsets = [0]
    for e in examples:
        offsets.append(offsets[-1] + len(e.tokens))
    save_file({
        "hidden_states": torch.cat([e.hidden for e in examples]).contiguous(),  # [N, C, H]
        "token_ids": torch.tensor([t for e in examples for t in e.tokens], dtype=torch.long),  # [N]
        "labels": torch.tensor([t for e in examples for t in e.labels], dtype=torch.long),  # [N]
        "seq_offsets": torch.tensor(offsets, dtype=torch.long),  # [S+1]
    }, path, metadata=metadata)


def load_examples(path: str) -> list[Example]:
    from safetensors.torch import load_file

    d = load_file(path)
    off = d["seq_offsets"].tolist()
    return [Example(d["hidden_states"][a:b], d["token_ids"][a:b].tolist(), d["labels"][a:b].tolist())
            for a, b in zip(off[:-1], off[1:], strict=True)]


def load_cached_examples(path: str) -> list[Example]:
    """Examples from a `save_examples` file or a `regenerate_chunked` directory (all its chunks, in order)."""
    from pathlib import Path

    root = Path(path)
    if root.is_dir():
        chunks = sorted(root.glob("chunk_*.safetensors"))
        if not chunks:
            raise TideError(f"no chunk_*.safetensors in {root}")
        return [e for chunk in chunks for e in load_examples(str(chunk))]
    if not root.is_file():
        raise TideError(f"training examples not found: {root}")
    return load_examples(str(root))


def cached_examples_metadata(path: str) -> dict[str, str]:
    """The header metadata of a `save_examples` file, or of the first chunk of a chunk directory."""
    from pathlib import Path

    from safetensors import safe_open

    root = Path(path)
    first = min(root.glob("chunk_*.safetensors"), default=None) if root.is_dir() else root
    if first is None or not first.is_file():
        return {}
    with safe_open(str(first), "pt") as f:
        return dict(f.metadata() or {})
