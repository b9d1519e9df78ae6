"""Reading the server's Prometheus text in tests: tide_* gauges and counters as floats, and polling for a state."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable


def tide_metrics(url: str) -> dict[str, float]:
    """Every `tide_*` sample of the metrics page at `url` (labels dropped) -> value."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("tide_"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = float(value)
    return out


def wait_for_metrics(fetch: Callable[[], dict[str, float]], check: Callable[[dict[str, float]], bool],
                     timeout: float) -> dict[str, float]:
    """Poll `fetch` until `check` holds or `timeout` seconds pass; returns the last sample either way."""
    deadline = time.monotonic() + timeout
    while True:
        m = fetch()
        if check(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.2)
