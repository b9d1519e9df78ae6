"""CUDA graphs of fixed-shape calls: one graph per key (a padded step size, a (batch bucket, chain length)),
captured on first use and replayed.

The seam is one callable over tensors with static shapes and no host synchronisation — the target's fixed-shape
step (models/static_forward.py), the draft's greedy chain (draft/eagle3.py `greedy_chain`). On CUDA with graphs
enabled, the first call for a key warms up on a side stream and captures the call with static copies of its
inputs; later calls copy their inputs into those buffers and replay. The captured calls are idempotent (they
recompute and rewrite the same KV entries from the same inputs), so the warm-up runs do no harm. Elsewhere (CPU,
graphs off) the callable runs eagerly: the same kernels, so the same numbers.
Replayed outputs are the graph's static buffers: valid until the next call with the same key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass
class _Captured:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # static input buffers
    outputs: Any  # static output tensor(s)


class GraphCache:
    def __init__(self, fn: Callable[..., Any], device: str, enabled: bool, name: str = "step"):
        self.fn = fn
        self.name = name
        self.device = torch.device(device)
        self.enabled = enabled and self.device.type == "cuda" and torch.cuda.is_available()
        self._graphs: dict[Hashable, _Captured] = {}
        self._pool: Any = None
        self.replays = 0

    @property
    def captured_keys(self) -> list[Hashable]:
        return list(self._graphs)

    def run(self, key: Hashable, *inputs: torch.Tensor) -> Any:
        if not self.enabled:
            return self.fn(*inputs)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(key, inputs)
        for buf, x in zip(entry.inputs, inputs, strict=True):
            buf.copy_(x, non_blocking=True)
        entry.graph.replay()
        self.replays += 1
        return entry.outputs

    def _capture(self, key: Hashable, inputs: tuple[torch.Tensor, ...]) -> _Captured:
        static = tuple(x.clone() for x in inputs)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: allocator and kernel selection outside the capture
                self.fn(*static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = self.fn(*static)
        self._pool = graph.pool()
        log.info("captured a CUDA graph: %s %s", self.name, key)
        return _Captured(graph, static, outputs)
