"""The speculative step loop over a running batch: prefill new sequences, then one draft -> verify round.

This is the engine core every front end drives (CLI, Triton scheduler, benchmarks). Each `step(gamma)`:
  1. prefills sequences that joined since the last step (their first token is sampled from the target);
  2. for running sequences: the drafter proposes γ tokens (γ = 0 -> plain decoding, no draft cost), the target
     verifies [pending, d_1..d_γ] in one forward pass returning logits and capture-layer hidden states,
     verification keeps accepted + recovered/bonus tokens, the target KV cache is rolled back to the kept
     prefix, and the hidden states of committed positions go to the signal sink (TIDE's training data).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch

from tide_trt.config import DraftConfig
from tide_trt.draft.drafter import ChainDrafter, DraftSampling
from tide_trt.engine.base import TargetEngine
from tide_trt.errors import RequestError
from tide_trt.spec.sampling import SamplingParams, logits_to_probs, make_generator, sample_from_probs
from tide_trt.spec.verify import mixed_verify

log = logging.getLogger(__name__)

# (request_id, first position, hidden [n, C, H], token ids [n] at those positions, is_prompt)
SignalSink = Callable[[str, int, torch.Tensor, list[int], bool], None]


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class SequenceState:
    request: GenerationRequest
    slot: int
    generator: torch.Generator | None
    tokens: list[int]  # prompt + output; the last one is pending (not yet in the target cache)
    num_prompt: int
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


@dataclass(frozen=True)
class StepEvent:
    request_id: str
    new_token_ids: tuple[int, ...]
    finished: bool
    finish_reason: str | None
    num_draft: int
    num_accepted: int
    is_prefill: bool = False


class SpeculativeGenerator:
    def __init__(self, engine: TargetEngine, drafter: ChainDrafter | None = None,
                 signal_sink: SignalSink | None = None,
                 catch_up_window: int = DraftConfig.catch_up_window):
        self.engine = engine
        self.drafter = drafter
        self.signal_sink = signal_sink
        # the draft catches up on at most this many positions (0: all): after speculation was off, or on a new
        # prompt, it restarts on the last ones instead of a draft prefill over the whole context
        self.catch_up_window = max(int(catch_up_window), 0)
        info = engine.info
        self.sequences: dict[str, SequenceState] = {}
        # capture-layer states of every cached target position, per slot (draft catch-up and refit re-feed)
        self.history = torch.zeros(info.max_batch_size, info.max_seq_len, len(info.capture_layers),
                                   info.hidden_size, dtype=torch.bfloat16 if info.dtype != "float32"
                                   else torch.float32, device=info.device)  # [S, L, C, H]

    # ---- admission ----------------------------------------------------------------------------------------
    def add(self, req: GenerationRequest) -> SequenceState:
        info = self.engine.info
        req.sampling.validate()
        if not req.prompt_ids:
            raise RequestError("prompt is empty")
        if req.max_new_tokens < 1:
            raise RequestError("max_new_tokens must be >= 1")
        if len(req.prompt_ids) + 1 > info.max_seq_len:
            raise RequestError(f"prompt has {len(req.prompt_ids)} tokens; the context limit is {info.max_seq_len}")
        if any(not 0 <= t < info.vocab_size for t in req.prompt_ids):
            raise RequestError("prompt token id outside the vocabulary")
        if req.request_id in self.sequences:
            raise RequestError(f"duplicate request id {req.request_id!r}")
        slot = self.engine.allocate_slot()
        if self.drafter is not None:
            self.drafter.reset_slot(slot)
        seq = SequenceState(req, slot, make_generator(req.sampling), list(req.prompt_ids), len(req.prompt_ids))
        self.sequences[req.request_id] = seq
        return seq

    def release(self, request_id: str) -> SequenceState | None:
        """Drop a sequence (finished or cancelled) and free its KV slot."""
        seq = self.sequences.pop(request_id, None)
        if seq is not None:
            self.engine.free_slot(seq.slot)
            self._compact(seq.slot)
        return seq

    def _compact(self, hole: int) -> None:
        """Move the highest-slot sequence into the freed slot so running slots stay contiguous [0, n)."""
        if not self.engine.supports_compaction or not self.sequences:
            return
        top = max(self.sequences.values(), key=lambda s: s.slot)
        if top.slot < hole:
            return
        src = top.slot
        self.engine.move_slot(src, hole)
        if self.drafter is not None:
            self.drafter.move_slot(src, hole)
        n = len(top.tokens)
        self.history[hole, :n] = self.history[src, :n]
        top.slot = hole

    @property
    def num_active(self) -> int:
        return len(self.sequences)

    # ---- one engine step ----------------------------------------------------------------------------------
    def step(self, gamma: int, drafting: Collection[str] | None = None) -> list[StepEvent]:
        """One engine step at draft length γ. `drafting`: the request ids that draft this step (None: all);
        the others decode one token in the same target pass (a controller's probe of a few requests)."""
        events: list[StepEvent] = []
        new = sorted((s for s in self.sequences.values() if not s.prefilled and not s.finished),
                     key=lambda s: s.slot)
        if new:
            events.extend(self._prefill(new))
        running = sorted((s for s in self.sequences.values() if s.prefilled and not s.finished and s not in new),
                         key=lambda s: s.slot)
        if running:
            gamma = self._cap_gamma(running, gamma)
            chosen = running if drafting is None else [s for s in running if s.request.request_id in drafting]
            if gamma > 0 and self.drafter is not None and chosen:
                events.extend(self._speculate(running, chosen, gamma))
            else:
                events.extend(self._plain(running))
        return events

    def _cap_gamma(self, running: list[SequenceState], gamma: int) -> int:
        room = min(self.engine.info.max_seq_len - len(s.tokens) for s in running)  # verify needs gamma+1
        return max(0, min(gamma, room))

    def _prefill(self, seqs: list[SequenceState]) -> list[StepEvent]:
        out = self.engine.forward([s.slot for s in seqs], [s.tokens for s in seqs], logits="last")
        first = self._sample_rows(out.logits[:, 0], seqs)  # [B]
        events = []
        for b, s in enumerate(seqs):
            n = len(s.tokens)
            self._record(s, 0, out.hidden[b, :n], s.tokens[:n], is_prompt=True)
            s.prefilled = True
            events.append(self._commit(s, [int(first[b])], 0, 0, is_prefill=True))
        return events

    def _plain(self, seqs: list[SequenceState]) -> list[StepEvent]:
        starts = [len(s.tokens) - 1 for s in seqs]
        out = self.engine.forward([s.slot for s in seqs], [[s.tokens[-1]] for s in seqs], logits="last")
        nxt = self._sample_rows(out.logits[:, 0], seqs)
        events = []
        for b, s in enumerate(seqs):
            self._record(s, starts[b], out.hidden[b, :1], [s.tokens[-1]], is_prompt=False)
            s.steps += 1
            events.append(self._commit(s, [int(nxt[b])], 0, 0))
        return events

    def _speculate(self, seqs: list[SequenceState], drafting: list[SequenceState], gamma: int) -> list[StepEvent]:
        """Draft γ tokens for `drafting` (a subset of seqs, in slot order), verify them and decode the other
        sequences' next token in one target pass."""
        drafter = self.drafter
        pend_h, pend_t = [], []
        window = self.catch_up_window
        for s in drafting:
            lo, hi = drafter.next_position(s.slot), len(s.tokens) - 1  # true entries lo..hi-1 not yet drafted on
            if window and hi - lo > window:
                lo = hi - window
                drafter.restart(s.slot, lo)
            pend_h.append(self.history[s.slot, lo:hi])  # [m, C, H]
            pend_t.append(s.tokens[lo + 1: hi + 1])
        sampling = self._draft_sampling(drafting)
        histories = [s.tokens for s in drafting] if drafter.lookup_ngram > 0 else None
        proposal = drafter.propose([s.slot for s in drafting], pend_h, pend_t, gamma, sampling, histories)
        draft_slots = {s.slot for s in drafting}
        spec_idx = [b for b, s in enumerate(seqs) if s.slot in draft_slots]  # rows of `drafting` within seqs
        plain_idx = [b for b, s in enumerate(seqs) if s.slot not in draft_slots]
        chunks = [[s.tokens[-1]] for s in seqs]
        for b, row in zip(spec_idx, proposal.tokens.tolist(), strict=True):
            chunks[b] += row
        starts = [len(s.tokens) - 1 for s in seqs]
        out = self.engine.forward([s.slot for s in seqs], chunks, logits="all")  # logits [B, gamma+1, V]
        if sampling is None:
            temp = top_p = top_k = torch.zeros(len(drafting))
            gens: list = [None] * len(drafting)
        else:
            temp, top_p, top_k, gens = sampling.temperature, sampling.top_p, sampling.top_k, sampling.generators
        logits = out.logits if not plain_idx else out.logits[spec_idx]  # [k, gamma+1, V]
        result = mixed_verify(proposal.tokens, proposal.probs, logits, temp, top_p, top_k, gens)
        accepted = [0] * len(seqs)
        new_ids: list[list[int]] = [[] for _ in seqs]
        for j, b in enumerate(spec_idx):
            accepted[b] = int(result.num_accepted[j])
            new_ids[b] = result.output_ids[j, : int(result.num_output[j])].tolist()
        if plain_idx:
            nxt = self._sample_rows(out.logits[plain_idx, 0], [seqs[b] for b in plain_idx])  # [B - k]
            for b, t in zip(plain_idx, nxt.tolist(), strict=True):
                new_ids[b] = [t]
        events = []
        for b, s in enumerate(seqs):
            k = accepted[b]
            drafted = gamma if s.slot in draft_slots else 0
            self.engine.truncate(s.slot, starts[b] + k + 1)  # keep pending + accepted drafts
            self._record(s, starts[b], out.hidden[b, : k + 1], chunks[b][: k + 1], is_prompt=False)
            s.steps += 1
            s.draft_tokens += drafted
            s.accepted_tokens += k
            events.append(self._commit(s, new_ids[b], drafted, k))
        return events

    # ---- helpers ------------------------------------------------------------------------------------------
    def _record(self, s: SequenceState, start: int, hidden: torch.Tensor, token_ids: list[int],
                is_prompt: bool) -> None:
        """Keep capture states of committed positions [start, start+n) and hand them to the signal sink."""
        n = hidden.shape[0]
        self.history[s.slot, start:start + n] = hidden.to(self.history.dtype)
        if self.signal_sink is not None:
            try:
                self.signal_sink(s.request.request_id, start, hidden, token_ids, is_prompt)
            except Exception:  # the sink must never break serving
                log.exception("signal sink failed; continuing")

    def _commit(self, s: SequenceState, new_ids: list[int], num_draft: int, num_accepted: int,
                is_prefill: bool = False) -> StepEvent:
        """Append output tokens, honouring stop tokens, max_new_tokens and the context limit."""
        req = s.request
        kept = []
        for t in new_ids:
            kept.append(t)
            if t in req.stop_token_ids:
                s.finished, s.finish_reason = True, "stop"
                break
            if len(s.output_ids) + len(kept) >= req.max_new_tokens:
                s.finished, s.finish_reason = True, "length"
                break
        s.tokens.extend(kept)
        if not s.finished and len(s.tokens) >= self.engine.info.max_seq_len:
            s.finished, s.finish_reason = True, "context"
        return StepEvent(req.request_id, tuple(kept), s.finished, s.finish_reason, num_draft, num_accepted,
                         is_prefill)

    def _sample_rows(self, logits: torch.Tensor, seqs: list[SequenceState]) -> torch.Tensor:
        """logits [B, V] -> next token [B] with each sequence's own sampling parameters."""
        if all(s.request.sampling.is_greedy for s in seqs):
            return logits.argmax(-1)
        p = [s.request.sampling for s in seqs]
        probs = logits_to_probs(logits, torch.tensor([x.temperature for x in p]),
                                torch.tensor([x.top_p for x in p]), torch.tensor([x.top_k for x in p]))
        return sample_from_probs(probs, [s.generator for s in seqs])

    def _draft_sampling(self, seqs: list[SequenceState]) -> DraftSampling | None:
        if all(s.request.sampling.is_greedy for s in seqs):
            return None
        p = [s.request.sampling for s in seqs]
        return DraftSampling(torch.tensor([x.temperature for x in p], dtype=torch.float32),
                             torch.tensor([x.top_p for x in p], dtype=torch.float32),
                             torch.tensor([x.top_k for x in p], dtype=torch.long), [s.generator for s in seqs])
