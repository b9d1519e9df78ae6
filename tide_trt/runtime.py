"""Assemble a serving runtime from a config: target engine + (optional) drafter + generator helpers."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from tide_trt.config import DraftConfig, SuffixConfig, TideConfig
from tide_trt.draft.checkpoint import load_draft
from tide_trt.draft.drafter import ChainDrafter
from tide_trt.draft.suffix import build_suffix_drafter
from tide_trt.engine.base import TargetEngine
from tide_trt.engine.generator import GenerationRequest, SequenceState, SpeculativeGenerator
from tide_trt.errors import TideError
from tide_trt.spec.sampling import SamplingParams

if TYPE_CHECKING:
    from tide_trt.engine.hooks import GammaPolicy, StepPlugin

log = logging.getLogger(__name__)

SHIPPED_DRAFTS_DIR = Path(__file__).parent / "assets" / "drafts"  # one directory per named, released draft
DEFAULT_DRAFT = "v4"  # the shipped draft that `draft.path: default` serves
DEFAULT_DRAFT_DIR = SHIPPED_DRAFTS_DIR / DEFAULT_DRAFT


def shipped_drafts() -> dict[str, Path]:
    """Released drafts by name (`tide_trt/assets/drafts/<name>`), e.g. {"v3": ..., "v4": ...}."""
    if not SHIPPED_DRAFTS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(SHIPPED_DRAFTS_DIR.iterdir()) if (p / "model.safetensors").is_file()}


def resolve_draft_path(path: str) -> Path | None:
    """"none"/"" -> no draft; "default" -> the default shipped draft; an existing directory -> itself; the name of
    a shipped draft ("v3") -> its directory; anything else is returned as a path (loading reports it missing)."""
    if path in ("", "none"):
        return None
    if path == "default":
        if not (DEFAULT_DRAFT_DIR / "model.safetensors").is_file():
            raise TideError(f"the default draft is not installed at {DEFAULT_DRAFT_DIR}")
        return DEFAULT_DRAFT_DIR
    shipped = shipped_drafts()
    if not Path(path).exists() and path in shipped:
        return shipped[path]
    return Path(path)


def build_engine(cfg: TideConfig) -> TargetEngine:
    """The target engine of `engine.backend` (torch | trtllm; the config validated the choice); the torch
    engine's CUDA graphs cover steps of `draft.gamma_max` drafts per row."""
    if cfg.engine.backend == "trtllm":
        from tide_trt.engine.trtllm_engine import TrtllmTargetEngine

        return TrtllmTargetEngine.from_config(cfg.model, cfg.engine)
    from tide_trt.engine.torch_engine import TorchTargetEngine

    return TorchTargetEngine.from_config(cfg.model, cfg.engine, gamma_max=cfg.draft.gamma_max)


def build_drafter(engine: TargetEngine, draft_path: str | Path, lookup_ngram: int = 0,
                  lookup_gamma: int = 0, suffix: SuffixConfig | None = None,
                  catch_up_window: int = DraftConfig.catch_up_window) -> ChainDrafter:
    """Load + validate a draft checkpoint for this engine and wrap it in a serving drafter. `suffix`
    (`draft.suffix`): the suffix index + head hybrid (draft/suffix.py; None or disabled: the head alone);
    `lookup_ngram` > 0 (without the suffix index): n-gram lookup proposals where the sequence repeats itself
    (draft/lookup.py), `lookup_gamma` > 0: rows the lookup covers draft that many tokens."""
    head, manifest = load_draft(draft_path, engine.info, engine.embedding_weight())
    index = None
    if suffix is not None:
        index = build_suffix_drafter(suffix, engine.info.max_batch_size, engine.info.max_seq_len)
    return ChainDrafter.for_engine(head, engine.info, version=int(manifest.get("version", 0)),
                                   lookup_ngram=lookup_ngram, lookup_gamma=lookup_gamma,
                                   cuda_graphs=engine.uses_cuda_graphs, suffix=index,
                                   catch_up_window=catch_up_window)


def build_drafter_from_config(engine: TargetEngine, draft_path: str | Path, cfg: DraftConfig) -> ChainDrafter:
    """`build_drafter` with every drafting setting of `draft` (what `tide generate` and `tide serve` run)."""
    return build_drafter(engine, draft_path, cfg.lookup_ngram, cfg.lookup_gamma, cfg.suffix, cfg.catch_up_window)


@runtime_checkable
class TokenDecoder(Protocol):
    """What turning generated ids back into text needs of a tokenizer (a Hugging Face tokenizer has it).

    `TargetEngine.tokenizer` is typed `object`; `isinstance(tokenizer, TokenDecoder)` narrows it.
    """

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str: ...


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


def run_with_policy(gen: SpeculativeGenerator, requests: list[GenerationRequest], policy: GammaPolicy,
                    plugins: Sequence[StepPlugin] = ()) -> BatchResult:
    """Run a fixed set of requests until all finish; γ comes from `policy` and `plugins` see every step (a policy
    that is also a StepPlugin, such as ControllerPlugin, is listed in `plugins` too)."""
    from tide_trt.engine.hooks import run_step

    plugin_list = list(plugins)
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
