"""A request, its running state in the step loop, and what a step reports about it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tide_trt.spec.sampling import SamplingParams


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: tuple[int, ...] = ()


@dataclass(eq=False)  # identity semantics: a sequence is itself, whatever its fields hold
class SequenceState:
    request: GenerationRequest
    slot: int
    generator: torch.Generator | None
    tokens: list[int]  # prompt + output; the last one is pending (not yet in the target cache)
    num_prompt: int
    num_computed: int = 0  # prompt tokens in the target cache (chunked prefill progress)
    prefilled: bool = False
    finished: bool = False
    finish_reason: str | None = None
    steps: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.num_prompt:]

    @property
    def mean_accepted_len(self) -> float:
        """τ: output tokens per verification step (the prefill's first token excluded)."""
        return (len(self.output_ids) - 1) / self.steps if self.steps else 1.0

    def append(self, new_ids: list[int], max_seq_len: int) -> tuple[int, ...]:
        """Append output tokens, honouring stop tokens, max_new_tokens and the context limit; returns those kept."""
        req = self.request
        kept = []
        for t in new_ids:
            kept.append(t)
            if t in req.stop_token_ids:
                self.finished, self.finish_reason = True, "stop"
                break
            if len(self.output_ids) + len(kept) >= req.max_new_tokens:
                self.finished, self.finish_reason = True, "length"
                break
            if len(self.tokens) + len(kept) >= max_seq_len:  # a bonus token past the context: dropped
                self.finished, self.finish_reason = True, "context"
                break
        self.tokens.extend(kept)
        return tuple(kept)


@dataclass(frozen=True)
class StepEvent:
    request_id: str
    new_token_ids: tuple[int, ...]
    finished: bool
    finish_reason: str | None
    num_draft: int
    num_accepted: int
    is_prefill: bool = False
