"""The serving core shared by Triton and in-process use: config -> engine, policy, plugins, scheduler.

`build_service(cfg)` is the one place where the γ policy and the step plugins are assembled from the config: a
static γ, or the adaptive controller (a GammaPolicy and a StepPlugin), plus online adaptation (signal capture,
drift detection, refit) as StepPlugins. Everything downstream (Triton model, benchmarks) goes through `TideService`,
so the in-process engine and the Triton server run the same scheduler code path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from tide_trt.config import TideConfig
from tide_trt.engine.generator import SpeculativeGenerator
from tide_trt.engine.hooks import GammaPolicy, StaticGamma, StepPlugin
from tide_trt.errors import RequestError
from tide_trt.serving.requests import ParsedRequest, RequestLimits, check_prompt_length
from tide_trt.serving.scheduler import Job, ResponseChunk, ResponseSink, Scheduler

if TYPE_CHECKING:
    from tide_trt.online.control_plugin import ControllerPlugin

log = logging.getLogger(__name__)


def build_service(cfg: TideConfig) -> tuple[SpeculativeGenerator, GammaPolicy, list[StepPlugin]]:
    """Engine + drafter from the config, the γ policy and the step plugins.

    Policy: no draft -> γ = 0; `controller.mode` "static" -> γ = `draft.gamma`; "off" -> γ = 0; "adaptive" ->
    the adaptive controller over the profiled cost model (profile cached per model/device/dtype/threads).
    Plugins: the controller (adaptive mode) and online adaptation (signal capture, drift, refit) when enabled.
    """
    from tide_trt.runtime import build_drafter_from_config, build_engine, resolve_draft_path

    draft_path = resolve_draft_path(cfg.draft.path)
    engine = build_engine(cfg)
    drafter = build_drafter_from_config(engine, draft_path, cfg.draft) if draft_path is not None else None
    generator = SpeculativeGenerator(engine, drafter)
    gamma = cfg.draft.gamma if drafter is not None else 0  # 1..gamma_max: validated by the config
    log.info(
        "service: %s on %s (%s), draft %s, gamma %d, %d slots x %d tokens",
        engine.info.name,
        engine.info.device,
        engine.info.dtype,
        draft_path or "none",
        gamma,
        engine.info.max_batch_size,
        engine.info.max_seq_len,
    )
    policy: GammaPolicy = StaticGamma(gamma if cfg.controller.mode != "off" else 0)
    controller = None
    if drafter is not None and cfg.controller.mode == "adaptive":
        from tide_trt.online.control_plugin import ControllerPlugin
        from tide_trt.online.engine_profile import cached_engine_profile

        profile = cached_engine_profile(engine, drafter, cfg.draft.gamma_max)
        controller = ControllerPlugin(cfg.controller, profile, cfg.draft.gamma_max, gamma)
        policy = controller
    # online plugins first: refits land before the controller looks
    plugins: list[StepPlugin] = _online_plugins(cfg, generator, controller)
    if controller is not None:
        plugins.append(controller)
    return generator, policy, plugins


def _online_plugins(cfg: TideConfig, generator: SpeculativeGenerator,
                    controller: ControllerPlugin | None) -> list[StepPlugin]:
    """Signal capture / drift / refit plugins (online adaptation), when signals are enabled and a draft serves;
    the controller's `draft_limited` feeds their draft-limited collection trigger."""
    if generator.drafter is None or not cfg.signals.enabled:
        return []
    from tide_trt.online.adaptation import build_online_plugins

    limited = (lambda: controller.controller.draft_limited) if controller is not None else None
    return list(build_online_plugins(cfg, generator.engine, generator, draft_limited_fn=limited))


class TideService:
    """Tokenization + validation in front of a running Scheduler."""

    def __init__(self, cfg: TideConfig, generator: SpeculativeGenerator, policy: GammaPolicy,
                 plugins: Sequence[StepPlugin],
                 metrics_hook: Callable[[dict[str, float]], None] | None = None):  # fmt: skip
        self.cfg = cfg
        self.generator = generator
        self.tokenizer = generator.engine.tokenizer
        if self.tokenizer is None:
            raise RequestError("the target model has no tokenizer; text serving needs one")
        info = generator.engine.info
        self.limits = RequestLimits(cfg.serving.max_tokens_limit, info.vocab_size, info.max_seq_len)
        self.scheduler = Scheduler(
            generator,
            policy,
            plugins,
            self.tokenizer,
            cfg.serving.max_queue,
            metrics_hook,
            cfg.serving.metrics_interval_s,
        )

    @classmethod
    def from_config(
        cls, cfg: TideConfig, metrics_hook: Callable[[dict[str, float]], None] | None = None
    ) -> TideService:
        generator, policy, plugins = build_service(cfg)
        return cls(cfg, generator, policy, plugins, metrics_hook)

    def start(self) -> TideService:
        self.scheduler.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self.scheduler.stop(timeout_s)
        for plugin in self.scheduler.plugins:
            try:
                plugin.close()  # e.g. online adaptation: write the last signal shard, stop its threads
            except Exception:
                log.exception("closing plugin %s failed", type(plugin).__name__)

    def encode(self, parsed: ParsedRequest) -> list[int]:
        from tide_trt.runtime import encode_prompt

        try:
            ids = encode_prompt(self.tokenizer, parsed.text, chat=parsed.apply_chat_template)
        except RequestError:
            raise
        except Exception as exc:  # TideError("prompt is empty") or a tokenizer failure
            raise RequestError(f"text_input could not be tokenized: {exc}") from exc
        if not ids:
            raise RequestError("text_input is empty after tokenization")
        check_prompt_length(len(ids), self.limits)
        return ids

    def submit(self, parsed: ParsedRequest, sink: ResponseSink) -> str:
        """Tokenize, validate, queue. Raises RequestError (incl. ServerBusy) before anything is queued."""
        try:
            ids = self.encode(parsed)
        except RequestError:
            self.count_rejected()
            raise
        eos = tuple(self.generator.engine.info.eos_token_ids)
        stop_ids = (parsed.end_id,) if parsed.end_id is not None else eos
        return self.scheduler.submit(Job(parsed, ids, sink, stop_ids))

    def count_rejected(self) -> None:
        """Count a request refused before queueing (invalid input)."""
        self.scheduler.stats.inc("tide_requests_rejected_total")

    def snapshot(self) -> dict[str, float]:
        return self.scheduler.snapshot()


class CollectingSink:
    """In-process sink: keeps chunks with arrival times; `done` is set at the final response or error."""

    def __init__(self) -> None:
        self.chunks: list[tuple[float, ResponseChunk]] = []
        self.error: str | None = None
        self.cancelled = False
        self.closed = False
        self.done = threading.Event()
        self.t_submit = time.perf_counter()

    def send(self, chunk: ResponseChunk) -> None:
        self.chunks.append((time.perf_counter(), chunk))
        if chunk.final:
            self.done.set()

    def fail(self, message: str) -> None:
        self.error = message
        self.done.set()

    def close(self) -> None:
        self.closed = True
        self.done.set()

    def is_cancelled(self) -> bool:
        return self.cancelled

    @property
    def text(self) -> str:
        return "".join(c.text for _, c in self.chunks) if self.chunks else ""
