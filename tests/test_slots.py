"""The one slot allocator (engine/slots.py) both target backends use."""

from __future__ import annotations

import pytest

from tide_trt.engine.slots import SlotTable
from tide_trt.errors import TideError


def test_low_slots_first_and_lengths():
    t = SlotTable(4)
    assert [t.allocate() for _ in range(3)] == [0, 1, 2] and t.num_free == 1
    t.advance(1, 5)
    t.advance(1, 2)
    assert t.seq_len(1) == 7
    t.truncate(1, 3)
    assert t.seq_len(1) == 3
    with pytest.raises(ValueError):
        t.truncate(1, 4)
    t.free(2)
    t.free(0)
    assert t.allocate() == 0 and t.seq_len(0) == 0  # the lowest free slot, reset
    assert t.allocate() == 2 and t.allocate() == 3
    with pytest.raises(TideError, match="no free KV-cache slot"):
        t.allocate()


def test_unallocated_slots_are_refused():
    t = SlotTable(2)
    with pytest.raises(ValueError):
        t.seq_len(1)
    a = t.allocate()
    t.free(a)
    with pytest.raises(ValueError):
        t.free(a)  # a double free would hand the slot out twice
    assert t.num_free == 2


def test_move_compacts_into_a_free_slot():
    t = SlotTable(3)
    a, b, c = t.allocate(), t.allocate(), t.allocate()
    t.advance(c, 9)
    t.free(a)
    with pytest.raises(ValueError):
        t.move(c, b)  # b is not free
    assert t.move(c, a) == 9
    assert t.seq_len(a) == 9 and not t.is_allocated(c) and t.num_free == 1
    assert t.allocate() == c
