"""CUDA graphs of fixed-shape steps: one graph per padded step size, captured on first use and replayed.

The seam is one callable, `fn(token_ids, positions, token_slots) -> (logits, hidden)` over padded [P] tensors with
static shapes and no host synchronisation (models/static_forward.py). On CUDA with graphs enabled, each P up to
`max_graph_tokens` is captured once (after a warm-up on a side stream; padding inputs point at the scratch KV slot,
so capture writes touch no sequence) and replayed by copying the step's inputs into the graph's static buffers.
Elsewhere (CPU, graphs off, larger steps) `fn` runs eagerly: the same kernels, so the same numbers.
Replayed outputs are the graph's static buffers: valid until the next step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    token_ids: torch.Tensor  # [P] static inputs
    positions: torch.Tensor
    token_slots: torch.Tensor
    logits: torch.Tensor  # [P, V] static outputs
    hidden: torch.Tensor  # [P, C, H]


class StepGraphs:
    def __init__(self, fn: StepFn, device: str, scratch_slot: int, max_graph_tokens: int, enabled: bool):
        self.fn = fn
        self.device = torch.device(device)
        self.scratch_slot = scratch_slot
        self.max_graph_tokens = max_graph_tokens
        self.enabled = enabled and self.device.type == "cuda" and torch.cuda.is_available()
        self._graphs: dict[int, _Captured] = {}
        self._pool = None
        self.replays = 0

    @property
    def captured_sizes(self) -> list[int]:
        return sorted(self._graphs)

    def run(self, token_ids: torch.Tensor, positions: torch.Tensor, token_slots: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
        p = token_ids.shape[0]
        if not self.enabled or p > self.max_graph_tokens:
            return self.fn(token_ids, positions, token_slots)
        entry = self._graphs.get(p)
        if entry is None:
            entry = self._graphs[p] = self._capture(p)
        entry.token_ids.copy_(token_ids, non_blocking=True)
        entry.positions.copy_(positions, non_blocking=True)
        entry.token_slots.copy_(token_slots, non_blocking=True)
        entry.graph.replay()
        self.replays += 1
        return entry.logits, entry.hidden

    def _capture(self, p: int) -> _Captured:
        ids = torch.zeros(p, dtype=torch.long, device=self.device)
        pos = torch.zeros(p, dtype=torch.long, device=self.device)
        slots = torch.full((p,), self.scratch_slot, dtype=torch.long, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: allocator and kernel selection outside the capture
                self.fn(ids, pos, slots)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits, hidden = self.fn(ids, pos, slots)
        self._pool = graph.pool()
        log.info("captured a CUDA graph for steps of %d tokens", p)
        return _Captured(graph, ids, pos, slots, logits, hidden)
