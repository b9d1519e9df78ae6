"""Load a target checkpoint directory (config.json + *.safetensors + tokenizer) — safetensors only."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from tide_trt.errors import TideError
from tide_trt.models.default_model import DEFAULT_MODEL_NAME, default_model_dir
from tide_trt.models.llama import LlamaArch

log = logging.getLogger(__name__)


@dataclass
class LoadedCheckpoint:
    path: Path
    name: str
    arch: LlamaArch
    state: dict[str, torch.Tensor]
    fingerprint: str  # stable id of (architecture, weights) used to match drafts and signals


def resolve_model_dir(path: str, cache_dir: str = "") -> Path:
    """'default' -> the cached SmolLM2 checkpoint; otherwise a local HF directory that must exist."""
    if path in ("", "default", DEFAULT_MODEL_NAME):
        return default_model_dir(cache_dir or None)
    p = Path(path).expanduser()
    if not p.is_dir():
        raise TideError(f"model path not found or not a directory: {path}")
    if not (p / "config.json").is_file():
        raise TideError(f"{path} has no config.json (expected a Hugging Face checkpoint directory)")
    if not list(p.glob("*.safetensors")):
        raise TideError(f"{path} has no *.safetensors weights (pickle checkpoints are not loaded)")
    return p


def _fingerprint(cfg: dict, state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "intermediate_size")
    h.update(json.dumps({k: cfg.get(k) for k in keys}, sort_keys=True).encode())
    for name in sorted(state):
        t = state[name]
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        flat = t.reshape(-1)
        h.update(flat[: min(4096, flat.numel())].float().numpy().tobytes())  # cheap content sample
    return h.hexdigest()[:16]


def load_checkpoint(path: str, cache_dir: str = "") -> LoadedCheckpoint:
    """Read config + safetensors weights into CPU float tensors."""
    model_dir = resolve_model_dir(path, cache_dir)
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TideError(f"cannot read {model_dir / 'config.json'}: {exc}") from exc
    arch = LlamaArch.from_hf_config(cfg)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    state[key] = f.get_tensor(key)
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise TideError(f"cannot read weights {file}: {exc}") from exc
    missing = [k for k in ("model.embed_tokens.weight", "model.norm.weight") if k not in state]
    if missing:
        raise TideError(f"{model_dir}: missing weights {missing}")
    name = DEFAULT_MODEL_NAME if path in ("", "default") else model_dir.name
    return LoadedCheckpoint(model_dir, name, arch, state, _fingerprint(cfg, state))


def load_tokenizer(model_dir: Path):
    """The checkpoint's tokenizer (local files only; nothing is downloaded)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:
        raise TideError(f"cannot load the tokenizer from {model_dir}: {exc}") from exc
