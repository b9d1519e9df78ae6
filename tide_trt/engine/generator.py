"""The engine core every front end drives (CLI, Triton scheduler, benchmarks): one flat step per call.

A step reads plan → propose → forward → verify → commit:
  plan     each running sequence is a decode row (the pending token + γᵢ drafts; the drafter says γᵢ from the step's
           `StepDrafting`, capped by the row's context room and the token budget, engine.max_num_tokens), then
           prompt chunks fill the rest of the budget (planning.py);
  propose  the drafter's drafts for the decode rows, on the engine's device (draft/drafter.py);
  forward  one target pass over the flat `StepBatch` → logits where used [M, V] + capture states [N, C, H];
  verify   `verify_flat` over the flat logits with per-row offsets (greedy and sampled rows, γᵢ = 0 and completed
           prompts alike), one device→host copy of its packed result;
  commit   roll the target KV cache back to the kept prefix, append tokens, hand the capture states of committed
           positions to the signal sink (TIDE's training data); the drafter keeps the step's states (`observe`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from tide_trt.draft.drafter import ChainDrafter, StepProposal
from tide_trt.draft.plan import StepDrafting
from tide_trt.engine.base import TargetEngine
from tide_trt.engine.planning import PREFILL_RESERVE, fit_draft_lengths, plan_prompt_chunks
from tide_trt.engine.sequence import GenerationRequest, SequenceState, StepEvent
from tide_trt.engine.step_batch import StepBatch, StepOutput, StepRow
from tide_trt.errors import RequestError, TideError
from tide_trt.spec.flat_verify import FlatLayout, verify_flat
from tide_trt.spec.sampling import SamplingBatch, make_generator

log = logging.getLogger(__name__)

__all__ = ["PREFILL_RESERVE", "GenerationRequest", "SequenceState", "SignalSink", "SpeculativeGenerator",
           "StepDrafting", "StepEvent", "plan_prompt_chunks"]

# (request_id, first position, hidden [n, C, H], token ids [n] at those positions, is_prompt)
SignalSink = Callable[[str, int, torch.Tensor, list[int], bool], None]


class SpeculativeGenerator:
    def __init__(self, engine: TargetEngine, drafter: ChainDrafter | None = None,
                 signal_sink: SignalSink | None = None):
        self.engine = engine
        self.drafter = drafter
        self.signal_sink = signal_sink
        info = engine.info
        self.max_num_tokens = engine.max_num_tokens
        if self.max_num_tokens < info.max_batch_size:
            raise TideError(f"the engine's token budget max_num_tokens={self.max_num_tokens} is below its "
                            f"max_batch_size={info.max_batch_size}: a step could not carry every running sequence")
        self.sequences: dict[str, SequenceState] = {}
        self.last_step_prompt_tokens = 0  # prompt tokens the last step prefilled (step timing excludes such steps)
        # per draft source ("head", "index"): rows drafted, draft tokens, accepted draft tokens (since start)
        self.draft_source_stats = {src: {"rows": 0, "draft_tokens": 0, "accepted_tokens": 0}
                                   for src in ("head", "index")}

    @property
    def last_step_draft_rows(self) -> tuple[int, int]:
        """Rows the last step drafted for: (by the EAGLE-3 head, by the suffix index alone — no draft cost)."""
        return self.drafter.last_step_draft_rows if self.drafter is not None else (0, 0)

    @property
    def last_step_index_slots(self) -> frozenset[int]:
        """Slots the last step drafted from the suffix index."""
        return self.drafter.index_slots if self.drafter is not None else frozenset()

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
            if self.drafter is not None:  # what the target said joins the global suffix index
                self.drafter.index_finished(seq.tokens)
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
        self.engine.move_slot(top.slot, hole)
        if self.drafter is not None:
            self.drafter.move_slot(top.slot, hole, len(top.tokens))
        top.slot = hole

    @property
    def num_active(self) -> int:
        return len(self.sequences)

    # ---- one engine step ----------------------------------------------------------------------------------
    def step(self, drafting: StepDrafting | int = 0) -> list[StepEvent]:
        """One engine step. `drafting`: how this step drafts (an int γ is StepDrafting(γ): every row drafts γ)."""
        if isinstance(drafting, int):
            drafting = StepDrafting(drafting)
        running = sorted((s for s in self.sequences.values() if s.prefilled and not s.finished),
                         key=lambda s: s.slot)
        waiting = [s for s in self.sequences.values() if not s.prefilled and not s.finished]  # arrival order
        gammas = self._plan(running, drafting, bool(waiting))
        chunks = plan_prompt_chunks(waiting, self.max_num_tokens - sum(g + 1 for g in gammas))
        self.last_step_prompt_tokens = sum(n for _, n in chunks)
        if not running and not chunks:
            return []
        completing = [s.num_computed + n == s.num_prompt for s, n in chunks]
        seqs = running + [s for s, _ in chunks]
        sampling = SamplingBatch.from_params(
            [s.request.sampling for s in seqs],
            [s.generator for s in running] + [s.generator if c else None for (s, _), c in
                                              zip(chunks, completing, strict=True)], self.engine.info.device)
        proposal = self._propose(running, gammas, sampling)
        rows = [StepRow(s.slot, len(s.tokens) - 1, (s.tokens[-1],), gamma=g)
                for s, g in zip(running, gammas, strict=True)]
        rows += [StepRow(s.slot, s.num_computed, tuple(s.tokens[s.num_computed:s.num_computed + n]), is_prompt=True,
                         num_logits=int(c)) for (s, n), c in zip(chunks, completing, strict=True)]
        batch = StepBatch.build(rows, self.engine.info.device, None if proposal is None else proposal.tokens)
        out = self.engine.forward_step(batch)  # logits [M, V], hidden [N, C, H]
        if self.drafter is not None:
            self.drafter.observe(batch, out)
        packed = self._verify(batch, out, proposal, sampling)
        return self._commit_rows(batch, out, running, chunks, packed)

    def _plan(self, running: list[SequenceState], drafting: StepDrafting, prefill_waiting: bool) -> list[int]:
        """Each running row's draft length: the drafter's (its index or lookup rows draft their own γᵢ), capped by
        the row's context room and the step's token budget."""
        if self.drafter is None or not running or not drafting.drafts:
            return [0] * len(running)
        wanted = self.drafter.plan([s.slot for s in running], [s.tokens for s in running],
                                   [s.request.request_id for s in running], drafting)
        room = [self.engine.info.max_seq_len - len(s.tokens) for s in running]
        return fit_draft_lengths(wanted, room, self.max_num_tokens, prefill_waiting)

    def _propose(self, running: list[SequenceState], gammas: list[int], sampling: SamplingBatch | None
                 ) -> StepProposal | None:
        if self.drafter is None:
            return None
        if not any(gammas):
            self.drafter.no_drafts()
            return None
        return self.drafter.propose_step([s.slot for s in running], [s.tokens for s in running], gammas,
                                         None if sampling is None else sampling.select(range(len(running))))

    def _verify(self, batch: StepBatch, out: StepOutput, proposal: StepProposal | None,
                sampling: SamplingBatch | None) -> list[int]:
        """Verify every row with logits on the flat logits; returns the packed result on the host (one copy):
        [num_accepted per row (R); output token per logit (M)]."""
        layout = FlatLayout(batch.logit_row, batch.logit_cu, batch.is_draft, batch.draft_ids(), batch.host_logit_cu)
        q = None
        if proposal is not None and proposal.probs is not None and sampling is not None:
            probs = proposal.probs  # [R', γmax, V] -> per logit [M, V] (rows past R' and non-draft logits: unread)
            width = probs.shape[1]
            offset = torch.arange(batch.logit_row.shape[0], device=probs.device) - batch.logit_cu[batch.logit_row]
            index = batch.logit_row.clamp(max=probs.shape[0] - 1) * width + offset.clamp(max=width - 1)  # [M]
            q = probs.reshape(-1, probs.shape[-1])[index]
        return verify_flat(out.logits, layout, sampling, q).tolist()

    def _commit_rows(self, batch: StepBatch, out: StepOutput, running: list[SequenceState],
                     chunks: list[tuple[SequenceState, int]], packed: list[int]) -> list[StepEvent]:
        """Roll back, append and report every row of a verified step."""
        r_rows = len(batch.rows)
        accepted, tokens = packed[:r_rows], packed[r_rows:]
        token_lo, logit_lo = batch.host_cu_seqlens, batch.host_logit_cu
        index_slots = self.last_step_index_slots
        max_seq = self.engine.info.max_seq_len
        events: list[StepEvent] = []
        for r, s in enumerate(running):
            row = batch.rows[r]
            k = accepted[r]
            new_ids = tokens[logit_lo[r]:logit_lo[r] + k + 1]
            self.engine.truncate(s.slot, row.start + k + 1)  # keep pending + accepted drafts
            if self.signal_sink is not None:
                lo = token_lo[r]
                self._signal(s, row.start, out.hidden[lo:lo + k + 1], [row.tokens[0], *new_ids[:k]], False)
            s.steps += 1
            s.draft_tokens += row.gamma
            s.accepted_tokens += k
            if row.gamma:
                tally = self.draft_source_stats["index" if s.slot in index_slots else "head"]
                tally["rows"] += 1
                tally["draft_tokens"] += row.gamma
                tally["accepted_tokens"] += k
            kept = s.append(new_ids, max_seq)
            events.append(StepEvent(s.request.request_id, kept, s.finished, s.finish_reason, row.gamma, k))
        for r, (s, n) in enumerate(chunks, start=len(running)):
            row = batch.rows[r]
            if self.signal_sink is not None:
                lo = token_lo[r]
                self._signal(s, row.start, out.hidden[lo:lo + n], list(row.tokens), True)
            s.num_computed += n
            if row.num_logits:  # the prompt completed: its first output token
                s.prefilled = True
                kept = s.append(tokens[logit_lo[r]:logit_lo[r] + 1], max_seq)
                events.append(StepEvent(s.request.request_id, kept, s.finished, s.finish_reason, 0, 0, True))
        return events

    def _signal(self, s: SequenceState, start: int, hidden: torch.Tensor, token_ids: list[int],
                is_prompt: bool) -> None:
        """Hand the capture states of committed positions [start, start+n) to the signal sink."""
        assert self.signal_sink is not None
        try:
            self.signal_sink(s.request.request_id, start, hidden, token_ids, is_prompt)
        except Exception:  # the sink must never break serving
            log.exception("signal sink failed; continuing")
