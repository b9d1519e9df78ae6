"""Refit of the draft's TensorRT engine: replace EVERY draft weight, or nothing.

The engine is built by `builders/build_draft_engine.py` with `BuilderFlag.REFIT_INDIVIDUAL` (only the draft
weights are refittable) and optionally `STRIP_PLAN`; the builder writes a weight-name map (`weight_map.json`)
from the engine's weight names to draft state-dict keys. A refit:

1. validates the state dict against the map (pure, CPU-tested): every mapped key present, no unmapped extra
   key, exact shape and dtype after the recorded transform — any problem is one clear `RefitError`;
2. checks the engine's refittable names equal the map's names (pure helper, CPU-tested);
3. hands each tensor to `trt.Refitter` (device pointers, no host copy), then refuses to refit if
   `get_missing_weights()` is non-empty or a prototype's count/dtype differs (thin, needs a GPU).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tide_trt.errors import CheckpointError, TideError

log = logging.getLogger(__name__)

NAME_MAP_FORMAT = "tide-draft-trt-weights-v1"
TRANSFORMS = ("identity", "transpose")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# State-dict entries used outside the draft engine (d2t maps draft ids to target ids on the caller's side).
NOT_IN_ENGINE = ("d2t",)


class RefitError(CheckpointError):
    """A draft state dict or engine does not match the weight-name map; nothing was changed."""


@dataclass(frozen=True)
class WeightSpec:
    """One refittable engine weight: which state-dict tensor feeds it and how."""

    source: str  # state-dict key, e.g. "fc.weight"
    transform: str  # "identity" | "transpose" (2-D weights stored [in, out] for a plain MatMul)
    shape: tuple[int, ...]  # engine-side shape (after the transform)
    dtype: str  # "float32" | "float16" | "bfloat16"


def save_name_map(
    path: str | Path, specs: dict[str, WeightSpec], extra: dict[str, Any] | None = None
) -> None:
    doc = {
        "format": NAME_MAP_FORMAT,
        **(extra or {}),
        "weights": {name: {**asdict(s), "shape": list(s.shape)} for name, s in sorted(specs.items())},
    }
    Path(path).write_text(json.dumps(doc, indent=2, sort_keys=True))


def load_name_map(path: str | Path) -> dict[str, WeightSpec]:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise RefitError(f"cannot read weight-name map {path}: {exc}") from exc
    if doc.get("format") != NAME_MAP_FORMAT:
        raise RefitError(f"{path}: not a TIDE draft weight map (format={doc.get('format')!r})")
    specs = {}
    for name, d in doc.get("weights", {}).items():
        if d.get("transform") not in TRANSFORMS or d.get("dtype") not in _DTYPE_NAMES.values():
            raise RefitError(f"{path}: bad entry for {name}: {d}")
        specs[name] = WeightSpec(d["source"], d["transform"], tuple(int(x) for x in d["shape"]), d["dtype"])
    if not specs:
        raise RefitError(f"{path}: the weight map is empty")
    return specs


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def prepare_refit_weights(
    state: dict[str, torch.Tensor], name_map: dict[str, WeightSpec], ignore: tuple[str, ...] = NOT_IN_ENGINE
) -> dict[str, torch.Tensor]:
    """Validate `state` against the map and return {engine weight name: contiguous tensor} (pure).

    Fails (RefitError listing every problem) on a missing key, an unmapped extra key, a shape or a dtype
    mismatch. Dtypes are never converted silently: publish the draft in the engine's dtype.
    """
    problems = []
    sources = {s.source for s in name_map.values()}
    missing = sorted(sources - set(state))
    if missing:
        problems.append(f"missing weights {missing}")
    extra = sorted(set(state) - sources - set(ignore))
    if extra:
        problems.append(f"weights with no engine counterpart {extra}")
    out: dict[str, torch.Tensor] = {}
    for name, spec in sorted(name_map.items()):
        if spec.source not in state:
            continue
        t = state[spec.source]
        if spec.transform == "transpose":
            if t.dim() != 2:
                problems.append(f"{spec.source}: transpose needs a 2-D tensor, got shape {tuple(t.shape)}")
                continue
            t = t.t()
        if tuple(t.shape) != spec.shape:
            problems.append(f"{spec.source} -> {name}: shape {tuple(t.shape)}, engine expects {spec.shape}")
            continue
        if dtype_name(t.dtype) != spec.dtype:
            problems.append(
                f"{spec.source} -> {name}: dtype {dtype_name(t.dtype)}, engine expects {spec.dtype}"
            )
            continue
        if not torch.isfinite(t).all():
            problems.append(f"{spec.source}: contains NaN or Inf")
            continue
        out[name] = t.contiguous()
    if problems:
        raise RefitError("draft weights do not match the engine's weight map: " + "; ".join(problems))
    return out


def check_engine_weight_names(engine_names: list[str], name_map: dict[str, WeightSpec]) -> None:
    """The engine must expose exactly the mapped weights as refittable (pure)."""
    have, want = set(engine_names), set(name_map)
    problems = []
    if want - have:
        problems.append(f"mapped weights the engine cannot refit {sorted(want - have)}")
    if have - want:
        problems.append(f"refittable engine weights with no map entry {sorted(have - want)}")
    if problems:
        raise RefitError("engine and weight map disagree (rebuild both together): " + "; ".join(problems))


def _trt_dtype(trt: Any, name: str) -> Any:
    return {"float32": trt.float32, "float16": trt.float16, "bfloat16": trt.bfloat16}[name]


def refit_draft_engine(
    engine_path_or_engine: str | Path | Any,
    state: dict[str, torch.Tensor],
    name_map: dict[str, WeightSpec] | str | Path,
    device: str = "cuda",
) -> Any:
    """Refit every draft weight of a refittable TensorRT engine in place; returns the ICudaEngine.

    engine_path_or_engine: a serialized engine file or a deserialized `trt.ICudaEngine`.
    name_map: the builder's map (or the path of its weight_map.json).
    """
    specs = name_map if isinstance(name_map, dict) else load_name_map(name_map)
    weights = prepare_refit_weights(state, specs)  # validate before touching TensorRT
    try:
        import tensorrt as trt  # noqa: PLC0415 - lazy: CPU machines never get here
    except ImportError as exc:
        raise TideError(f"refitting a TensorRT draft engine needs TensorRT on an NVIDIA GPU ({exc})") from exc
    logger = trt.Logger(trt.Logger.WARNING)
    engine = engine_path_or_engine
    if isinstance(engine, (str, Path)):
        engine = trt.Runtime(logger).deserialize_cuda_engine(Path(engine).read_bytes())
        if engine is None:
            raise RefitError(f"TensorRT could not deserialize {engine_path_or_engine}")
    refitter = trt.Refitter(engine, logger)
    check_engine_weight_names(list(refitter.get_all_weights()), specs)
    on_device = {name: t.to(device) for name, t in weights.items()}  # kept alive until the refit returns
    for name, t in on_device.items():
        proto = refitter.get_weights_prototype(name)
        if proto.size != t.numel() or proto.dtype != _trt_dtype(trt, specs[name].dtype):
            raise RefitError(
                f"{name}: engine holds {proto.size} x {proto.dtype}, got {t.numel()} x {t.dtype}"
            )
        w = trt.Weights(_trt_dtype(trt, specs[name].dtype), t.data_ptr(), t.numel())
        if not refitter.set_named_weights(name, w, trt.TensorLocation.DEVICE):
            raise RefitError(f"TensorRT rejected weights {name}")
    missing = list(refitter.get_missing_weights())
    if missing:
        raise RefitError(f"refit refused: the engine still misses weights {sorted(missing)}")
    if not refitter.refit_cuda_engine():
        raise RefitError("TensorRT refit_cuda_engine() failed (see the TensorRT log)")
    torch.cuda.synchronize()
    log.info("refitted %d draft weights", len(on_device))
    return engine
