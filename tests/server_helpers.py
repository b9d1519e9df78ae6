"""Helpers for tests against a running server: tide_* Prometheus samples as floats, polling for a state, and
gRPC inputs of deliberately malformed requests."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from typing import Any


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


def grpc_inputs_with(changes: dict[str, Any], stream: bool) -> list:
    """A valid 4-token request's gRPC inputs with `changes` applied: name -> None (drop the input) or
    (Triton dtype, numpy array) (replace it) — for malformed-request tests."""
    import tritonclient.grpc as grpcclient

    from tide_trt.commands.client import build_inputs

    inputs = {i.name(): i for i in build_inputs("hello", 4, stream=stream)}
    for name, value in changes.items():
        if value is None:
            inputs.pop(name)
            continue
        dtype, arr = value
        t = grpcclient.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        inputs[name] = t
    return list(inputs.values())
