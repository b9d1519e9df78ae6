"""Signal capture: a bounded in-memory buffer fed by the generator's signal sink, flushed by a background
thread into safetensors shards of the signal store.

Hot path (`SignalBuffer.sink`, called by the generator for every committed position): a dict lookup, a
device-side copy of the capture states to the storage dtype, and a queue put. Everything else (moving to
CPU, grouping per request, writing shards) runs on the writer thread. When the buffer holds
`buffer_tokens` tokens, new signals are dropped and counted; requests are never slowed or dropped.

Collection is decided per request when its first signal arrives (`collect_fn()`, Algorithm 1's switch, given to
the constructor; without one every request is collected): a request is captured whole or not at all, so every
stored sequence is contiguous.

Shard format (`SHARD_FORMAT`), S sequences, N tokens, C capture layers, H hidden size:
    hidden_states   [N, C, H]  bf16 (signals.dtype)   capture-layer states, row r = one committed position
    token_ids       [N]  int32     token at that position
    seq_offsets     [S+1] int64    sequence i = rows seq_offsets[i] : seq_offsets[i+1]
    next_token_ids  [S]  int32     token after each sequence's last row (the label of that row)
    prompt_lens     [S]  int32     rows < prompt_lens[i] are prompt positions, the rest output positions
    start_positions [S]  int32     position of each sequence's first row (0 when the prompt is captured)
    draft_versions  [S]  int32     draft version serving the request when its capture started (-1: none)
    draft_tokens, accepted_tokens, accept_trials, verify_steps  [S] int32   served acceptance of the request
                    (accept_trials = Σ(k + [k<γ]) over its speculative steps: α̂ = accepted / trials)
metadata: format, model_fingerprint, model_name, capture_layers (JSON), hidden_size, dtype, created,
    num_tokens, num_sequences, num_label_tokens (output-position labels), request_ids (JSON list).
The label of row r (what the draft learns at entry r-1) is the next stored token: token_ids[r+1] inside a
sequence, next_token_ids[i] for its last row; for output positions these are the target's own outputs.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tide_trt.online.store import SignalStore

log = logging.getLogger(__name__)

SHARD_FORMAT = "tide-signals-v1"
STORE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_COUNTERS = ("tokens_captured", "tokens_dropped", "sequences_dropped", "sequences_skipped",
             "sequences_written", "tokens_written", "shards_written", "write_errors", "sequences_invalid")
# per-sequence int32 tensors of a shard -> SignalSequence attributes
_SEQ_FIELDS = {"next_token_ids": "next_token_id", "prompt_lens": "prompt_len", "start_positions": "start_pos",
               "draft_versions": "draft_version", "draft_tokens": "draft_tokens",
               "accepted_tokens": "accepted_tokens", "accept_trials": "accept_trials",
               "verify_steps": "verify_steps"}


@dataclass
class SignalSequence:
    """One captured request (CPU tensors)."""

    request_id: str
    hidden: torch.Tensor  # [T, C, H]
    token_ids: torch.Tensor  # [T] int64, token at each captured position
    next_token_id: int  # token after the last row (-1: unknown)
    prompt_len: int  # rows [0, prompt_len) are prompt positions
    start_pos: int = 0
    draft_version: int = -1
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accept_trials: int = 0
    verify_steps: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.numel())

    def labels(self, train_on_prompt: bool) -> torch.Tensor:
        """[T] target id after each row; -1 where unknown (or a prompt token, unless train_on_prompt)."""
        lab = torch.cat([self.token_ids[1:], torch.tensor([self.next_token_id])]).long()  # [T]
        if not train_on_prompt and self.prompt_len > 1:
            lab[: self.prompt_len - 1] = -1  # the token after row r < prompt_len-1 is user text
        return lab

    def num_label_tokens(self, train_on_prompt: bool = False) -> int:
        return int((self.labels(train_on_prompt) >= 0).sum())


@dataclass(frozen=True)
class ShardInfo:
    """Identity of the serving target written into every shard."""

    model_fingerprint: str
    model_name: str
    capture_layers: tuple[int, ...]
    hidden_size: int


def write_shard(
    store: SignalStore, seqs: list[SignalSequence], info: ShardInfo, dtype: torch.dtype, counter: int
) -> Path:
    """Pack sequences into one shard, written atomically (temporary file + rename)."""
    store.ensure()
    offsets = [0]
    for s in seqs:
        offsets.append(offsets[-1] + s.num_tokens)
    tensors = {
        "hidden_states": torch.cat([s.hidden.to(dtype) for s in seqs]).contiguous(),  # [N, C, H]
        "token_ids": torch.cat([s.token_ids for s in seqs]).to(torch.int32),  # [N]
        "seq_offsets": torch.tensor(offsets, dtype=torch.int64),  # [S+1]
    }
    for name, attr in _SEQ_FIELDS.items():  # [S] each
        tensors[name] = torch.tensor([getattr(s, attr) for s in seqs], dtype=torch.int32)
    meta = {"format": SHARD_FORMAT, "model_fingerprint": info.model_fingerprint,
            "model_name": info.model_name,
            "capture_layers": json.dumps(list(info.capture_layers)), "hidden_size": str(info.hidden_size),
            "dtype": str(dtype).removeprefix("torch."), "created": f"{time.time():.3f}",
            "num_tokens": str(offsets[-1]), "num_sequences": str(len(seqs)),
            "num_label_tokens": str(sum(s.num_label_tokens() for s in seqs)),
            "request_ids": json.dumps([s.request_id for s in seqs])}
    path = store.new_shard_path(counter)
    tmp = path.with_name(".tmp-" + path.name)
    try:
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_shard(path: str | Path) -> tuple[list[SignalSequence], dict[str, str]]:
    """Load a shard into per-sequence records (hidden states are views of one tensor)."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    if meta.get("format") != SHARD_FORMAT:
        raise ValueError(f"{path}: not a TIDE signal shard (format={meta.get('format')!r})")
    ids = json.loads(meta.get("request_ids", "[]"))
    off = t["seq_offsets"].tolist()
    seqs = []
    for i in range(len(off) - 1):
        a, b = off[i], off[i + 1]
        rid = ids[i] if i < len(ids) else f"{Path(path).name}#{i}"
        fields = {attr: int(t[name][i]) for name, attr in _SEQ_FIELDS.items()}
        seqs.append(SignalSequence(rid, t["hidden_states"][a:b], t["token_ids"][a:b].long(), **fields))
    return seqs, meta


@dataclass
class _Capture:
    capturing: bool
    version: int
    chunks_queued: int = 0
    prompt_len: int = 0


@dataclass(frozen=True)
class FinishInfo:
    """What the writer needs when a captured request ends (no tensors)."""

    next_token_id: int
    num_positions: int  # positions 0..num_positions-1 are in the final output (later rows are discarded)
    draft_tokens: int
    accepted_tokens: int
    accept_trials: int
    verify_steps: int


class SignalBuffer:
    """Bounded async capture (see module docstring). Thread-safe for one producer (the engine loop)."""

    def __init__(self, store: SignalStore, info: ShardInfo, *, buffer_tokens: int = 65536,
                 shard_tokens: int = 4096, dtype: str = "bfloat16", capture_prompt: bool = True,
                 flush_seconds: float = 30.0, collect_fn: Callable[[], bool] | None = None):
        if dtype not in STORE_DTYPES:
            raise ValueError(f"signals.dtype must be one of {sorted(STORE_DTYPES)}, got {dtype!r}")
        self.store = store
        self.info = info
        self.capacity = max(1, int(buffer_tokens))
        self.shard_tokens = max(1, int(shard_tokens))
        self.dtype = STORE_DTYPES[dtype]
        self.capture_prompt = capture_prompt
        self.flush_seconds = flush_seconds
        self._collect_fn = collect_fn or (lambda: True)  # Algorithm 1's switch, read once per request
        self.draft_version = -1  # set by the owner (the version serving new requests)
        self._reqs: dict[str, _Capture] = {}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._enqueued = 0  # tokens put on the queue (producer thread only)
        self._released = 0  # tokens written or discarded (writer thread only)
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self._writer = _ShardWriterThread(self)
        self._writer.start()

    # ---- hot path ------------------------------------------------------------------------------------------
    @property
    def buffered_tokens(self) -> int:
        return self._enqueued - self._released

    def sink(
        self, request_id: str, start: int, hidden: torch.Tensor, token_ids: list[int], is_prompt: bool
    ) -> None:
        """SpeculativeGenerator signal sink: hidden [n, C, H] at positions start..start+n-1."""
        st = self._reqs.get(request_id)
        if st is None:
            st = self._reqs[request_id] = _Capture(bool(self._collect_fn()), self.draft_version)
            if not st.capturing:
                self.counters["sequences_skipped"] += 1
        if not st.capturing:
            return
        if is_prompt:  # a prompt may arrive in several chunks (chunked prefill): its length so far
            st.prompt_len = start + len(token_ids)
            if not self.capture_prompt:
                st.prompt_len = 0
                return
        n = len(token_ids)
        if self.buffered_tokens + n > self.capacity:
            self._drop(request_id, st, n)
            return
        self._enqueued += n
        st.chunks_queued += 1
        self.counters["tokens_captured"] += n
        copy = hidden.detach().to(
            self.dtype, copy=True
        )  # [n, C, H] device-side copy, off the forward buffers
        self._queue.put(("chunk", request_id, start, copy, list(token_ids)))

    def _drop(self, request_id: str, st: _Capture, n: int) -> None:
        st.capturing = False
        self.counters["tokens_dropped"] += n
        self.counters["sequences_dropped"] += 1
        if st.chunks_queued:
            self._queue.put(("discard", request_id))
        log.debug("signal buffer full (%d tokens): dropped request %s", self.buffered_tokens, request_id)

    def finish(self, request_id: str, stats: FinishInfo) -> None:
        """A request ended: the writer assembles its sequence into the current shard."""
        st = self._reqs.pop(request_id, None)
        if st is None or not st.capturing or not st.chunks_queued:
            return
        self._queue.put(("finish", request_id, st.prompt_len, st.version, stats))

    def discard(self, request_id: str) -> None:
        """A request left without finishing (cancelled): forget what was captured."""
        st = self._reqs.pop(request_id, None)
        if st is not None and st.capturing and st.chunks_queued:
            self._queue.put(("discard", request_id))

    def tracked(self) -> list[str]:
        return list(self._reqs)

    # ---- control -------------------------------------------------------------------------------------------
    def flush(self, timeout: float = 60.0) -> bool:
        """Write everything finished so far to a shard and wait for it (tests, shutdown)."""
        done = threading.Event()
        self._queue.put(("flush", done))
        return done.wait(timeout)

    def close(self, timeout: float = 60.0) -> None:
        if self._writer.is_alive():
            self.flush(timeout)
            self._queue.put(("stop",))
            self._writer.join(timeout)

    def metrics(self) -> dict[str, float]:
        m = {f"signals_{k}": float(v) for k, v in self.counters.items()}
        m["signals_buffered_tokens"] = float(self.buffered_tokens)
        m["signals_buffer_capacity"] = float(self.capacity)
        return m


class _ShardWriterThread(threading.Thread):
    """Groups chunks per request, packs finished sequences into shards, writes them."""

    def __init__(self, buf: SignalBuffer):
        super().__init__(name="tide-signal-writer", daemon=True)
        self.buf = buf
        self.parts: dict[str, list[tuple[int, torch.Tensor, list[int]]]] = {}
        self.pending: list[SignalSequence] = []
        self.pending_tokens = 0
        self.pending_since = 0.0
        self.counter = 0

    def run(self) -> None:
        buf = self.buf
        while True:
            try:
                msg = buf._queue.get(timeout=min(1.0, max(buf.flush_seconds, 0.05)))
            except queue.Empty:
                msg = None
            try:
                if msg is not None and msg[0] == "stop":
                    self._write()
                    return
                self._handle(msg)
            except Exception:  # never let a bad message kill capture
                log.exception("signal writer: unexpected error")
                buf.counters["write_errors"] += 1

    def _handle(self, msg: tuple[Any, ...] | None) -> None:
        buf = self.buf
        if msg is None:
            pass
        elif msg[0] == "chunk":
            _, rid, start, hidden, toks = msg
            self.parts.setdefault(rid, []).append((start, hidden.cpu(), toks))
        elif msg[0] == "discard":
            buf._released += sum(len(p[2]) for p in self.parts.pop(msg[1], []))
        elif msg[0] == "finish":
            self._assemble(*msg[1:])
        elif msg[0] == "flush":
            self._write()
            msg[1].set()
        if self.pending and (
            self.pending_tokens >= buf.shard_tokens
            or buf.buffered_tokens >= buf.capacity // 2  # make room before the buffer fills
            or time.monotonic() - self.pending_since >= buf.flush_seconds
        ):
            self._write()

    def _assemble(self, rid: str, prompt_len: int, version: int, stats: FinishInfo) -> None:
        parts = self.parts.pop(rid, [])
        n = sum(len(p[2]) for p in parts)
        pos = parts[0][0] if parts else 0
        for start, _, toks in parts:
            if start != pos:  # a gap or overlap: never store a non-contiguous sequence
                log.warning("signal writer: request %s not contiguous at %d (expected %d)", rid, start, pos)
                self.buf.counters["sequences_invalid"] += 1
                self.buf._released += n
                return
            pos += len(toks)
        # drafts accepted past a stop token / max_new_tokens were recorded but are not in the output
        keep = min(n, stats.num_positions - (parts[0][0] if parts else 0))
        if keep < 2:
            self.buf._released += n
            return
        self.buf._released += n - keep
        start = parts[0][0]
        seq = SignalSequence(
            rid, torch.cat([p[1] for p in parts])[:keep],
            torch.tensor([t for p in parts for t in p[2]][:keep], dtype=torch.long), stats.next_token_id,
            prompt_len=min(keep, max(0, prompt_len - start)), start_pos=start, draft_version=version,
            draft_tokens=stats.draft_tokens, accepted_tokens=stats.accepted_tokens,
            accept_trials=stats.accept_trials, verify_steps=stats.verify_steps)
        if not self.pending:
            self.pending_since = time.monotonic()
        self.pending.append(seq)
        self.pending_tokens += keep

    def _write(self) -> None:
        if not self.pending:
            return
        buf = self.buf
        seqs, n = self.pending, self.pending_tokens
        self.pending, self.pending_tokens = [], 0
        try:
            path = write_shard(buf.store, seqs, buf.info, buf.dtype, self.counter)
            self.counter += 1
            buf.counters["shards_written"] += 1
            buf.counters["sequences_written"] += len(seqs)
            buf.counters["tokens_written"] += n
            log.debug("signal shard %s: %d sequences, %d tokens", path.name, len(seqs), n)
        except Exception:
            log.exception("signal writer: cannot write a shard of %d tokens; dropped", n)
            buf.counters["write_errors"] += 1
        finally:
            buf._released += n
