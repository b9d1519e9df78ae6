"""Chain drafter: runs the EAGLE-3 head over its own KV cache to propose γ tokens per sequence.

The drafter owns everything drafting needs across steps: the capture states of every cached target position
(`history`, written from each step's flat output by `observe(batch, out)`), the draft cache's catch-up window and
restart, the n-gram lookups and the suffix index. A step asks it twice: `plan` (each row's draft length: an index
or lookup row drafts its own γᵢ) and `propose_step` (the drafts, [R, γmax] on the engine's device, and their
distributions on sampled steps).

Per sequence the drafter keeps `cached` = number of true entries in its KV cache and `origin` = the target
position of entry 0 (0 unless a bounded catch-up restarted the sequence's frame on its last positions: RoPE
is relative, so the draft then attends to those positions exactly as if they were all it had seen). A proposal
first catches up on the pending true entries (target capture states of positions cached..P with their next tokens), then
chains γ-1 single-token steps feeding its own output hidden back. Chained entries are never committed: the
next proposal overwrites them (rollback is a length, as in the target cache).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tide_trt.config import DraftConfig
from tide_trt.draft.eagle3 import Eagle3Head
from tide_trt.draft.lookup import lookup_continuation
from tide_trt.draft.plan import StepDrafting
from tide_trt.draft.suffix import SuffixDrafter, SuffixProposal
from tide_trt.engine.base import ModelInfo
from tide_trt.engine.cuda_graphs import GraphCache
from tide_trt.engine.kv_cache import KVCache
from tide_trt.engine.step_batch import StepBatch, StepOutput
from tide_trt.kernels.linear import to_native_linears
from tide_trt.spec.sampling import SamplingBatch, logits_to_probs, sample_from_probs


@dataclass
class DraftProposal:
    tokens: torch.Tensor  # [B, gamma] int64 target-vocabulary ids
    probs: torch.Tensor | None  # [B, gamma, V] float32 over the target vocabulary (stochastic batches only)
    from_lookup: list[bool] | None = None  # [B] the row's drafts came from the n-gram lookup, not the head


DraftSampling = SamplingBatch  # per-row sampling parameters of the rows drafted (None for an all-greedy batch)


@dataclass
class StepProposal:
    """A step's drafts for its decode rows, on the engine's device."""

    tokens: torch.Tensor  # [R, γmax] int64 target ids; row r valid up to its γᵢ (zeros after)
    probs: torch.Tensor | None  # [R, γmax, V] float32 draft distributions (sampled steps), None: all one-hot


class ChainDrafter:
    def __init__(self, head: Eagle3Head, max_slots: int, max_seq_len: int, dtype: torch.dtype, device: str,
                 version: int = 0, native_linears: bool = False, lookup_ngram: int = 0, lookup_gamma: int = 0,
                 suffix: SuffixDrafter | None = None, catch_up_window: int = DraftConfig.catch_up_window,
                 history_dtype: torch.dtype | None = None):
        # continuations of what the target has said (this request, then earlier ones): rows it is confident on
        # draft from it at no draft cost; kept across refits (draft/suffix.py)
        self.suffix = suffix
        self.lookup_ngram = lookup_ngram  # > 0: n-gram lookup proposals where the history repeats (draft/lookup.py)
        self.lookup_gamma = lookup_gamma  # > 0: draft length of rows the lookup covers (per-row γ)
        self.dtype = dtype  # activations (float32 with native linears, whose weights stay bfloat16)
        self.native_linears = native_linears
        self.device = device
        self.max_seq_len = max_seq_len
        c = head.cfg
        # one extra slot: padding rows of fixed-shape chains (CUDA graphs) write there
        self.cache = KVCache(1, max_slots + 1, c.num_kv_heads, max_seq_len + 16, c.head_dim, dtype, device)
        self.scratch_slot = max_slots
        self.chain_graphs = GraphCache(self._greedy_chain, device, enabled=False, name="draft chain")
        self.cached = [0] * max_slots
        self.origin = [0] * max_slots
        self.head = self._serving_copy(head)
        self.version = version
        # the draft catches up on at most this many positions (0: all): after speculation was off, or on a new
        # prompt, it restarts on the last ones instead of a draft prefill over the whole context
        self.catch_up_window = max(int(catch_up_window), 0)
        self.max_slots = max_slots
        self.history_dtype = history_dtype or dtype
        # capture-layer states of every cached target position, per slot [S, L, C, H] (allocated by the first
        # `observe`, which knows C and H): catch-up and refit re-feed read them
        self.history: torch.Tensor | None = None
        self._planned: dict[int, list[int] | None] = {}  # slot -> this step's index / lookup draft (plan)
        self.index_slots: frozenset[int] = frozenset()  # slots the last proposal took from the suffix index
        self.last_step_draft_rows: tuple[int, int] = (0, 0)  # (head rows, index rows) of the last proposal

    @classmethod
    def for_engine(cls, head: Eagle3Head, info: ModelInfo, version: int = 0, lookup_ngram: int = 0,
                   lookup_gamma: int = 0, cuda_graphs: bool = False, suffix: SuffixDrafter | None = None,
                   catch_up_window: int = DraftConfig.catch_up_window) -> ChainDrafter:
        """A drafter sized and typed for the engine described by `info` (slots, context, activation dtype,
        native linears); `cuda_graphs`: greedy chains replay CUDA graphs (CUDA only)."""
        drafter = cls(head, info.max_batch_size, info.max_seq_len, info.activation_dtype, info.device,
                      version=version, native_linears=info.native_linears, lookup_ngram=lookup_ngram,
                      lookup_gamma=lookup_gamma, suffix=suffix, catch_up_window=catch_up_window,
                      history_dtype=torch.float32 if info.dtype == "float32" else torch.bfloat16)
        drafter.use_cuda_graphs(cuda_graphs)
        return drafter

    def use_cuda_graphs(self, enabled: bool) -> None:
        """Greedy chains at fixed shapes (rows padded to a power-of-two bucket), replayed from CUDA graphs."""
        self.chain_graphs = GraphCache(self._greedy_chain, self.device, enabled=enabled, name="draft chain")
        self.static_chain = self.chain_graphs.enabled

    static_chain = False  # greedy chains through `fixed_shape_chain` (set by use_cuda_graphs)

    def _greedy_chain(self, slots: torch.Tensor, hidden: torch.Tensor, logits: torch.Tensor,
                      positions: torch.Tensor, steps_marker: torch.Tensor) -> torch.Tensor:
        return self.head.greedy_chain(self.cache, slots, hidden, logits, positions, steps_marker.shape[0])

    def fixed_shape_chain(self, slots: list[int], hidden: torch.Tensor, logits: torch.Tensor, positions: torch.Tensor,
                          steps: int) -> torch.Tensor:
        """The greedy chain with rows padded to a power-of-two bucket (padding rows: the scratch slot), replayed
        from a CUDA graph per (bucket, steps) when graphs are on. Returns target ids [B, steps]."""
        b = len(slots)
        bucket = 1 << (b - 1).bit_length()
        pad = bucket - b
        dev = self.device
        slot_t = torch.tensor(slots + [self.scratch_slot] * pad, dtype=torch.long, device=dev)  # [bucket]
        hidden = torch.nn.functional.pad(hidden, (0, 0, 0, pad))  # [bucket, H]
        logits = torch.nn.functional.pad(logits, (0, 0, 0, pad))  # [bucket, Vd]
        positions = torch.nn.functional.pad(positions, (0, pad))  # [bucket]
        marker = torch.empty(steps, device=dev)  # its length carries `steps` into the captured call
        out = self.chain_graphs.run((bucket, steps), slot_t, hidden, logits, positions, marker)
        return out[:b]

    def lookup(self, history: list[int], gamma: int) -> list[int] | None:
        """The n-gram lookup's γ-token proposal for this history, or None where it does not cover it."""
        if self.lookup_ngram <= 0:
            return None
        return lookup_continuation(np.asarray(history), self.lookup_ngram, gamma)

    def index_draft(self, slot: int, tokens: list[int], max_len: int) -> SuffixProposal | None:
        """The suffix index's draft for this row (at most `max_len` tokens) when it is confident enough to skip the
        head (its first token's confidence >= draft.suffix.prefer_confidence); None: the head drafts this row."""
        if self.suffix is None:
            return None
        cfg = self.suffix.config
        prop = self.suffix.propose(slot, tokens, min(max_len, cfg.max_draft))
        if prop is None or prop.confidence[0] < cfg.prefer_confidence:
            return None
        return prop

    def index_finished(self, tokens: list[int]) -> None:
        """A finished request's prompt + output joins the global suffix index."""
        if self.suffix is not None:
            self.suffix.add_finished(tokens)

    def _serving_copy(self, head: Eagle3Head) -> Eagle3Head:
        embed = head.embed
        head.embed = None
        served = copy.deepcopy(head)
        head.embed = embed
        served.embed = embed
        served.to(device=self.device, dtype=self.dtype)
        if self.native_linears:
            to_native_linears(served)
        served.d2t = served.d2t.long()
        served.requires_grad_(False).eval()
        return served

    @property
    def cfg(self):
        return self.head.cfg

    def swap(self, head: Eagle3Head, version: int) -> None:
        """Refit: install new weights. The KV cache of in-flight sequences is stale, so every slot is reset
        (callers re-feed the sequence's stored capture states)."""
        self.head = self._serving_copy(head)
        self.version = version
        self.cached = [0] * len(self.cached)
        self.origin = [0] * len(self.origin)

    def reset_slot(self, slot: int) -> None:
        self.cached[slot] = 0
        self.origin[slot] = 0
        if self.suffix is not None:
            self.suffix.reset_slot(slot)

    def next_position(self, slot: int) -> int:
        """Target position of the first true entry not yet in this slot's draft cache."""
        return self.origin[slot] + self.cached[slot]

    def restart(self, slot: int, position: int) -> None:
        """Drop the slot's draft cache; its next catch-up starts at target `position` (a bounded catch-up)."""
        self.origin[slot] = position
        self.cached[slot] = 0

    def move_slot(self, src: int, dst: int, length: int | None = None) -> None:
        """Move a live sequence's draft state to a free slot; `length`: its cached target positions (history)."""
        if self.history is not None:
            n = self.history.shape[1] if length is None else length
            self.history[dst, :n] = self.history[src, :n]
        self.cache.move(src, dst, self.cached[src])
        self.cached[dst], self.cached[src] = self.cached[src], 0
        self.origin[dst], self.origin[src] = self.origin[src], 0
        if self.suffix is not None:
            self.suffix.move_slot(src, dst)

    # ---- the step loop's side: plan, propose, observe -----------------------------------------------------
    def observe(self, batch: StepBatch, out: StepOutput) -> None:
        """Keep the capture states of every token the step computed (one device write). Rejected drafts' states
        are overwritten by the step that commits their positions, before anything reads them."""
        if self.history is None:
            c, h = out.hidden.shape[1:]
            self.history = torch.zeros(self.max_slots, self.max_seq_len, c, h, dtype=self.history_dtype,
                                       device=out.hidden.device)  # [S, L, C, H]
        s, length, c, h = self.history.shape
        self.history.view(s * length, c, h).index_copy_(0, batch.token_slots * length + batch.positions,
                                                        out.hidden.to(self.history_dtype))

    def plan(self, slots: Sequence[int], tokens: Sequence[list[int]], request_ids: Sequence[str],
             drafting: StepDrafting) -> list[int]:
        """Each row's wanted draft length: the head's γ (`drafting`), or the suffix index's own γᵢ where it is
        confident (consulted where the head drafts, and on the other rows too with `drafting.index_off_rows`), or
        draft.lookup_gamma where the n-gram lookup covers the row. The drafts found are kept for `propose_step`."""
        self._planned = {}
        suffix = self.suffix
        lookup_gamma = self.lookup_gamma if self.lookup_ngram > 0 and suffix is None else 0
        index_cap = 0
        if suffix is not None and slots:
            # index rows draft up to max_draft while the step stays small (memory-bound: extra verification tokens
            # are nearly free); as the batch grows the step turns compute-bound, so a row's index draft is capped
            # to keep the step near max_draft + 1 tokens, and never below the step's γ
            index_cap = max(drafting.gamma, (suffix.config.max_draft + 1) // len(slots) - 1)
        out = []
        for slot, toks, rid in zip(slots, tokens, request_ids, strict=True):
            g = drafting.head_gamma(rid)
            if suffix is not None and (g > 0 or drafting.index_off_rows):  # a confident index row: own γᵢ, no head
                prop = self.index_draft(slot, toks, index_cap)
                if prop is not None:
                    self._planned[slot] = list(prop.tokens)
                    g = len(prop)
            elif g > 0 and lookup_gamma > 0 and not drafting.overridden(rid):
                self._planned[slot] = lk = self.lookup(toks, lookup_gamma)
                if lk is not None:
                    g = lookup_gamma
            out.append(g)
        return out

    def no_drafts(self) -> None:
        """A step in which no row drafts: nothing was drafted from the index or by the head."""
        self.index_slots = frozenset()
        self.last_step_draft_rows = (0, 0)

    def propose_step(self, slots: Sequence[int], tokens: Sequence[list[int]], gammas: Sequence[int],
                     sampling: SamplingBatch | None) -> StepProposal:
        """The drafts of a step's decode rows (γᵢ = 0: none) after `plan`: index rows take their index draft, the
        head catches up (within the window) and chains for the others. sampling: per row (None: all greedy)."""
        rows = range(len(slots))
        index_rows = [r for r in rows if gammas[r] > 0 and self._planned.get(slots[r]) is not None
                      and self.suffix is not None]
        taken = set(index_rows)
        head_rows = [r for r in rows if gammas[r] > 0 and r not in taken]
        self.index_slots = frozenset(slots[r] for r in index_rows)
        self.last_step_draft_rows = (len(head_rows), len(index_rows))
        gmax = max(gammas, default=0)
        dev = self.device
        out = torch.zeros(len(slots), gmax, dtype=torch.long, device=dev)  # [R, γmax]
        head_sampling = sampling.select(head_rows) if sampling is not None and head_rows else None
        drafting_sampled = sampling is not None and any(sampling.generators[r] is not None
                                                        for r in (*head_rows, *index_rows))
        probs = (torch.zeros(len(slots), gmax, self.head.cfg.target_vocab_size, device=dev)
                 if drafting_sampled else None)  # [R, γmax, V]
        if head_rows:
            head = self._propose_head([slots[r] for r in head_rows], [tokens[r] for r in head_rows],
                                      [gammas[r] for r in head_rows], head_sampling)
            width = head.tokens.shape[1]
            if len(head_rows) == len(slots):  # every row drafts with the head (the common case)
                out[:, :width] = head.tokens
                if probs is not None and head.probs is not None:
                    probs[:, :width] = head.probs
            else:
                index = torch.tensor(head_rows, dtype=torch.long, device=dev)  # [B]
                out[:, :width].index_copy_(0, index, head.tokens)
                if probs is not None and head.probs is not None:
                    probs[:, :width].index_copy_(0, index, head.probs)
        for r in index_rows:
            draft = (self._planned[slots[r]] or [])[: gammas[r]]
            ids = torch.tensor(draft, dtype=torch.long, device=dev)  # [g]
            out[r, : len(draft)] = ids
            if probs is not None:  # an index draft is deterministic: its distribution is one-hot
                probs[r, : len(draft)] = torch.nn.functional.one_hot(ids, probs.shape[-1]).to(probs.dtype)
        return StepProposal(out, probs)

    def _propose_head(self, slots: list[int], tokens: list[list[int]], gammas: list[int],
                      sampling: SamplingBatch | None) -> DraftProposal:
        """Catch up on each row's true entries not yet cached (at most catch_up_window: else the slot's frame
        restarts on the last ones), then chain; n-gram lookup rows take their lookup."""
        assert self.history is not None  # a row drafts only after its prompt was observed
        pend_h, pend_t = [], []
        window = self.catch_up_window
        for slot, toks in zip(slots, tokens, strict=True):
            lo, hi = self.next_position(slot), len(toks) - 1  # true entries lo..hi-1 not yet drafted on
            if window and hi - lo > window:
                lo = hi - window
                self.restart(slot, lo)
            pend_h.append(self.history[slot, lo:hi])  # [m, C, H]
            pend_t.append(toks[lo + 1: hi + 1])
        lookups = None
        if self.lookup_ngram > 0 and self.suffix is None:
            lookups = [(lk[:g] if (lk := self._planned[s]) is not None else None) if s in self._planned
                       else self.lookup(t, g) for s, t, g in zip(slots, tokens, gammas, strict=True)]
        return self.propose(slots, pend_h, pend_t, max(gammas), sampling, None, list(gammas), lookups=lookups)

    @torch.inference_mode()
    def propose(self, slots: list[int], pending_hidden: list[torch.Tensor], pending_tokens: list[list[int]],
                gamma: int, sampling: DraftSampling | None, histories: list[list[int]] | None = None,
                gammas: list[int] | None = None, lookups: list[list[int] | None] | None = None) -> DraftProposal:
        """pending_hidden[b] [m_b, C, H] / pending_tokens[b] (m_b ids): the true entries not yet cached.
        histories[b]: the row's whole token sequence, for n-gram lookup proposals (when `lookup_ngram` > 0); the
        head always catches up, so its cache stays current whichever proposal a row takes.
        gammas[b]: the row's draft length (None: γ for all); the result is [B, γ] with row b valid up to gammas[b].
        lookups: the rows' lookup proposals when the caller already computed them (`lookup`), else computed here."""
        row_gamma = gammas if gammas is not None else [gamma] * len(slots)
        if lookups is None:
            lookups = [None] * len(slots)
            if histories is not None:
                lookups = [self.lookup(h, g) for h, g in zip(histories, row_gamma, strict=True)]
        head = self.head
        dev = self.device
        bsz = len(slots)
        counts = [len(t) for t in pending_tokens]
        slot_t = torch.tensor(slots, dtype=torch.long, device=dev)
        # position of each row's first chained entry: its cached length + its pending entries
        pos = torch.tensor([self.cached[s] + n for s, n in zip(slots, counts, strict=True)], dtype=torch.long,
                           device=dev)  # [B]
        if max(self.cached[s] for s in slots) + max(counts) <= self.cache.max_seq_len:
            hidden, logits = self._catch_up(slots, pending_hidden, pending_tokens)
        else:  # padding a long catch-up (a joiner's prompt) onto every row would overflow the cache: go row by row
            rows = [self._catch_up([s], [h], [t]) for s, h, t in zip(slots, pending_hidden, pending_tokens,
                                                                       strict=True)]
            hidden = torch.cat([r[0] for r in rows])
            logits = torch.cat([r[1] for r in rows])
        for s, n in zip(slots, counts, strict=True):
            self.cached[s] += n
        # the head's chain runs as long as the longest row it drafts for (rows the lookup covers need none)
        chain_steps = max((g for g, lk in zip(row_gamma, lookups, strict=True) if lk is None), default=0)
        tokens = torch.zeros(bsz, gamma, dtype=torch.long, device=dev)  # [B, gamma]
        probs = None if sampling is None else torch.zeros(bsz, gamma, self.head.cfg.target_vocab_size,
                                                          device=dev)  # [B, gamma, V]
        zero = torch.zeros(bsz, dtype=torch.long, device=dev)
        if self.static_chain and sampling is None and chain_steps > 0:
            tokens[:, :chain_steps] = self.fixed_shape_chain(slots, hidden, logits, pos, chain_steps)
            chain_steps = 0  # done
        for j in range(chain_steps):
            draft_ids, step_probs = self._pick(logits, sampling)  # [B] target ids, [B, V] or None
            tokens[:, j] = draft_ids
            if probs is not None and step_probs is not None:
                probs[:, j] = step_probs
            if j == chain_steps - 1:
                break
            hidden, logits = head.step(self.cache, slot_t, hidden[:, None], draft_ids[:, None], pos, zero)
            pos = pos + 1
        from_lookup = [lk is not None for lk in lookups]
        for b, lk in enumerate(lookups):
            if lk is None:
                continue
            looked = torch.tensor(lk, dtype=torch.long, device=dev)  # [g_b]
            tokens[b] = 0
            tokens[b, : len(lk)] = looked
            if probs is not None:  # a lookup draft is deterministic: its distribution is one-hot
                probs[b] = 0
                probs[b, : len(lk)] = torch.nn.functional.one_hot(looked, probs.shape[-1]).to(probs.dtype)
        return DraftProposal(tokens, probs, from_lookup)

    def _catch_up(self, slots: list[int], pending_hidden: list[torch.Tensor], pending_tokens: list[list[int]]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed the true entries not yet cached (ragged, padded); returns draft hidden [B, H] and logits [B, Vd]
        at each row's last entry. Does not advance `cached`."""
        dev = self.device
        counts = [len(t) for t in pending_tokens]
        width = max(counts)
        feats = torch.nn.utils.rnn.pad_sequence([h.to(device=dev) for h in pending_hidden],
                                                batch_first=True).to(self.dtype)  # [B, W, C, H]
        # one host tensor for every row's ids, slot, start and last entry, one copy to the device
        meta = torch.tensor([t + [0] * (width - len(t)) + [s, self.cached[s], len(t) - 1]
                             for s, t in zip(slots, pending_tokens, strict=True)], dtype=torch.long).to(dev)
        toks, slot_t, starts, last = meta[:, :width], meta[:, width], meta[:, width + 1], meta[:, width + 2]
        return self.head.step(self.cache, slot_t, self.head.fuse(feats), toks, starts, last)

    def _pick(self, logits: torch.Tensor, sampling: DraftSampling | None):
        """logits [B, Vd] -> (target ids [B], probs over target vocab [B, V] or None)."""
        d2t = self.head.d2t
        if sampling is None:
            return d2t[logits.argmax(-1)], None
        probs_d = logits_to_probs(logits, sampling.temperature, sampling.top_p, sampling.top_k)  # [B, Vd]
        ids_d = sample_from_probs(probs_d, sampling.generators)  # [B]
        full = torch.zeros(logits.shape[0], self.head.cfg.target_vocab_size, dtype=torch.float32,
                           device=logits.device)  # [B, V]
        full[:, d2t] = probs_d
        return d2t[ids_d], full
