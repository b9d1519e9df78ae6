"""Suffix drafting: continuations of what the target has said, with a confidence (SuffixDecoding-style).

Two indexes answer each row: the row's own sequence (prompt + output so far, one small index per KV slot) and a
**global index** of finished requests (prompt + output), bounded to `draft.suffix.max_tokens` (oldest evicted)
and optionally preloaded from a token corpus. A row takes the continuation of the longer match (its own sequence on a
tie: a repeat inside the answer is the stronger evidence). Both are the native `SuffixIndex`
(`suffix_index.cpp`: a token ring + hash chains per match order, longest order first; confidence = the share of
earlier occurrences that agree with the proposed path).

Why not arctic-inference's `SuffixDecodingCache`: its sdist builds with torch>=2.10 in an isolated build
environment (a multi-GB CUDA torch download on a fresh machine), protobuf and grpcio-tools, and it installs as a
vLLM plugin; the index here is ~250 lines of C++ built by the same toolchain as the CPU kernel.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from tide_trt.config import SuffixConfig

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("suffix_index.cpp")


@functools.lru_cache(maxsize=1)
def load_suffix_native() -> ModuleType | None:
    """The compiled suffix index module, or None (reason logged once) when it cannot be built here."""
    if os.environ.get("TIDE_DISABLE_NATIVE") == "1":
        log.warning("native extensions disabled by TIDE_DISABLE_NATIVE=1: suffix drafting is off")
        return None
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        log.warning("no C++ compiler found: suffix drafting is off")
        return None
    try:
        from torch.utils.cpp_extension import load, verify_ninja_availability

        verify_ninja_availability()
        return load(name="tide_suffix_index_v1", sources=[str(_SOURCE)], extra_cflags=["-O3"], verbose=False)
    except Exception as exc:  # a broken toolchain must not stop serving
        log.warning("could not build the suffix index (%s): suffix drafting is off", exc)
        return None


@dataclass(frozen=True)
class SuffixProposal:
    """A continuation with its per-token confidence (cumulative: the share of matches agreeing up to there)."""

    tokens: tuple[int, ...]
    confidence: tuple[float, ...]
    order: int  # length of the matched context (tokens)
    source: str  # "request" | "global"

    def __len__(self) -> int:
        return len(self.tokens)


class SuffixIndex:
    """A bounded index of token sequences (thin typed wrapper over the native one)."""

    def __init__(self, capacity: int, orders: Sequence[int], max_candidates: int):
        native = load_suffix_native()
        if native is None:
            raise RuntimeError("the native suffix index is not available (see the log)")
        self._index: Any = native.SuffixIndex(int(capacity), [int(o) for o in orders], int(max_candidates))

    def extend(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Append tokens to the open sequence."""
        self._index.extend(np.asarray(tokens, dtype=np.int32))

    def end_sequence(self) -> None:
        self._index.end_sequence()

    def add_sequence(self, tokens: Sequence[int] | np.ndarray) -> None:
        self.extend(tokens)
        self.end_sequence()

    def clear(self) -> None:
        self._index.clear()

    def propose(self, context: np.ndarray, max_len: int, min_confidence: float
                ) -> tuple[list[int], list[float], int]:
        """context [L] int32 -> (tokens, cumulative confidences, matched order); empty lists where nothing matches."""
        tokens, conf, order, _ = self._index.propose(context, int(max_len), float(min_confidence))
        return tokens, conf, order

    @property
    def size(self) -> int:
        """Tokens held (separators included)."""
        return int(self._index.size)

    @property
    def memory_bytes(self) -> int:
        return int(self._index.memory_bytes)


class SuffixDrafter:
    """Per-slot request indexes + one global index of finished requests; proposes per row.

    Thread-safety: the scheduler thread proposes and indexes; `add_finished` may be called from it too; a lock
    guards the global index so a preload or a metrics read from another thread is safe.
    """

    def __init__(self, config: SuffixConfig, max_slots: int, max_seq_len: int):
        self.config = config
        self.max_seq_len = max_seq_len
        self.global_index = SuffixIndex(config.max_tokens, config.orders, config.max_candidates)
        self._lock = threading.Lock()
        self._request: list[SuffixIndex | None] = [None] * max_slots
        self._indexed = [0] * max_slots  # tokens of the slot's sequence already in its request index
        self.sequences_indexed = 0
        self._context_len = max(max(config.orders), max(config.request_orders))

    # ---- the global index ---------------------------------------------------------------------------------
    def add_finished(self, tokens: Sequence[int]) -> None:
        """A finished (or cancelled) request's prompt + output joins the global index."""
        if not tokens:
            return
        with self._lock:
            self.global_index.add_sequence(tokens)
            self.sequences_indexed += 1

    def preload(self, sequences: Iterable[np.ndarray]) -> int:
        """Index a corpus of token sequences (oldest first); returns the tokens indexed."""
        n = 0
        with self._lock:
            for seq in sequences:
                self.global_index.add_sequence(seq)
                n += len(seq)
                self.sequences_indexed += 1
        return n

    # ---- per-request indexes ------------------------------------------------------------------------------
    def reset_slot(self, slot: int) -> None:
        idx = self._request[slot]
        if idx is not None:
            idx.clear()
        self._indexed[slot] = 0

    def move_slot(self, src: int, dst: int) -> None:
        self._request[dst], self._request[src] = self._request[src], self._request[dst]
        self._indexed[dst], self._indexed[src] = self._indexed[src], 0
        if self._request[src] is not None:
            self._request[src].clear()  # type: ignore[union-attr]

    def _sync(self, slot: int, tokens: Sequence[int]) -> SuffixIndex:
        idx = self._request[slot]
        if idx is None:
            s = self.config
            idx = self._request[slot] = SuffixIndex(self.max_seq_len + 8, s.request_orders, s.max_candidates)
            self._indexed[slot] = 0
        n = self._indexed[slot]
        if len(tokens) < n:  # a shorter sequence in this slot: a new request the caller did not reset for
            idx.clear()
            n = 0
        if len(tokens) > n:
            idx.extend(tokens[n:])
            self._indexed[slot] = len(tokens)
        return idx

    # ---- proposals ----------------------------------------------------------------------------------------
    def propose(self, slot: int, tokens: Sequence[int], max_len: int, sources: str = "hybrid"
                ) -> SuffixProposal | None:
        """The row's continuation, or None: the longer match of its own sequence and the global index (a tie goes to
        its own sequence: a repeat inside the answer is the stronger evidence).
        tokens: the row's whole sequence so far (prompt + output); its request index catches up on the new ones.
        sources: "hybrid" (both, the longer match) | "request" | "global" (benchmarks compare them)."""
        if max_len < 1:
            return None
        idx = self._sync(slot, tokens)
        context = np.asarray(tokens[-self._context_len:], dtype=np.int32)
        min_conf = self.config.min_confidence
        own: SuffixProposal | None = None
        if sources != "global":
            toks, conf, order = idx.propose(context, max_len, min_conf)
            if toks:
                own = SuffixProposal(tuple(toks), tuple(conf), order, "request")
        if sources == "request":
            return own
        with self._lock:
            toks, conf, order = self.global_index.propose(context, max_len, min_conf)
        glob = SuffixProposal(tuple(toks), tuple(conf), order, "global") if toks else None
        if own is None or (glob is not None and glob.order > own.order):
            return glob
        return own

    def stats(self) -> dict[str, int]:
        return {"global_tokens": self.global_index.size, "global_sequences": self.sequences_indexed,
                "global_memory_bytes": self.global_index.memory_bytes}


SHIPPED_CORPUS = Path(__file__).resolve().parents[1] / "assets" / "suffix" / "sharegpt_selfdistill_greedy.npz"


def corpus_sequences(path: str | Path, include_sampled: bool = True) -> list[np.ndarray]:
    """Prompt + answer token sequences [L] int32 of a self-distillation corpus (`../shared/data` layout:
    `prompt_flat/prompt_off`, `greedy_*` and optionally `sampled_*` answers with their prompt indices)."""
    with np.load(path, allow_pickle=False) as d:
        po, pf = d["prompt_off"], d["prompt_flat"]
        out: list[np.ndarray] = []
        kinds = ["greedy"] + (["sampled"] if include_sampled and "sampled_resp_flat" in d.files else [])
        for kind in kinds:
            off, flat, idx = d[f"{kind}_resp_off"], d[f"{kind}_resp_flat"], d[f"{kind}_prompt_index"]
            for k in range(len(off) - 1):
                i = int(idx[k])
                out.append(np.concatenate([pf[po[i]:po[i + 1]], flat[off[k]:off[k + 1]]]).astype(np.int32))
    return out


def build_suffix_drafter(config: SuffixConfig, max_slots: int, max_seq_len: int) -> SuffixDrafter | None:
    """The serving suffix drafter for `draft.suffix` (None when disabled or the native index cannot be built),
    with its global index preloaded as configured."""
    if not config.enabled:
        return None
    if load_suffix_native() is None:
        return None
    drafter = SuffixDrafter(config, max_slots, max_seq_len)
    source = config.preload
    if source == "shipped":
        source = str(SHIPPED_CORPUS) if SHIPPED_CORPUS.is_file() else ""
        if not source:
            log.warning("draft.suffix.preload: shipped corpus not installed at %s; starting empty", SHIPPED_CORPUS)
    if source:
        if not Path(source).is_file():
            from tide_trt.errors import ConfigError

            raise ConfigError(f"draft.suffix.preload: no corpus file at {source}")
        t0 = time.perf_counter()
        try:
            sequences = corpus_sequences(source)
        except (KeyError, ValueError, OSError) as exc:
            from tide_trt.errors import ConfigError

            raise ConfigError(f"draft.suffix.preload: {source} is not a token corpus (.npz with prompt_flat/"
                              f"prompt_off/greedy_* arrays): {exc}") from exc
        n = drafter.preload(sequences)
        log.info("suffix index: %d tokens of %s indexed in %.1f s (%.0f MB)", n, Path(source).name,
                 time.perf_counter() - t0, drafter.global_index.memory_bytes / 1e6)
    return drafter
