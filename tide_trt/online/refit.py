"""Refit: adopt newly published draft versions inside a running engine, between steps, target untouched.

Protocol (a StepPlugin):
  * a background thread polls the draft store every `poll_seconds`: the wanted version is the pin
    (`CURRENT`, written by `tide drafts use N`) or else the latest manifest entry;
  * when it differs from the served version, the thread loads it with `load_draft`, which validates
    fingerprint, hidden size, vocabulary, capture layers, tensor names/shapes/dtypes and finiteness, and
    parks the head as "ready";
  * `before_step` (engine thread) swaps a ready head in with `ChainDrafter.swap` (a pointer swap + the
    serving copy; the draft KV cache is reset and the generator re-feeds stored capture states);
  * a version that fails validation is rejected (logged, counted, remembered until its files change);
    serving stays on the version it has.
The target engine's weights are never read or written here; the head shares its frozen embedding.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tide_trt.draft.checkpoint import CONFIG, WEIGHTS, load_draft
from tide_trt.draft.drafter import ChainDrafter
from tide_trt.draft.eagle3 import Eagle3Head
from tide_trt.engine.base import ModelInfo
from tide_trt.engine.generator import SequenceState, SpeculativeGenerator, StepEvent
from tide_trt.errors import TideError
from tide_trt.online.store import DraftStore, read_jsonl

log = logging.getLogger(__name__)


def _files_key(path: Path) -> tuple[int, int]:
    try:
        return (path / WEIGHTS).stat().st_mtime_ns, (path / CONFIG).stat().st_mtime_ns
    except OSError:
        return (0, 0)


class RoundsTail:
    """Reads the lines appended to rounds.jsonl since the last call (training-round decisions)."""

    def __init__(self, store: DraftStore, from_start: bool = False):
        self.store = store
        self.seen = 0 if from_start else len(read_jsonl(store.rounds_path))

    def new_rounds(self) -> list[dict]:
        rounds = read_jsonl(self.store.rounds_path)
        if len(rounds) < self.seen:  # file replaced: start over
            self.seen = 0
        new, self.seen = rounds[self.seen :], len(rounds)
        return new


class RefitWatcher:
    """StepPlugin that keeps the served draft equal to the draft store's current version."""

    def __init__(
        self,
        store: DraftStore,
        info: ModelInfo,
        embed: torch.Tensor,
        *,
        poll_seconds: float = 2.0,
        background: bool = True,
    ):
        self.store = store
        self.info = info
        self.embed = embed  # [V, H] the target's embedding, shared by every head (never copied)
        self.poll_seconds = max(0.0, float(poll_seconds))
        self.background = background
        self.listeners: list[Callable[[int], None]] = []  # called with the new version after each swap
        self.rounds = RoundsTail(store)
        self._pending_rounds: list[dict] = []
        self._served: int | None = None
        self._ready: tuple[int, Eagle3Head, dict] | None = None
        self._rejected: dict[int, tuple[tuple[int, int], str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_poll = 0.0
        self.stats = {"refits": 0, "rejected": 0, "polls": 0, "last_load_s": 0.0, "last_swap_s": 0.0}

    # ---- StepPlugin ----------------------------------------------------------------------------------------
    def before_step(self, generator: SpeculativeGenerator) -> None:
        drafter = generator.drafter
        self._served = drafter.version if drafter is not None else None
        if self.background:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="tide-refit-watcher", daemon=True)
                self._thread.start()
        elif time.monotonic() - self._last_poll >= self.poll_seconds:
            self.poll()
        with self._lock:
            ready, self._ready = self._ready, None
        if ready is not None and ready[0] != self._served:
            self._swap(generator, *ready)

    def after_step(
        self, generator: SpeculativeGenerator, gamma: int, events: list[StepEvent], seconds: float
    ) -> None:
        return None

    def on_finish(self, seq: SequenceState) -> None:
        return None

    def metrics(self) -> dict[str, float]:
        m = {f"refit_{k}": float(v) for k, v in self.stats.items()}
        m["draft_version"] = float(self._served if self._served is not None else -1)
        return m

    # ---- polling (background thread, or inline when background=False) -------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:  # a broken store must never stop serving
                log.exception("refit watcher: poll failed")
            self._stop.wait(self.poll_seconds or 0.05)

    def poll(self) -> int | None:
        """Check the store once; load + validate the wanted version if it is new. Returns it if ready."""
        self._last_poll = time.monotonic()
        self.stats["polls"] += 1
        new_rounds = self.rounds.new_rounds()
        if new_rounds:
            with self._lock:
                self._pending_rounds.extend(new_rounds)
        want = self.store.current()
        if want is None or want == self._served:
            return None
        with self._lock:
            if self._ready is not None and self._ready[0] == want:
                return want
        path = self.store.version_dir(want)
        key = _files_key(path)
        if want in self._rejected and self._rejected[want][0] == key:
            return None
        t0 = time.perf_counter()
        try:
            head, manifest = load_draft(path, self.info, self.embed)
        except TideError as exc:
            self._reject(want, key, str(exc))
            return None
        except Exception as exc:  # anything unexpected in a checkpoint is a rejection, not a crash
            self._reject(want, key, f"{type(exc).__name__}: {exc}")
            return None
        head.to(device=self.info.device, dtype=self.info.activation_dtype)  # the swap's conversion, done here
        self.stats["last_load_s"] = time.perf_counter() - t0
        with self._lock:
            self._ready = (want, head, manifest)
        log.info(
            "refit: draft version %d validated in %.3f s; swapping at the next step",
            want,
            self.stats["last_load_s"],
        )
        return want

    def _reject(self, version: int, key: tuple[int, int], why: str) -> None:
        self._rejected[version] = (key, why)
        self.stats["rejected"] += 1
        log.error(
            "refit: draft version %d rejected, serving stays on version %s: %s", version, self._served, why
        )

    def rejected(self) -> dict[int, str]:
        return {v: why for v, (_, why) in self._rejected.items()}

    def take_rounds(self) -> list[dict]:
        """Training-round decisions seen since the last call (applied by the owner on the engine thread)."""
        with self._lock:
            out, self._pending_rounds = self._pending_rounds, []
        return out

    # ---- swap (engine thread, between steps) ---------------------------------------------------------------
    def _swap(self, generator: SpeculativeGenerator, version: int, head: Eagle3Head, manifest: dict) -> None:
        t0 = time.perf_counter()
        old = generator.drafter.version if generator.drafter is not None else None
        if generator.drafter is None:
            generator.drafter = ChainDrafter.for_engine(head, self.info, version=version)
        else:
            generator.drafter.swap(head, version)
        self._served = version
        self.stats["refits"] += 1
        self.stats["last_swap_s"] = time.perf_counter() - t0
        log.info(
            "refit: draft version %s -> %d (swap %.1f ms, eval acceptance %s)",
            old,
            version,
            1e3 * self.stats["last_swap_s"],
            manifest.get("eval_acceptance"),
        )
        for fn in self.listeners:
            try:
                fn(version)
            except Exception:
                log.exception("refit listener failed")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
