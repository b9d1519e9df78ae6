"""The engine core every front end drives (CLI, Triton scheduler, benchmarks): one flat step per call.

Each `step(gamma)` plans one `StepBatch` under the engine's token budget (`engine.max_num_tokens`):
  1. decode/verification rows first, one per running sequence: the pending token plus γᵢ drafts (γᵢ = 0 is plain
     decoding; a probe drafts on a few rows only; γᵢ is capped by the room left in the row's context);
  2. then prompt chunks: sequences still being prefilled take what is left of the budget, in arrival order, so a
     long prompt is prefilled across several steps while the others keep decoding.
One target forward runs the whole batch and returns logits where they are used plus the capture-layer states of
every new token. One verification (`mixed_verify` with per-row draft lengths) turns every row with logits into
output tokens: accepted drafts + a recovered or bonus token, or the first token of a prompt that just completed.
The commit rolls the target KV cache back to the kept prefix and hands the capture states of committed positions
to the signal sink (TIDE's training data).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from tide_trt.config import DraftConfig
from tide_trt.draft.drafter import ChainDrafter, DraftSampling
from tide_trt.engine.base import TargetEngine
from tide_trt.engine.step_batch import StepBatch, StepOutput, StepRow
from tide_trt.errors import RequestError, TideError
from tide_trt.spec.sampling import SamplingParams, make_generator
from tide_trt.spec.verify import mixed_verify

log = logging.getLogger(__name__)

# (request_id, first position, hidden [n, C, H], token ids [n] at those positions, is_prompt)
SignalSink = Callable[[str, int, torch.Tensor, list[int], bool], None]


class _Proposal(NamedTuple):
    tokens: dict[int, list[int]]  # slot -> γmax draft tokens
    probs: torch.Tensor | None  # [D, γmax, V] draft distributions in `order` (stochastic batches)
    order: list[int]  # slots of the drafting rows


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


@dataclass(frozen=True)
class StepEvent:
    request_id: str
    new_token_ids: tuple[int, ...]
    finished: bool
    finish_reason: str | None
    num_draft: int
    num_accepted: int
    is_prefill: bool = False


# a step's prompt chunks take at least this share of the token budget while prompts wait (decode rows then draft less)
PREFILL_RESERVE = 0.25


def plan_prompt_chunks(waiting: list[SequenceState], budget: int) -> list[tuple[SequenceState, int]]:
    """Split a step's prefill budget among prompts still being prefilled (arrival order): the oldest gets at least
    half of it (no prompt starves), prompts that fit entirely in what is left complete now (a short request is not
    queued behind a long one), and any remainder extends the oldest chunks. Returns (sequence, chunk length)."""
    if not waiting or budget <= 0:
        return []
    remaining = {id(s): s.num_prompt - s.num_computed for s in waiting}
    take = {id(waiting[0]): min(remaining[id(waiting[0])], max(1, budget // 2))}
    left = budget - take[id(waiting[0])]
    for s in waiting[1:]:
        if remaining[id(s)] <= left:
            take[id(s)] = remaining[id(s)]
            left -= remaining[id(s)]
    for s in waiting:
        if left <= 0:
            break
        extra = min(remaining[id(s)] - take.get(id(s), 0), left)
        if extra > 0:
            take[id(s)] = take.get(id(s), 0) + extra
            left -= extra
    return [(s, take[id(s)]) for s in waiting if take.get(id(s), 0) > 0]


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
        self.max_num_tokens = engine.max_num_tokens
        if self.max_num_tokens < info.max_batch_size:
            raise TideError(f"the engine's token budget max_num_tokens={self.max_num_tokens} is below its "
                            f"max_batch_size={info.max_batch_size}: a step could not carry every running sequence")
        self.sequences: dict[str, SequenceState] = {}
        self.last_step_prompt_tokens = 0  # prompt tokens the last step prefilled (step timing excludes such steps)
        # rows the last step drafted for: (by the EAGLE-3 head, by the suffix index alone — no draft cost)
        self.last_step_draft_rows: tuple[int, int] = (0, 0)
        self.last_step_index_slots: frozenset[int] = frozenset()  # slots the last step drafted from the index
        # per draft source ("head", "index"): rows drafted, draft tokens, accepted draft tokens (since start)
        self.draft_source_stats = {src: {"rows": 0, "draft_tokens": 0, "accepted_tokens": 0}
                                   for src in ("head", "index")}
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
    def step(self, gamma: int, drafting: Collection[str] | None = None,
             gammas: Mapping[str, int] | None = None, index_off_rows: bool = False) -> list[StepEvent]:
        """One engine step at draft length γ. `drafting`: the request ids that draft this step (None: all);
        the others decode one token in the same target pass (a controller's probe of a few requests).
        `gammas`: per-request draft lengths overriding γ for the listed requests. `index_off_rows`: rows that do
        not draft at γ (γ = 0, or outside `drafting`) still draft where the suffix index is confident — the head
        is off, the nearly free index is not (a controller's index-only steps); without it γ = 0 is plain."""
        running = sorted((s for s in self.sequences.values() if s.prefilled and not s.finished),
                         key=lambda s: s.slot)
        waiting = [s for s in self.sequences.values() if not s.prefilled and not s.finished]  # arrival order
        row_gammas, looked_up = self._row_gammas(running, gamma, drafting, gammas, prefill_waiting=bool(waiting),
                                                 index_off_rows=index_off_rows)
        chunks = plan_prompt_chunks(waiting, self.max_num_tokens - sum(g + 1 for g in row_gammas))
        self.last_step_prompt_tokens = sum(n for _, n in chunks)
        if not running and not chunks:
            return []
        proposal = self._propose(running, row_gammas, looked_up)
        rows = [StepRow(s.slot, len(s.tokens) - 1, (s.tokens[-1], *proposal.tokens.get(s.slot, [])[:g]), gamma=g)
                for s, g in zip(running, row_gammas, strict=True)]
        for s, n in chunks:
            done = s.num_computed + n == s.num_prompt
            rows.append(StepRow(s.slot, s.num_computed, tuple(s.tokens[s.num_computed:s.num_computed + n]),
                                is_prompt=True, num_logits=1 if done else 0))
        batch = StepBatch.build(rows, self.engine.info.device)
        out = self.engine.forward_step(batch)  # logits [M, V], hidden [N, C, H]
        return self._commit_step(batch, out, running, row_gammas, chunks, proposal)

    def _row_gammas(self, running: list[SequenceState], gamma: int, drafting: Collection[str] | None,
                    overrides: Mapping[str, int] | None, prefill_waiting: bool, index_off_rows: bool = False
                    ) -> tuple[list[int], dict[int, list[int] | None]]:
        """Draft length of each running row: γ (or its override) where it drafts — the suffix index's own γᵢ where
        it is confident (draft.suffix), else draft.lookup_gamma where the n-gram lookup covers the row —, capped by
        the room left in its context (verification needs γᵢ + 1 positions) and, together, by the step's token
        budget. Also returns the lookups / index drafts it computed (slot -> continuation or None), so the drafter
        does not compute them again."""
        looked_up: dict[int, list[int] | None] = {}
        if self.drafter is None or not running:
            return [0] * len(running), looked_up
        max_seq = self.engine.info.max_seq_len
        drafter = self.drafter
        lookup_gamma = drafter.lookup_gamma if drafter.lookup_ngram > 0 and drafter.suffix is None else 0
        out = []
        index_cap = 0
        if drafter.suffix is not None:
            # index rows draft up to max_draft while the step stays small (memory-bound: extra verification tokens
            # are nearly free); as the batch grows the step turns compute-bound, so a row's index draft is capped to
            # keep the step near max_draft + 1 tokens, and never below the step's γ
            index_cap = max(gamma, (drafter.suffix.config.max_draft + 1) // len(running) - 1)
        for s in running:
            rid = s.request.request_id
            g = gamma if drafting is None or rid in drafting else 0
            if overrides is not None and rid in overrides:
                g = overrides[rid]
            if (g > 0 or index_off_rows) and drafter.suffix is not None:  # a confident index row: its own γᵢ,
                # at no draft cost
                prop = drafter.index_draft(s.slot, s.tokens, index_cap)
                if prop is not None:
                    looked_up[s.slot] = list(prop.tokens)
                    g = len(prop)
            elif g > 0 and lookup_gamma > 0 and (overrides is None or rid not in overrides):
                looked_up[s.slot] = lk = self.drafter.lookup(s.tokens, lookup_gamma)
                if lk is not None:
                    g = lookup_gamma
            out.append(max(0, min(g, max_seq - len(s.tokens))))
        limit = self.max_num_tokens
        if prefill_waiting:
            limit -= int(self.max_num_tokens * PREFILL_RESERVE)
        limit = max(limit, len(running))
        while sum(out) + len(out) > limit:  # shorten the longest drafts first
            out[max(range(len(out)), key=lambda i: out[i])] -= 1
        return out, looked_up

    def _propose(self, running: list[SequenceState], row_gammas: list[int],
                 looked_up: dict[int, list[int] | None]) -> _Proposal:
        drafting = [(s, g) for s, g in zip(running, row_gammas, strict=True) if g > 0]
        drafter = self.drafter
        if drafter is None or drafter.suffix is None:
            self.last_step_draft_rows = (len(drafting), 0)
            self.last_step_index_slots = frozenset()
            return self._propose_head(drafting, looked_up)
        # hybrid: index rows take their suffix-index draft and cost the head nothing — their draft cache falls
        # behind and catches up (within the window) when the head drafts for them again; the head catches up and
        # chains only for the other drafting rows
        head_rows = [(s, g) for s, g in drafting if looked_up.get(s.slot) is None]
        index_rows = [(s, g) for s, g in drafting if looked_up.get(s.slot) is not None]
        self.last_step_draft_rows = (len(head_rows), len(index_rows))
        self.last_step_index_slots = frozenset(s.slot for s, _ in index_rows)
        head = self._propose_head(head_rows, {})
        if not index_rows:
            return head
        tokens = dict(head.tokens)
        for s, _ in index_rows:
            tokens[s.slot] = looked_up[s.slot] or []  # already cut to the row's γᵢ by _row_gammas
        order = [s.slot for s, _ in drafting]
        if all(s.request.sampling.is_greedy for s, _ in drafting):
            return _Proposal(tokens, None, order)
        gmax = max(g for _, g in drafting)
        vocab = self.engine.info.vocab_size
        probs = torch.zeros(len(order), gmax, vocab, device=self.engine.info.device)  # [D, γmax, V]
        head_pos = {slot: j for j, slot in enumerate(head.order)}
        for j, (s, _) in enumerate(drafting):
            if s.slot in head_pos:
                if head.probs is None:  # the head's rows are all greedy: their q is never read
                    continue
                hp = head.probs[head_pos[s.slot]]  # [γ_head, V]
                probs[j, : hp.shape[0]] = hp
            else:  # an index draft is deterministic: its distribution is one-hot
                ids = torch.tensor(tokens[s.slot], dtype=torch.long, device=probs.device)  # [g]
                probs[j, : len(ids)] = torch.nn.functional.one_hot(ids, vocab).to(probs.dtype)
        return _Proposal(tokens, probs, order)

    def _propose_head(self, drafting_rows: list[tuple[SequenceState, int]],
                      looked_up: dict[int, list[int] | None]) -> _Proposal:
        """The EAGLE-3 head's drafts (n-gram lookup rows filled in by the drafter) for rows with γᵢ > 0."""
        if not drafting_rows:
            return _Proposal({}, None, [])
        drafter = self.drafter
        assert drafter is not None  # rows draft only with a drafter (_row_gammas)
        drafting = [s for s, _ in drafting_rows]
        gammas = [g for _, g in drafting_rows]
        gmax = max(gammas)
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
        histories = [s.tokens for s in drafting] if drafter.lookup_ngram > 0 and drafter.suffix is None else None
        lookups = None
        if histories is not None and all(s.slot in looked_up for s in drafting):  # computed while sizing γᵢ
            lookups = [None if (lk := looked_up[s.slot]) is None else lk[:g] for s, g in zip(drafting, gammas,
                                                                                            strict=True)]
        proposal = drafter.propose([s.slot for s in drafting], pend_h, pend_t, gmax, sampling, histories, gammas,
                                   lookups=lookups)
        tokens = proposal.tokens.tolist()
        return _Proposal({s.slot: tokens[j] for j, s in enumerate(drafting)}, proposal.probs,
                         [s.slot for s in drafting])

    def _commit_step(self, batch: StepBatch, out: StepOutput, running: list[SequenceState], row_gammas: list[int],
                     chunks: list[tuple[SequenceState, int]], proposal: _Proposal) -> list[StepEvent]:
        """Verify every row that has logits (decode/verification rows, completed prompts) in one call, then commit."""
        token_lo, logit_lo = batch.host_cu_seqlens, batch.host_logit_cu
        completed = [(r, s) for r, (s, n) in enumerate(chunks, start=len(running))
                     if s.num_computed + n == s.num_prompt]
        verify_rows = list(enumerate(running)) + completed
        events: list[StepEvent] = []
        new_ids: dict[int, list[int]] = {}
        accepted: dict[int, int] = {}
        if verify_rows:
            gmax = max(row_gammas, default=0)
            gam = [batch.rows[r].gamma for r, _ in verify_rows]
            # target logits [K, gmax+1, V]: row r's logits, the last one repeated past its own γᵢ + 1
            index = torch.tensor([logit_lo[r] + min(j, batch.rows[r].logit_count - 1)
                                  for r, _ in verify_rows for j in range(gmax + 1)], dtype=torch.long,
                                 device=out.logits.device)
            target = out.logits[index].view(len(verify_rows), gmax + 1, -1)
            drafts = torch.zeros(len(verify_rows), gmax, dtype=torch.long)  # [K, gmax]
            draft_probs = None
            if proposal.probs is not None:
                draft_probs = torch.zeros(len(verify_rows), gmax, proposal.probs.shape[-1])  # [K, gmax, V]
            prow = {slot: j for j, slot in enumerate(proposal.order)}
            for k, (r, s) in enumerate(verify_rows):
                g = batch.rows[r].gamma
                if g:
                    drafts[k, :g] = torch.tensor(proposal.tokens[s.slot][:g])
                    if draft_probs is not None and proposal.probs is not None:
                        draft_probs[k, :g] = proposal.probs[prow[s.slot], :g]
            seqs = [s for _, s in verify_rows]
            params = [s.request.sampling for s in seqs]
            result = mixed_verify(drafts, draft_probs, target, torch.tensor([p.temperature for p in params]),
                                  torch.tensor([p.top_p for p in params]), torch.tensor([p.top_k for p in params]),
                                  [s.generator for s in seqs], gam)
            packed = torch.cat([result.num_output[:, None], result.output_ids], dim=1).tolist()  # one copy to host
            ids, counts = [row[1:] for row in packed], [row[0] for row in packed]
            for k, (r, _) in enumerate(verify_rows):
                new_ids[r] = ids[k][:counts[k]]
                accepted[r] = counts[k] - 1
        for r, s in enumerate(running):
            row = batch.rows[r]
            k = accepted[r]
            self.engine.truncate(s.slot, row.start + k + 1)  # keep pending + accepted drafts
            lo = token_lo[r]
            self._record(s, row.start, out.hidden[lo:lo + k + 1], list(row.tokens[:k + 1]), is_prompt=False)
            s.steps += 1
            s.draft_tokens += row.gamma
            s.accepted_tokens += k
            if row.gamma:
                tally = self.draft_source_stats["index" if s.slot in self.last_step_index_slots else "head"]
                tally["rows"] += 1
                tally["draft_tokens"] += row.gamma
                tally["accepted_tokens"] += k
            events.append(self._commit(s, new_ids[r], row.gamma, k))
        for r, (s, n) in enumerate(chunks, start=len(running)):
            row = batch.rows[r]
            lo = token_lo[r]
            self._record(s, row.start, out.hidden[lo:lo + n], list(row.tokens), is_prompt=True)
            s.num_computed += n
            if r in new_ids:
                s.prefilled = True
                events.append(self._commit(s, new_ids[r], 0, 0, is_prefill=True))
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
            if len(s.tokens) + len(kept) >= self.engine.info.max_seq_len:  # a bonus token past the context: dropped
                s.finished, s.finish_reason = True, "context"
                break
        s.tokens.extend(kept)
        return StepEvent(req.request_id, tuple(kept), s.finished, s.finish_reason, num_draft, num_accepted,
                         is_prefill)

    def _draft_sampling(self, seqs: list[SequenceState]) -> DraftSampling | None:
        if all(s.request.sampling.is_greedy for s in seqs):
            return None
        p = [s.request.sampling for s in seqs]
        return DraftSampling(torch.tensor([x.temperature for x in p], dtype=torch.float32),
                             torch.tensor([x.top_p for x in p], dtype=torch.float32),
                             torch.tensor([x.top_k for x in p], dtype=torch.long), [s.generator for s in seqs])
