"""Draft checkpoints: a directory with `model.safetensors` + `config.json` (architecture + manifest).

Never pickle. Loading validates everything against the serving target before a single weight is used:
model fingerprint, hidden size, vocabulary, capture layers, tensor names/shapes/dtypes, finite values.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tide_trt.draft.eagle3 import Eagle3Config, Eagle3Head
from tide_trt.engine.base import ModelInfo
from tide_trt.errors import CheckpointError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "tide-eagle3-v1"


def head_state(head: Eagle3Head) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}


def save_draft(head: Eagle3Head, out_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write a checkpoint atomically (temporary dir + rename). Returns the final directory."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        state = head_state(head)
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        doc = {"format": FORMAT, "architecture": head.cfg.to_dict(),
               "manifest": {"created": time.time(), **manifest}}
        (tmp / CONFIG).write_text(json.dumps(doc, indent=2, sort_keys=True))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_draft_config(path: str | Path) -> tuple[Eagle3Config, dict[str, Any]]:
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"draft checkpoint not found: {p}")
    try:
        doc = json.loads((p / CONFIG).read_text())
        if doc.get("format") != FORMAT:
            raise CheckpointError(f"{p}: not a TIDE EAGLE-3 checkpoint (format={doc.get('format')!r})")
        return Eagle3Config.from_dict(doc["architecture"]), doc.get("manifest", {})
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{p}: unreadable draft config ({exc})") from exc


def check_compatible(cfg: Eagle3Config, info: ModelInfo, where: str) -> None:
    """Refuse a draft that was not made for this target."""
    problems = []
    if cfg.hidden_size != info.hidden_size:
        problems.append(f"hidden size {cfg.hidden_size} != target {info.hidden_size}")
    if cfg.target_vocab_size != info.vocab_size:
        problems.append(f"vocabulary {cfg.target_vocab_size} != target {info.vocab_size}")
    if tuple(cfg.capture_layers) != tuple(info.capture_layers):
        problems.append(f"capture layers {list(cfg.capture_layers)} != engine {list(info.capture_layers)}")
    if cfg.model_fingerprint != info.fingerprint:
        problems.append(f"model fingerprint {cfg.model_fingerprint} != target {info.fingerprint}")
    if problems:
        raise CheckpointError(f"draft {where} does not match the target: " + "; ".join(problems))


def load_draft(path: str | Path, info: ModelInfo, embed: torch.Tensor) -> tuple[Eagle3Head, dict[str, Any]]:
    """Load + validate a checkpoint for the given target. Returns (head in float32 on CPU, manifest)."""
    p = Path(path)
    cfg, manifest = read_draft_config(p)
    check_compatible(cfg, info, str(p))
    head = Eagle3Head(cfg, embed)
    expected = head.state_dict()
    try:
        with safe_open(str(p / WEIGHTS), framework="pt") as f:
            names = set(f.keys())
            tensors = {k: f.get_tensor(k) for k in names}
    except Exception as exc:  # corrupt / truncated / missing file
        raise CheckpointError(f"{p}: cannot read {WEIGHTS} ({exc})") from exc
    missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
    if missing or extra:
        raise CheckpointError(f"{p}: weights missing {missing} / unexpected {extra}")
    for name, ref in expected.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(f"{p}: {name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        if t.is_floating_point() != ref.is_floating_point():
            raise CheckpointError(f"{p}: {name} has dtype {t.dtype}, expected {ref.dtype}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{p}: {name} contains NaN or Inf")
    d2t = tensors["d2t"]
    if d2t.numel() and (d2t.min() < 0 or d2t.max() >= info.vocab_size):
        raise CheckpointError(f"{p}: d2t maps outside the target vocabulary")
    head.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
    return head, manifest
