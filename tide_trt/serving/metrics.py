"""Publish scheduler snapshots as Triton custom metrics (python-backend `pb_utils.MetricFamily`).

They appear on Triton's Prometheus endpoint (`--metrics-port`, path `/metrics`) next to Triton's own
`nv_*` metrics, labelled with the model name. Names ending in `_total` become counters (incremented by
the difference to the last published value), everything else a gauge. Plugin metrics arrive already
named `tide_<name>` (see `ServingStats.snapshot`); families are created the first time a name appears.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from tide_trt.serving.stats import DESCRIPTIONS

log = logging.getLogger(__name__)


class TritonMetrics:
    """Callable as the scheduler's `metrics_hook`; `pb` is the `triton_python_backend_utils` module."""

    def __init__(self, pb: Any, labels: Mapping[str, str]):
        self.pb = pb
        self.labels = dict(labels)
        self._metrics: dict[str, Any] = {}
        self._families: dict[str, Any] = {}  # kept alive: a collected family unregisters its metrics
        self._last: dict[str, float] = {}
        self._broken: set[str] = set()

    def __call__(self, snapshot: Mapping[str, float]) -> None:
        self.publish(snapshot)

    def publish(self, snapshot: Mapping[str, float]) -> None:
        for name, value in snapshot.items():
            if name in self._broken or self._last.get(name) == value:
                continue
            try:
                self._update(name, float(value))
            except Exception:  # one bad metric must not stop the others (or serving)
                log.exception("metric %s could not be published; skipping it from now on", name)
                self._broken.add(name)

    def _update(self, name: str, value: float) -> None:
        metric = self._metrics.get(name)
        counter = name.endswith("_total")
        if metric is None:
            family_kind = self.pb.MetricFamily.COUNTER if counter else self.pb.MetricFamily.GAUGE
            description = DESCRIPTIONS.get(name, f"TIDE plugin metric {name.removeprefix('tide_')}")
            family = self.pb.MetricFamily(name=name, description=description, kind=family_kind)
            metric = family.Metric(labels=self.labels)
            self._families[name] = family
            self._metrics[name] = metric
        if counter:
            delta = value - self._last.get(name, 0.0)
            if delta > 0:
                metric.increment(delta)
            elif delta < 0:  # a plugin counter was reset: Prometheus counters never go down
                log.debug("counter %s went down (%s); keeping its value", name, value)
        else:
            metric.set(value)
        self._last[name] = value
