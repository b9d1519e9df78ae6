"""Assemble a serving runtime from a config: target engine + (optional) drafter + generator helpers."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tide_trt.config import TideConfig
from tide_trt.draft.checkpoint import load_draft
from tide_trt.draft.drafter import ChainDrafter
from tide_trt.engine.base import TargetEngine
from tide_trt.engine.generator import GenerationRequest, SequenceState, SpeculativeGenerator
from tide_trt.errors import TideError
from tide_trt.spec.sampling import SamplingParams

log = logging.getLogger(__name__)

DEFAULT_DRAFT_DIR = Path(__file__).parent / "assets" / "default_draft"
GAMMA_MIN, GAMMA_MAX = 1, 8


def resolve_draft_path(path: str) -> Path | None:
    if path in ("", "none"):
        return None
    if path == "default":
        if not (DEFAULT_DRAFT_DIR / "model.safetensors").is_file():
            raise TideError(f"the default draft is not installed at {DEFAULT_DRAFT_DIR}")
        return DEFAULT_DRAFT_DIR
    return Path(path)


def build_engine(cfg: TideConfig) -> TargetEngine:
    if cfg.engine.backend == "torch":
        from tide_trt.engine.torch_engine import TorchTargetEngine

        return TorchTargetEngine.from_config(cfg.model, cfg.engine)
    if cfg.engine.backend == "trtllm":
        from tide_trt.engine.trtllm_engine import TrtllmTargetEngine

        return TrtllmTargetEngine.from_config(cfg.model, cfg.engine)
    raise TideError(f"unknown engine.backend {cfg.engine.backend!r} (torch | trtllm)")


def build_drafter(engine: TargetEngine, draft_path: str | Path) -> ChainDrafter:
    """Load + validate a draft checkpoint for this engine and wrap it in a serving drafter."""
    head, manifest = load_draft(draft_path, engine.info, engine.embedding_weight())
    return ChainDrafter.for_engine(head, engine.info, version=int(manifest.get("version", 0)))


def encode_prompt(tokenizer, prompt: str, chat: bool = True) -> list[int]:
    if not prompt or not prompt.strip():
        raise TideError("prompt is empty")
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                            add_generation_prompt=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer.encode(prompt, add_special_tokens=False))


@dataclass
class BatchResult:
    sequences: list[SequenceState]
    seconds: float
    steps: int


def run_to_completion(gen: SpeculativeGenerator, requests: list[GenerationRequest], gamma: int) -> BatchResult:
    """Run a fixed set of requests until all finish (no new arrivals) at a fixed γ."""
    from tide_trt.engine.hooks import StaticGamma

    return run_with_policy(gen, requests, StaticGamma(gamma))


def make_request(request_id: str, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingParams,
                 eos_ids: tuple[int, ...]) -> GenerationRequest:
    return GenerationRequest(request_id, prompt_ids, max_new_tokens, sampling, tuple(eos_ids))


def run_with_policy(gen: SpeculativeGenerator, requests: list[GenerationRequest], policy,
                    plugins: list | None = None) -> BatchResult:
    """Run a fixed set of requests until all finish; γ comes from a GammaPolicy and plugins see every step."""
    from tide_trt.engine.hooks import run_step

    plugin_list = list(plugins or [])
    if hasattr(policy, "after_step") and policy not in plugin_list:
        plugin_list.insert(0, policy)
    seqs = [gen.add(r) for r in requests]
    t0 = time.perf_counter()
    steps = 0
    while any(not s.finished for s in seqs):
        run_step(gen, policy, plugin_list)
        steps += 1
    seconds = time.perf_counter() - t0
    for s in seqs:
        gen.release(s.request.request_id)
    return BatchResult(seqs, seconds, steps)
