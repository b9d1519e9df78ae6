"""Preallocated, slot-based KV cache. Rollback of rejected tokens is a length change, never a copy:
stale entries beyond a slot's length are simply overwritten by the next write."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CacheLayout:
    """How one forward call maps onto the cache (computed once per call, shared by all layers)."""

    slots: torch.Tensor  # [B] int64
    write_slots: torch.Tensor | None  # [B, T] advanced index (None -> contiguous fast path)
    write_pos: torch.Tensor | None  # [B, T]
    slot_range: tuple[int, int] | None  # contiguous slots [lo, hi) -> views instead of gathers
    start_pos: int  # common start when every sequence starts at the same length
    num_new: int
    key_len: int  # keys attended: max(starts) + T
    mask: torch.Tensor | None  # [B, 1, T, key_len] bool, None when is_causal/full suffices
    is_causal: bool


class KVCache:
    """K and V per layer: [max_slots, num_kv_heads, max_seq_len, head_dim]."""

    def __init__(self, num_layers: int, max_slots: int, num_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: str):
        shape = (max_slots, num_kv_heads, max_seq_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_slots = max_slots
        self.max_seq_len = max_seq_len
        self.device = device

    def layout(self, slots: torch.Tensor, starts: torch.Tensor, num_new: int) -> CacheLayout:
        slot_list = slots.tolist()
        start_list = starts.tolist()
        bsz = len(slot_list)
        lo = slot_list[0]
        contiguous = slot_list == list(range(lo, lo + bsz))
        same_start = all(s == start_list[0] for s in start_list)
        key_len = max(start_list) + num_new
        if key_len > self.max_seq_len:
            raise ValueError(f"sequence would exceed max_seq_len={self.max_seq_len}")
        mask = None
        is_causal = False
        if same_start:
            if num_new > 1:
                if start_list[0] == 0:
                    is_causal = True
                else:
                    mask = self._mask(starts, num_new, key_len)
        else:
            mask = self._mask(starts, num_new, key_len)
        write_slots = write_pos = None
        if not (contiguous and same_start):
            pos = starts[:, None] + torch.arange(num_new, device=starts.device)[None, :]  # [B, T]
            write_pos = pos
            write_slots = slots[:, None].expand(-1, num_new)
        return CacheLayout(slots, write_slots, write_pos, (lo, lo + bsz) if contiguous else None,
                           start_list[0], num_new, key_len, mask, is_causal)

    def _mask(self, starts: torch.Tensor, num_new: int, key_len: int) -> torch.Tensor:
        key_pos = torch.arange(key_len, device=starts.device)  # [Lk]
        query_pos = starts[:, None] + torch.arange(num_new, device=starts.device)[None, :]  # [B, T]
        return (key_pos[None, None, :] <= query_pos[:, :, None])[:, None]  # [B, 1, T, Lk]

    def write_and_read(self, layer: int, lay: CacheLayout, k: torch.Tensor, v: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, Hkv, T, D] at each sequence's positions; return keys/values [B, Hkv, key_len, D]."""
        kc, vc = self.k[layer], self.v[layer]
        if lay.write_slots is None:
            assert lay.slot_range is not None  # the contiguous fast path always has a slot range
            lo, hi = lay.slot_range
            p = lay.start_pos
            kc[lo:hi, :, p:p + lay.num_new] = k
            vc[lo:hi, :, p:p + lay.num_new] = v
        else:
            kc[lay.write_slots, :, lay.write_pos] = k.transpose(1, 2)
            vc[lay.write_slots, :, lay.write_pos] = v.transpose(1, 2)
        if lay.slot_range is not None:
            lo, hi = lay.slot_range
            return kc[lo:hi, :, :lay.key_len], vc[lo:hi, :, :lay.key_len]
        return kc[lay.slots, :, :lay.key_len], vc[lay.slots, :, :lay.key_len]

    def write_tokens(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor) -> None:
        """Store the k/v [N, Hkv, D] of N flat tokens at (slots[i], positions[i]) ([N] int64 each)."""
        self.k[layer][slots, :, positions] = k
        self.v[layer][slots, :, positions] = v

    def read(self, layer: int, slots: torch.Tensor, slot_range: tuple[int, int] | None, key_len: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values [G, Hkv, key_len, D] of `slots` [G] (views when they are the contiguous `slot_range`)."""
        kc, vc = self.k[layer], self.v[layer]
        if slot_range is not None:
            lo, hi = slot_range
            return kc[lo:hi, :, :key_len], vc[lo:hi, :, :key_len]
        return kc[slots, :, :key_len], vc[slots, :, :key_len]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot src into slot dst (slot compaction)."""
        for kc, vc in zip(self.k, self.v, strict=False):
            kc[dst, :, :length] = kc[src, :, :length]
            vc[dst, :, :length] = vc[src, :, :length]
