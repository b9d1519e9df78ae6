"""Slot bookkeeping shared by the target backends: which KV-cache slots are free and how many tokens each holds.

A slot is one sequence's region of a preallocated KV cache. Low slots are handed out first (the free list is kept
sorted), so a running batch stays in slots `[0, n)` when finished sequences are compacted with `move`. Rollback of
rejected drafts is a length change only (`truncate`): stale entries past the length are overwritten by the next
write. Operations on a slot that is not allocated raise ValueError.
"""

from __future__ import annotations

from tide_trt.errors import TideError


class SlotTable:
    """Slot allocation (low slots first) and per-slot cached lengths."""

    def __init__(self, max_slots: int):
        if max_slots < 1:
            raise TideError(f"max_slots must be >= 1, got {max_slots}")
        self.max_slots = max_slots
        self._lengths = [0] * max_slots
        self._free = list(range(max_slots - 1, -1, -1))  # sorted descending: pop() hands out the lowest slot
        self._used: set[int] = set()

    def allocate(self) -> int:
        if not self._free:
            raise TideError("no free KV-cache slot")
        slot = self._free.pop()
        self._used.add(slot)
        self._lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        self._check(slot)
        self._used.discard(slot)
        self._lengths[slot] = 0
        self._free.append(slot)
        self._free.sort(reverse=True)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def is_allocated(self, slot: int) -> bool:
        return slot in self._used

    def seq_len(self, slot: int) -> int:
        self._check(slot)
        return self._lengths[slot]

    def truncate(self, slot: int, length: int) -> None:
        """Roll back to `length` cached tokens (no copy)."""
        self._check(slot)
        if not 0 <= length <= self._lengths[slot]:
            raise ValueError(f"cannot truncate slot {slot} of length {self._lengths[slot]} to {length}")
        self._lengths[slot] = length

    def advance(self, slot: int, count: int) -> None:
        """`count` tokens were appended to the slot's cache."""
        self._check(slot)
        self._lengths[slot] += count

    def move(self, src: int, dst: int) -> int:
        """Hand the live sequence of `src` to the free slot `dst` (the caller copies the cache entries); `src`
        becomes free. Returns the sequence's length."""
        if dst in self._used or src not in self._used:
            raise ValueError(f"cannot move slot {src} -> {dst}")
        length = self._lengths[src]
        self._free.remove(dst)
        self._used.add(dst)
        self._lengths[dst] = length
        self.free(src)
        return length

    def _check(self, slot: int) -> None:
        if slot not in self._used:
            raise ValueError(f"slot {slot} is not allocated")
