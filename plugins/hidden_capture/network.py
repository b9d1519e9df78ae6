"""Insert TideHiddenCapture into a TensorRT-LLM network: registration + insertion after chosen layers.

Capture layer i is the residual stream *entering* decoder layer i (the convention of tide_trt.models.llama);
i == num_layers is the last layer's output (before the final norm). For each capture point, in execution
order, one plugin copies its [num_tokens, hidden] input into slot k of a [num_tokens, 3, hidden] buffer; the
plugins are chained (each takes the previous buffer as its accumulator input) and the last buffer is marked
as the network output `tide_capture_hidden`. The residual stream itself is not modified.

`plan_capture` is pure (CPU-tested). Everything that touches `tensorrt` / `tensorrt_llm` is imported lazily
inside `load_plugin_library`, `create_capture_plugin` and `install_capture` (needs TensorRT-LLM; unverified
without a GPU — see plugins/README.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PLUGIN_NAME = "TideHiddenCapture"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "tide"
CAPTURE_OUTPUT = "tide_capture_hidden"
DEFAULT_LIBRARY = Path(__file__).parent / "build" / "libtide_hidden_capture.so"


@dataclass(frozen=True)
class CapturePoint:
    layer: int  # capture layer index (residual stream entering this layer; == num_layers -> final output)
    slot: int  # position in the [num_tokens, num_slots, hidden] buffer (index into capture_layers)
    has_accumulator: bool  # False for the first plugin of the chain (it zero-fills the other slots)
    after_last_layer: bool  # True when layer == num_layers (hook the last layer's output, not an input)


def plan_capture(capture_layers: list[int] | tuple[int, ...], num_layers: int) -> list[CapturePoint]:
    """The plugin chain in execution order (by layer, then slot); duplicates get one plugin per slot."""
    if not capture_layers:
        raise ValueError("capture_layers is empty")
    bad = [c for c in capture_layers if not 0 <= c <= num_layers]
    if bad:
        raise ValueError(f"capture layers {bad} outside [0, {num_layers}]")
    ordered = sorted((layer, slot) for slot, layer in enumerate(capture_layers))
    return [CapturePoint(layer, slot, i > 0, layer == num_layers) for i, (layer, slot) in enumerate(ordered)]


def capture_reference(hidden: Any, accumulator: Any | None, slot: int, num_slots: int) -> Any:
    """What one plugin computes, in torch (the contract the CUDA kernel implements).

    hidden [N, H], accumulator [N, S, H] or None -> [N, S, H].
    """
    import torch  # noqa: PLC0415 - keep this module importable without torch

    if accumulator is None:
        out = torch.zeros((hidden.shape[0], num_slots, hidden.shape[1]), dtype=hidden.dtype)
    else:
        out = accumulator.clone()
    out[:, slot] = hidden
    return out


def load_plugin_library(path: str | Path | None = None) -> Path:
    """Register the plugin creator with TensorRT's global registry (library exports getCreators)."""
    import tensorrt as trt  # noqa: PLC0415

    lib = Path(path) if path else DEFAULT_LIBRARY
    if not lib.is_file():
        raise FileNotFoundError(f"{lib} not found: build it with cmake -S plugins/hidden_capture -B ...")
    registry = trt.get_plugin_registry()
    if registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
        registry.load_library(str(lib))
    if registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
        raise RuntimeError(
            f"{lib} loaded but {PLUGIN_NAMESPACE}::{PLUGIN_NAME} v{PLUGIN_VERSION} is not registered"
        )
    return lib


def create_capture_plugin(point: CapturePoint, num_slots: int) -> Any:
    """An IPluginV3 instance for one capture point (build phase)."""
    import numpy as np  # noqa: PLC0415
    import tensorrt as trt  # noqa: PLC0415

    creator = trt.get_plugin_registry().get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    if creator is None:
        raise RuntimeError("TideHiddenCapture is not registered: call load_plugin_library() first")
    values = {
        "layer_index": point.layer,
        "capture_slot": point.slot,
        "num_slots": num_slots,
        "has_accumulator": int(point.has_accumulator),
    }
    fields = [
        trt.PluginField(k, np.array([v], dtype=np.int32), trt.PluginFieldType.INT32)
        for k, v in values.items()
    ]
    plugin = creator.create_plugin(
        f"tide_capture_l{point.layer}_s{point.slot}",
        trt.PluginFieldCollection(fields),
        trt.TensorRTPhase.BUILD,
    )
    if plugin is None:
        raise RuntimeError(f"TideHiddenCapture rejected fields {values}")
    return plugin


@dataclass
class CaptureInstaller:
    """Patches decoder layers of a TensorRT-LLM model; collects the chain while the network is traced."""

    points: list[CapturePoint]
    num_slots: int
    impl: str = "plugin"  # "plugin" (TideHiddenCapture) | "native" (TensorRT concat, no plugin: fallback)
    output_name: str = CAPTURE_OUTPUT
    _acc: Any = None
    _native: dict[int, Any] = field(default_factory=dict)
    _done: int = 0

    def capture(self, hidden: Any, point: CapturePoint) -> None:
        """Add the capture of `hidden` ([num_tokens, hidden] tensorrt_llm Tensor) for one point."""
        import tensorrt_llm  # noqa: PLC0415
        from tensorrt_llm.functional import _create_tensor, concat, unsqueeze  # noqa: PLC0415

        if self.impl == "plugin":
            inputs = [hidden.trt_tensor] + ([self._acc.trt_tensor] if point.has_accumulator else [])
            plugin = create_capture_plugin(point, self.num_slots)
            layer = tensorrt_llm.default_trtnet().add_plugin_v3(inputs, [], plugin)
            layer.name = f"tide_capture_l{point.layer}_s{point.slot}"
            self._acc = _create_tensor(layer.get_output(0), layer)  # [num_tokens, num_slots, hidden]
        else:
            self._native[point.slot] = unsqueeze(hidden, 1)  # [num_tokens, 1, hidden]
        self._done += 1
        if self._done == len(self.points):
            out = (
                self._acc
                if self.impl == "plugin"
                else concat([self._native[s] for s in range(self.num_slots)], 1)
            )
            out.mark_output(self.output_name, hidden.dtype)
            log.info(
                "marked %s [num_tokens, %d, hidden] as a network output", self.output_name, self.num_slots
            )


def install_capture(
    model: Any, capture_layers: list[int], impl: str = "plugin", plugin_library: str | Path | None = None
) -> CaptureInstaller:
    """Wrap the forward of the decoder layers that own a capture point. Call before tensorrt_llm.build().

    Needs remove_input_padding (hidden states [num_tokens, hidden]) and reduce_fusion off (tp = 1).
    """
    if impl not in ("plugin", "native"):
        raise ValueError(f"impl must be 'plugin' or 'native', got {impl!r}")
    if impl == "plugin":
        load_plugin_library(plugin_library)
    layers = model.transformer.layers
    num_layers = len(layers)
    points = plan_capture(capture_layers, num_layers)
    installer = CaptureInstaller(points, num_slots=len(capture_layers), impl=impl)
    by_layer: dict[int, list[CapturePoint]] = {}
    for p in points:
        by_layer.setdefault(num_layers - 1 if p.after_last_layer else p.layer, []).append(p)
    for index, owned in by_layer.items():
        _wrap_layer(layers[index], owned, installer)
    return installer


def _wrap_layer(layer: Any, points: list[CapturePoint], installer: CaptureInstaller) -> None:
    original = layer.forward
    before = [p for p in points if not p.after_last_layer]
    after = [p for p in points if p.after_last_layer]

    def forward(hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(hidden_states, tuple):
            raise RuntimeError("capture needs reduce_fusion disabled (hidden_states arrived as a tuple)")
        for p in before:
            installer.capture(hidden_states, p)
        out = original(hidden_states, *args, **kwargs)
        if after:
            final = out[0] if isinstance(out, tuple) else out  # (hidden, presents) when use_cache
            for p in after:
                installer.capture(final, p)
        return out

    layer.forward = forward  # tensorrt_llm Module.__call__ dispatches to the instance attribute
