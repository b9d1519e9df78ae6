"""Chain drafter: runs the EAGLE-3 head over its own KV cache to propose γ tokens per sequence.

Per sequence the drafter keeps `cached` = number of true entries in its KV cache and `origin` = the target
position of entry 0 (0 unless a bounded catch-up restarted the sequence's frame on its last positions: RoPE
is relative, so the draft then attends to those positions exactly as if they were all it had seen). A proposal
first catches up on the pending true entries (target capture states of positions cached..P with their next tokens), then
chains γ-1 single-token steps feeding its own output hidden back. Chained entries are never committed: the
next proposal overwrites them (rollback is a length, as in the target cache).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from tide_trt.draft.eagle3 import Eagle3Head
from tide_trt.draft.lookup import lookup_continuation
from tide_trt.draft.suffix import SuffixDrafter, SuffixProposal
from tide_trt.engine.base import ModelInfo
from tide_trt.engine.cuda_graphs import GraphCache
from tide_trt.engine.kv_cache import KVCache
from tide_trt.kernels.linear import to_native_linears
from tide_trt.spec.sampling import logits_to_probs, sample_from_probs


@dataclass
class DraftProposal:
    tokens: torch.Tensor  # [B, gamma] int64 target-vocabulary ids
    probs: torch.Tensor | None  # [B, gamma, V] float32 over the target vocabulary (stochastic batches only)
    from_lookup: list[bool] | None = None  # [B] the row's drafts came from the n-gram lookup, not the head


@dataclass
class DraftSampling:
    """Per-row sampling parameters for a stochastic batch (None for an all-greedy batch)."""

    temperature: torch.Tensor  # [B]
    top_p: torch.Tensor  # [B]
    top_k: torch.Tensor  # [B]
    generators: list[torch.Generator | None]


class ChainDrafter:
    def __init__(self, head: Eagle3Head, max_slots: int, max_seq_len: int, dtype: torch.dtype, device: str,
                 version: int = 0, native_linears: bool = False, lookup_ngram: int = 0, lookup_gamma: int = 0,
                 suffix: SuffixDrafter | None = None):
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

    @classmethod
    def for_engine(cls, head: Eagle3Head, info: ModelInfo, version: int = 0, lookup_ngram: int = 0,
                   lookup_gamma: int = 0, cuda_graphs: bool = False, suffix: SuffixDrafter | None = None
                   ) -> ChainDrafter:
        """A drafter sized and typed for the engine described by `info` (slots, context, activation dtype,
        native linears); `cuda_graphs`: greedy chains replay CUDA graphs (CUDA only)."""
        drafter = cls(head, info.max_batch_size, info.max_seq_len, info.activation_dtype, info.device,
                      version=version, native_linears=info.native_linears, lookup_ngram=lookup_ngram,
                      lookup_gamma=lookup_gamma, suffix=suffix)
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

    def move_slot(self, src: int, dst: int) -> None:
        self.cache.move(src, dst, self.cached[src])
        self.cached[dst], self.cached[src] = self.cached[src], 0
        self.origin[dst], self.origin[src] = self.origin[src], 0
        if self.suffix is not None:
            self.suffix.move_slot(src, dst)

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
        c_h = pending_hidden[0].shape[-2:]
        feats = torch.zeros((len(slots), width, *c_h), dtype=self.dtype, device=dev)  # [B, W, C, H]
        toks = torch.zeros((len(slots), width), dtype=torch.long, device=dev)  # [B, W]
        for b, (h, t) in enumerate(zip(pending_hidden, pending_tokens, strict=True)):
            feats[b, : len(t)] = h.to(device=dev, dtype=self.dtype)
            toks[b, : len(t)] = torch.tensor(t, dtype=torch.long)
        slot_t = torch.tensor(slots, dtype=torch.long, device=dev)
        starts = torch.tensor([self.cached[s] for s in slots], dtype=torch.long, device=dev)  # [B]
        last = torch.tensor([n - 1 for n in counts], dtype=torch.long, device=dev)  # [B]
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
