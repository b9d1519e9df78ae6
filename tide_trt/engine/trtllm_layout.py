"""Pure bookkeeping for the TensorRT-LLM backend: slots, packed (remove-padding) batches, output unpacking.

Nothing here imports TensorRT or TensorRT-LLM; every function works on CPU torch tensors and is unit-tested.
`trtllm_engine.py` turns a `PackedBatch` into the engine's named input tensors and back.

Conventions (taken from TensorRT-LLM's C++ batch manager, `RuntimeBuffers::setFromInputs`):
- one step = one packed token stream `input_ids [num_tokens]`; context requests come first, generation
  requests after them (the GPT attention plugin requires this order);
- a *context* request appends n >= 1 tokens at past length p (a prompt, or a prompt chunk / verification
  block over an existing cache — needs `use_paged_context_fmha`): context_lengths = n,
  sequence_length = p + n, host_past_key_value_lengths = p + n;
- a *generation* request appends exactly one token at p >= 1: sequence_length = p + 1,
  host_past_key_value_lengths = p, context_lengths = the request's prompt length;
- position ids are p, p+1, ... (Llama RoPE positions are absolute token indices);
- last_token_ids is the inclusive prefix sum of the tokens per request (1-based index of each last token).

The KV cache is paged but statically partitioned: slot s owns blocks [s*M, (s+1)*M) with
M = ceil(max_seq_len / tokens_per_block), like the torch engine's preallocated cache. Rollback of rejected
drafts is therefore a length change only (stale entries past the length are overwritten by the next write).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tide_trt.engine.slots import SlotTable
from tide_trt.errors import TideError

CONTEXT = 0  # TensorRT-LLM RequestType kCONTEXT
GENERATION = 1  # TensorRT-LLM RequestType kGENERATION


class PagedSlotTable(SlotTable):
    """`SlotTable` over a statically partitioned paged KV cache: slot s owns blocks [s*M, (s+1)*M); also tracks
    each slot's prompt length (the tokens of its first step), which TensorRT-LLM's generation requests need."""

    def __init__(self, max_slots: int, max_seq_len: int, tokens_per_block: int):
        if max_slots < 1 or max_seq_len < 1 or tokens_per_block < 1:
            raise TideError("max_slots, max_seq_len and tokens_per_block must all be >= 1")
        super().__init__(max_slots)
        self.max_seq_len = max_seq_len
        self.tokens_per_block = tokens_per_block
        self.blocks_per_slot = -(-max_seq_len // tokens_per_block)  # ceil
        self._prompt = [0] * max_slots  # tokens appended by the slot's first call (its prompt)

    @property
    def num_blocks(self) -> int:
        return self.max_slots * self.blocks_per_slot

    def allocate(self) -> int:
        slot = super().allocate()
        self._prompt[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        super().free(slot)
        self._prompt[slot] = 0

    def prompt_len(self, slot: int) -> int:
        self._check(slot)
        return self._prompt[slot]

    def truncate(self, slot: int, length: int) -> None:
        """Roll back to `length` cached tokens: no copy, no block is released (the partition is static)."""
        super().truncate(slot, length)
        self._prompt[slot] = min(self._prompt[slot], length)

    def advance(self, slot: int, count: int) -> None:
        if self.seq_len(slot) == 0:
            self._prompt[slot] = count
        super().advance(slot, count)

    def move(self, src: int, dst: int) -> int:
        prompt = self._prompt[src]
        length = super().move(src, dst)
        self._prompt[dst] = prompt
        return length

    def block_ids(self, slot: int) -> list[int]:
        """The pool blocks that hold slot's tokens, in token order."""
        first = slot * self.blocks_per_slot
        return list(range(first, first + self.blocks_per_slot))


@dataclass(frozen=True)
class PackedBatch:
    """One engine step in TensorRT-LLM's packed layout. B = number of requests, N = total new tokens."""

    order: tuple[int, ...]  # [B] caller row of each packed request (context requests first)
    slots: tuple[int, ...]  # [B] slot of each packed request
    counts: tuple[int, ...]  # [B] new tokens per packed request
    input_ids: torch.Tensor  # [N] int32
    position_ids: torch.Tensor  # [N] int32
    request_types: torch.Tensor  # [B] int32 (CONTEXT / GENERATION)
    context_lengths: torch.Tensor  # [B] int32
    sequence_lengths: torch.Tensor  # [B] int32
    past_kv_lengths: torch.Tensor  # [B] int32 (host_past_key_value_lengths)
    last_token_ids: torch.Tensor  # [B] int32, inclusive prefix sum of counts
    num_context: int

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def batch_size(self) -> int:
        return len(self.order)

    @property
    def max_count(self) -> int:
        return max(self.counts)

    def token_offsets(self) -> list[int]:
        """Start of each packed request in the N dimension, plus N at the end."""
        out = [0]
        for n in self.counts:
            out.append(out[-1] + n)
        return out


class TokenBudgetError(TideError):
    """A step carries more tokens than the engine's max_num_tokens (nothing was sent to the engine)."""


def check_token_budget(counts: list[int], max_num_tokens: int) -> None:
    """Refuse a step whose token count exceeds the engine's budget, before any engine input is built.

    TensorRT-LLM engines are built for at most `max_num_tokens` packed tokens per step (the upper bound of the
    `input_ids` optimization profile); a larger step would fail deep inside `set_input_shape`.
    """
    total = sum(counts)
    if total > max_num_tokens:
        raise TokenBudgetError(
            f"step has {total} tokens ({len(counts)} rows, longest {max(counts)}), more than the engine's "
            f"max_num_tokens={max_num_tokens}: the step loop must chunk prompts under engine.max_num_tokens"
        )


def pack_batch(
    slots: list[int], tokens: list[list[int]], table: PagedSlotTable, max_num_tokens: int | None = None
) -> PackedBatch:
    """Pack one forward call (tokens[i] appended to slots[i]) into TensorRT-LLM's remove-padding layout.

    A request is a generation request iff it appends exactly one token to a non-empty cache; everything else
    (prompts, prompt chunks, multi-token verification blocks) runs as a context request over its cached prefix.
    max_num_tokens: the engine's token budget; a larger step raises TokenBudgetError before anything is packed.
    """
    if not slots or len(slots) != len(tokens):
        raise ValueError("forward needs one non-empty token list per slot")
    if max_num_tokens is not None:
        check_token_budget([len(t) for t in tokens], max_num_tokens)
    if len(set(slots)) != len(slots):
        raise ValueError(f"a slot appears twice in one step: {slots}")
    pasts = []
    for s, t in zip(slots, tokens, strict=True):
        if not t:
            raise ValueError("forward needs one non-empty token list per slot")
        past = table.seq_len(s)
        if past + len(t) > table.max_seq_len:
            raise TideError(f"sequence in slot {s} would exceed max_seq_len={table.max_seq_len}")
        pasts.append(past)
    is_gen = [len(t) == 1 and p > 0 for t, p in zip(tokens, pasts, strict=True)]
    order = [i for i in range(len(slots)) if not is_gen[i]] + [i for i in range(len(slots)) if is_gen[i]]
    ids: list[int] = []
    pos: list[int] = []
    types, ctx_len, seq_len, past_len, counts = [], [], [], [], []
    for i in order:
        t, p, n = tokens[i], pasts[i], len(tokens[i])
        ids.extend(t)
        pos.extend(range(p, p + n))
        counts.append(n)
        seq_len.append(p + n)
        if is_gen[i]:
            types.append(GENERATION)
            ctx_len.append(max(1, min(table.prompt_len(slots[i]), p)))
            past_len.append(p)
        else:
            types.append(CONTEXT)
            ctx_len.append(n)
            past_len.append(p + n)

    def i32(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32)

    return PackedBatch(
        order=tuple(order),
        slots=tuple(slots[i] for i in order),
        counts=tuple(counts),
        input_ids=i32(ids),
        position_ids=i32(pos),
        request_types=i32(types),
        context_lengths=i32(ctx_len),
        sequence_lengths=i32(seq_len),
        past_kv_lengths=i32(past_len),
        last_token_ids=torch.cumsum(i32(counts), 0).to(torch.int32),
        num_context=sum(1 for x in types if x == CONTEXT),
    )


def kv_block_offsets(
    batch: PackedBatch, table: PagedSlotTable, num_layers: int, kv_factor: int = 2
) -> torch.Tensor:
    """kv_cache_block_offsets [1, B, kv_factor, M] int32 for one pool.

    TensorRT-LLM's KVCacheIndex of (block b, K/V field f) in a pool whose block holds all layers is
    (b * num_layers + 0) * kv_factor + f (`WindowBlockManager::setOffsets`, layer-within-block layout).
    """
    rows = []
    for s in batch.slots:
        blocks = torch.tensor(table.block_ids(s), dtype=torch.int64)  # [M]
        base = blocks * num_layers * kv_factor
        rows.append(torch.stack([base + f for f in range(kv_factor)], dim=0))  # [kv_factor, M]
    return torch.stack(rows, dim=0)[None].to(torch.int32)  # [1, B, kv_factor, M]


def caller_order_index(batch: PackedBatch) -> torch.Tensor:
    """[N] int64 permutation: packed_rows[index] lists every token in caller order (row 0's tokens first)."""
    offsets = batch.token_offsets()
    packed_of_row = {row: j for j, row in enumerate(batch.order)}
    index: list[int] = []
    for row in range(batch.batch_size):
        j = packed_of_row[row]
        index.extend(range(offsets[j], offsets[j + 1]))
    return torch.tensor(index, dtype=torch.long)


def unpack_tokens(flat: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Per-token engine output [N, ...] -> caller order, padded: [B, T, ...] (T = longest request)."""
    if flat.shape[0] != batch.num_tokens:
        raise ValueError(f"expected {batch.num_tokens} token rows, got {tuple(flat.shape)}")
    out = flat.new_zeros((batch.batch_size, batch.max_count, *flat.shape[1:]))
    offsets = batch.token_offsets()
    for j, row in enumerate(batch.order):
        out[row, : batch.counts[j]] = flat[offsets[j] : offsets[j + 1]]
    return out


def unpack_logits(flat: torch.Tensor, batch: PackedBatch, mode: str) -> torch.Tensor:
    """Engine logits -> ForwardOutput.logits.

    flat: [N, V] (engine built with gather_context_logits: one row per new token) or [B, V] (last token of
    each request only). mode "last" -> [B, 1, V]; "all" -> [B, T, V] (needs [N, V]).
    """
    if mode not in ("last", "all"):
        raise ValueError(f"logits must be 'last' or 'all', got {mode!r}")
    if flat.shape[0] == batch.num_tokens:
        if mode == "all":
            return unpack_tokens(flat, batch)
        last = (batch.last_token_ids.long() - 1).to(flat.device)  # [B] packed row of each last token
        per_packed = flat.index_select(0, last)  # [B, V] in packed order
    elif flat.shape[0] == batch.batch_size:
        if mode == "all" and batch.max_count > 1:
            raise TideError("logits='all' needs an engine built with gather_context_logits")
        per_packed = flat
    else:
        raise ValueError(
            f"logits have {flat.shape[0]} rows; expected {batch.num_tokens} or {batch.batch_size}"
        )
    out = torch.empty_like(per_packed)
    out[torch.tensor(batch.order, dtype=torch.long, device=flat.device)] = per_packed
    return out[:, None]  # [B, 1, V]


def commit(batch: PackedBatch, table: PagedSlotTable) -> None:
    """Advance every slot of a finished step by its appended token count."""
    for s, n in zip(batch.slots, batch.counts, strict=True):
        table.advance(s, n)
