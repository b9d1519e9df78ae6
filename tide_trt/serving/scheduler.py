"""Continuous (in-flight) batching over one SpeculativeGenerator, owned by a single scheduler thread.

Between two engine steps the thread: drops cancelled requests (freeing their KV slots), admits waiting
requests while KV slots are free (`engine.max_batch_size` in all), then runs one step through
`run_step(generator, policy, plugins)` and turns the step's events into text responses (incremental
detokenization, stop words, `end_id`). Requests that find the wait queue full (`serving.max_queue`) are
refused at once with "server busy". A failure inside one request's delivery fails only that request; a
failing engine step fails the requests of that step; the loop keeps serving.

The scheduler knows nothing of Triton: responses go to a `ResponseSink` (Triton's response sender in
`triton_model.py`, a `CollectingSink` in-process).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tide_trt.engine.generator import GenerationRequest, SequenceState, SpeculativeGenerator, StepEvent
from tide_trt.engine.hooks import GammaPolicy, StepPlugin, run_step
from tide_trt.errors import RequestError, TideError
from tide_trt.serving.detokenizer import IncrementalDetokenizer
from tide_trt.serving.requests import ParsedRequest, StopWordFilter
from tide_trt.serving.stats import ServingStats

log = logging.getLogger(__name__)

CANCEL_CHECK_SECONDS = 0.05  # how often one request's cancellation flag is polled (an IPC in Triton)


class ServerBusy(RequestError):
    """The wait queue is full."""


@dataclass(frozen=True)
class RequestPerf:
    """Per-request speculation counters (`return_perf_metrics`)."""

    num_input_tokens: int
    num_output_tokens: int
    total_draft_tokens: int
    total_accepted_draft_tokens: int
    acceptance_rate: float
    mean_accepted_len: float


@dataclass(frozen=True)
class ResponseChunk:
    text: str  # streaming: the new text; non-streaming: the whole text
    final: bool
    finish_reason: str | None  # "length" | "stop" (end_id / EOS / stop word) | "context" | None
    perf: RequestPerf | None


class ResponseSink(Protocol):
    def send(self, chunk: ResponseChunk) -> None: ...  # raising = the client is gone (treated as cancel)

    def fail(self, message: str) -> None: ...  # error response, ends the request

    def close(self) -> None: ...  # end the request without a payload (after cancellation)

    def is_cancelled(self) -> bool: ...


@dataclass(eq=False)  # identity semantics: jobs are compared / removed by object
class Job:
    """One request inside the scheduler."""

    parsed: ParsedRequest
    prompt_ids: list[int]
    sink: ResponseSink
    stop_token_ids: tuple[int, ...]
    request_id: str = ""
    seq: SequenceState | None = None
    detok: IncrementalDetokenizer | None = None
    stop: StopWordFilter | None = None
    text_parts: list[str] = field(default_factory=list)
    started: bool = False
    next_cancel_check: float = 0.0


class Scheduler:
    """Owns `generator` on its own thread; `submit()` is safe from any thread."""

    def __init__(
        self,
        generator: SpeculativeGenerator,
        policy: GammaPolicy,
        plugins: Sequence[StepPlugin],
        tokenizer: object,
        max_queue: int,
        metrics_hook: Callable[[dict[str, float]], None] | None = None,
        metrics_interval_s: float = 0.5,
    ) -> None:
        self.generator = generator
        self.policy = policy
        self.plugins = list(plugins)
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.stats = ServingStats()
        self.metrics_hook = metrics_hook
        self.metrics_interval_s = metrics_interval_s
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._active: dict[str, Job] = {}
        self._stopping = False
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._plugin_metrics: dict[str, float] = {}
        self._last_publish = 0.0
        self.stats.set("tide_max_slots", generator.engine.info.max_batch_size)

    # ---- public API -----------------------------------------------------------------------------
    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._run, name="tide-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("scheduler thread did not stop within %.0f s", timeout_s)
            self._thread = None

    def submit(self, job: Job) -> str:
        """Queue a request; raises ServerBusy when the queue is full. Returns the internal request id."""
        with self._cond:
            if self._stopping:
                raise TideError("server is shutting down")
            free = self.generator.engine.num_free_slots
            if len(self._waiting) - free >= self.max_queue:
                self.stats.inc("tide_requests_busy_total")
                self.stats.inc("tide_requests_rejected_total")
                raise ServerBusy(
                    f"server busy: {len(self._waiting)} requests already wait for a KV slot "
                    f"(serving.max_queue={self.max_queue}); retry later"
                )
            job.request_id = f"r{next(self._ids)}"
            self._waiting.append(job)
            self.stats.inc("tide_requests_total")
            self._cond.notify_all()
        return job.request_id

    def snapshot(self) -> dict[str, float]:
        """Every serving value (`tide_*`), plugin metrics included (as last collected by the thread)."""
        with self._cond:
            waiting, active = len(self._waiting), len(self._active)
        self.stats.set("tide_queue_depth", waiting)
        self.stats.set("tide_active_sequences", active)
        self.stats.set("tide_free_slots", self.generator.engine.num_free_slots)
        drafter = self.generator.drafter
        self.stats.set("tide_draft_version", drafter.version if drafter is not None else -1)
        self._draft_source_metrics()
        return self.stats.snapshot(self._plugin_metrics)

    def _draft_source_metrics(self) -> None:
        """Rows / tokens drafted and accepted by the suffix index vs the EAGLE-3 head (draft/suffix.py)."""
        by_source = self.generator.draft_source_stats
        for src, tally in by_source.items():
            self.stats.set_total(f"tide_draft_rows_{src}_total", tally["rows"])
            self.stats.set_total(f"tide_draft_tokens_{src}_total", tally["draft_tokens"])
            self.stats.set_total(f"tide_accepted_draft_tokens_{src}_total", tally["accepted_tokens"])
            drafted = tally["draft_tokens"]
            self.stats.set(f"tide_accepted_per_drafted_{src}", tally["accepted_tokens"] / drafted if drafted else 0.0)
        rows = sum(t["rows"] for t in by_source.values())
        self.stats.set("tide_draft_rows_index_share", by_source["index"]["rows"] / rows if rows else 0.0)
        drafter = self.generator.drafter
        suffix = drafter.suffix if drafter is not None else None
        if suffix is not None:
            stats = suffix.stats()
            self.stats.set("tide_suffix_index_tokens", stats["global_tokens"])
            self.stats.set("tide_suffix_index_sequences", stats["global_sequences"])

    # ---- the loop -------------------------------------------------------------------------------
    def _run(self) -> None:
        log.info(
            "scheduler started (%d KV slots, max queue %d)",
            self.generator.engine.info.max_batch_size,
            self.max_queue,
        )
        while True:
            with self._cond:
                if self._stopping:
                    break
            self._drop_cancelled()
            self._admit()
            if not self._active:
                self._publish(force=True)
                with self._cond:
                    if not self._stopping and not self._waiting:
                        self._cond.wait(timeout=max(self.metrics_interval_s, 0.05))
                continue
            self._step()
            self._publish()
        self._abort_all("server is shutting down")
        log.info("scheduler stopped")

    def _admit(self) -> None:
        engine = self.generator.engine
        while True:
            with self._cond:
                if not self._waiting or engine.num_free_slots < 1:
                    return
                job = self._waiting.popleft()
            if self._is_cancelled(job, force=True):
                self.stats.inc("tide_requests_cancelled_total")
                self._safe(job.sink.close)
                continue
            req = GenerationRequest(
                job.request_id, job.prompt_ids, job.parsed.max_tokens, job.parsed.sampling, job.stop_token_ids
            )
            try:
                job.seq = self.generator.add(req)
            except Exception as exc:  # invalid for this engine: only this request fails
                log.warning("request %s not admitted: %s", job.request_id, exc)
                self.stats.inc("tide_requests_failed_total")
                self._safe(job.sink.fail, str(exc))
                continue
            job.detok = IncrementalDetokenizer(self.tokenizer, job.prompt_ids)
            job.stop = StopWordFilter(job.parsed.stop_words)
            self._active[job.request_id] = job
            self.stats.inc("tide_prompt_tokens_total", len(job.prompt_ids))

    def _step(self) -> None:
        try:
            gamma, events, seconds = run_step(self.generator, self.policy, self.plugins)
        except Exception as exc:
            log.exception("engine step failed; failing its %d requests", len(self._active))
            for failed in list(self._active.values()):
                self._retire(failed, "error", notify_plugins=True)
                self.stats.inc("tide_requests_failed_total")
                self._safe(failed.sink.fail, f"internal error in the engine step: {exc}")
            return
        decode = [ev for ev in events if ev.request_id in self._active and self._active[ev.request_id].started]
        self.stats.record_step(
            gamma, seconds, len(events), draft=sum(ev.num_draft for ev in decode),
            accepted=sum(ev.num_accepted for ev in decode),
            output=sum(len(ev.new_token_ids) for ev in decode), seq_steps=len(decode),
        )  # fmt: skip
        self.stats.inc("tide_output_tokens_total", sum(len(ev.new_token_ids) for ev in events))
        for ev in events:
            job = self._active.get(ev.request_id)
            if job is None:
                continue
            try:
                self._deliver(job, ev)
            except Exception as exc:
                log.exception("request %s failed while delivering output", job.request_id)
                if job.request_id in self._active:
                    self._retire(job, "error", notify_plugins=not ev.finished)
                self.stats.inc("tide_requests_failed_total")
                self._safe(job.sink.fail, f"internal error: {exc}")

    def _deliver(self, job: Job, ev: StepEvent) -> None:
        """Turn one step event into text and send it (or keep it for the single non-streaming response)."""
        assert job.detok is not None and job.stop is not None
        job.started = True
        ids = ev.new_token_ids
        if ev.finish_reason == "stop" and ids and ids[-1] in job.stop_token_ids:
            ids = ids[:-1]  # the end token itself is not part of the text
        delta = job.detok.push(ids)
        if ev.finished:
            delta += job.detok.flush()
        text, stopped = job.stop.feed(delta, final=ev.finished)
        done = ev.finished or stopped
        reason = "stop" if stopped else ev.finish_reason
        chunk_text = text
        if not job.parsed.stream:
            job.text_parts.append(text)
            chunk_text = "".join(job.text_parts)
        if done:
            self._retire(job, reason or "stop", notify_plugins=not ev.finished)
        if job.parsed.stream and not text and not done:
            return
        if not job.parsed.stream and not done:
            return
        perf = self._perf(job) if job.parsed.return_perf_metrics else None
        t0 = time.perf_counter()
        try:
            job.sink.send(ResponseChunk(chunk_text, done, reason if done else None, perf))
            self.stats.add_time("tide_response_seconds_total", time.perf_counter() - t0)
        except Exception as exc:  # the client went away
            log.info("request %s: response failed (%s); dropping it", job.request_id, exc)
            if job.request_id in self._active:
                self._retire(job, "cancelled", notify_plugins=True)
            self.stats.inc("tide_requests_cancelled_total")
            if not done:  # still end the request, or Triton keeps it (and the model) alive
                self._safe(job.sink.close)
            return
        if done:
            self.stats.inc("tide_requests_completed_total")

    # ---- helpers --------------------------------------------------------------------------------
    def _retire(self, job: Job, reason: str, notify_plugins: bool) -> None:
        """Leave the batch: plugins see the finished sequence (unless run_step did), the slot is freed."""
        self._active.pop(job.request_id, None)
        seq = job.seq
        if seq is not None and notify_plugins:
            seq.finished, seq.finish_reason = True, reason
            for p in self.plugins:
                self._safe(p.on_finish, seq)
        self.generator.release(job.request_id)

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        for job in [j for j in self._active.values() if self._is_cancelled(j, now=now)]:
            log.info(
                "request %s cancelled by the client; freeing slot %s",
                job.request_id,
                job.seq.slot if job.seq else "?",
            )
            self._retire(job, "cancelled", notify_plugins=True)
            self.stats.inc("tide_requests_cancelled_total")
            self._safe(job.sink.close)
        with self._cond:
            waiting = list(self._waiting)
        queued = [j for j in waiting if self._is_cancelled(j, now=now)]  # IPC in Triton: outside the lock
        with self._cond:
            queued = [j for j in queued if j in self._waiting]
            for job in queued:
                self._waiting.remove(job)
        for job in queued:
            self.stats.inc("tide_requests_cancelled_total")
            self._safe(job.sink.close)

    def _is_cancelled(self, job: Job, now: float | None = None, force: bool = False) -> bool:
        now = time.monotonic() if now is None else now
        if not force and now < job.next_cancel_check:
            return False
        job.next_cancel_check = now + CANCEL_CHECK_SECONDS
        try:
            return bool(job.sink.is_cancelled())
        except Exception:  # a broken sender counts as a cancelled request
            log.exception("request %s: cancellation check failed", job.request_id)
            return True

    def _perf(self, job: Job) -> RequestPerf:
        seq = job.seq
        assert seq is not None
        return RequestPerf(
            num_input_tokens=len(job.prompt_ids), num_output_tokens=len(seq.output_ids),
            total_draft_tokens=seq.draft_tokens, total_accepted_draft_tokens=seq.accepted_tokens,
            acceptance_rate=seq.accepted_tokens / seq.draft_tokens if seq.draft_tokens else 0.0,
            mean_accepted_len=seq.mean_accepted_len,
        )  # fmt: skip

    def _abort_all(self, message: str) -> None:
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
        for job in list(self._active.values()) + waiting:
            if job.request_id in self._active:
                self._retire(job, "error", notify_plugins=True)
            self.stats.inc("tide_requests_failed_total")
            self._safe(job.sink.fail, message)

    def _publish(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._stopping or (not force and now - self._last_publish < self.metrics_interval_s):
            return
        self._last_publish = now
        metrics: dict[str, float] = {}
        for p in self.plugins:
            try:
                metrics.update(p.metrics())
            except Exception:
                log.exception("plugin %s: metrics() failed", type(p).__name__)
        self._plugin_metrics = metrics
        if self.metrics_hook is not None:
            self._safe(self.metrics_hook, self.snapshot())

    @staticmethod
    def _safe(fn: Callable[..., object], *args: object) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("%s failed", getattr(fn, "__qualname__", fn))
