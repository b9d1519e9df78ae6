"""TensorRT-LLM backend of TargetEngine: a thin layer over a TensorRT-LLM engine built by
`builders/build_target_engine.py` (Llama + the TideHiddenCapture plugin of `plugins/hidden_capture`).

Every `tensorrt` / `tensorrt_llm` import happens inside functions, so this module imports anywhere; building
an engine without them raises `TideError("engine.backend=trtllm needs TensorRT-LLM on an NVIDIA GPU: ...")`.
All pure logic (slots, packing, position ids, rollback, unpacking, engine inputs, manifest checks) lives in
`trtllm_layout.py` and in the pure functions below, which are tested on CPU. What is not tested here — the
TensorRT calls in `_TrtSession` and `TrtllmTargetEngine` — is listed in docs/TRTLLM.md.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Protocol

import torch

from tide_trt.config import EngineConfig, ModelConfig, default_cache_dir
from tide_trt.engine.base import DTYPES, ModelInfo, TargetEngine, default_capture_layers
from tide_trt.engine.step_batch import StepBatch, StepOutput
from tide_trt.engine.trtllm_layout import (
    PackedBatch,
    PagedSlotTable,
    caller_order_index,
    commit,
    kv_block_offsets,
    pack_batch,
)
from tide_trt.errors import TideError

log = logging.getLogger(__name__)

MANIFEST = "tide_engine.json"
MANIFEST_FORMAT = "tide-trtllm-engine-v1"
CAPTURE_OUTPUT = "tide_capture_hidden"  # [num_tokens, 3, hidden] network output of the capture plugin
ENGINE_DIR_ENV = "TIDE_TRTLLM_ENGINE_DIR"
DEFAULT_TOKENS_PER_BLOCK = 32

# The release this layer follows (docs/TRTLLM.md, "Versions"): the newest TensorRT-LLM with the TensorRT-engine flow
# (trtllm-build, custom TensorRT plugins, refit) that is a release, not a release candidate. Its own metadata requires
# tensorrt~=10.14.1, torch>=2.9.1,<=2.10.0a0, transformers==4.57.3, cuda-python>=13, python>=3.10. pyproject's
# [trtllm] extra pins the same two.
SUPPORTED_TRTLLM = "1.2.1"
SUPPORTED_TENSORRT = "10.14"
# The TensorRT-engine flow is deprecated in 1.2 and removed from TensorRT-LLM after 1.3.0rc20.
ENGINE_FLOW_REMOVED_AFTER = "1.3.0rc20"


class UnsupportedVersionError(TideError):
    """TensorRT / TensorRT-LLM of a release this layer was not written for."""


def version_matches(found: str, supported: str) -> bool:
    """`found` is `supported` or a patch / post release of it ("1.2.1.post1", "10.14.1.48"), not "1.2.10"."""
    return found == supported or found.startswith(supported + ".")


def _release_tuple(version: str) -> tuple[int, ...]:
    """(1, 3, 0) for "1.3.0rc20": the leading numeric release fields (pre/post/dev tags ignored)."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(x) for x in match.group(0).split(".")) if match else ()


def check_supported_versions(tensorrt_llm: str, tensorrt: str) -> None:
    """Refuse any TensorRT-LLM / TensorRT other than the ones this layer was written for (one clear error).

    The builders and the engine use TensorRT-LLM's engine-flow APIs (BuildConfig and PluginConfig as 1.2 defines
    them, the GPT attention plugin's engine inputs, the paged KV pool layout) and TensorRT's plugin and refit APIs;
    other releases differ in exactly those places, so a silent attempt would fail later and less clearly.
    """
    problems = []
    if not version_matches(tensorrt_llm, SUPPORTED_TRTLLM):
        newer = _release_tuple(tensorrt_llm) > _release_tuple(SUPPORTED_TRTLLM)
        why = (
            f"newer: the TensorRT-engine flow is deprecated from 1.2 on and removed after {ENGINE_FLOW_REMOVED_AFTER}"
            if newer
            else "older: its BuildConfig / PluginConfig APIs differ from the ones used here"
        )
        problems.append(f"TensorRT-LLM {tensorrt_llm} ({why})")
    if not version_matches(tensorrt, SUPPORTED_TENSORRT):
        problems.append(
            f"TensorRT {tensorrt} (TensorRT-LLM {SUPPORTED_TRTLLM} requires tensorrt~={SUPPORTED_TENSORRT}.1)"
        )
    if problems:
        raise UnsupportedVersionError(
            f"this TensorRT-LLM layer was written for TensorRT-LLM {SUPPORTED_TRTLLM} with TensorRT "
            f"{SUPPORTED_TENSORRT}; found " + " and ".join(problems) + ". Install the pinned versions "
            "(pip install '.[trtllm]' --extra-index-url https://pypi.nvidia.com, or the matching NGC container) — "
            "docs/TRTLLM.md, \"Versions\" and \"The road past the engine flow\""
        )


def require_trtllm() -> tuple[Any, Any]:
    """Import tensorrt + tensorrt_llm and check for a CUDA device; TideError with the reason otherwise."""
    prefix = "engine.backend=trtllm needs TensorRT-LLM on an NVIDIA GPU: "
    try:
        import tensorrt as trt  # noqa: PLC0415 - lazy on purpose
    except ImportError as exc:
        raise TideError(prefix + f"the tensorrt package is not installed ({exc})") from exc
    try:
        import tensorrt_llm  # noqa: PLC0415 - loads TensorRT-LLM's plugin library as a side effect
    except ImportError as exc:
        raise TideError(prefix + f"the tensorrt_llm package is not installed ({exc})") from exc
    if not torch.cuda.is_available():
        raise TideError(prefix + "torch sees no CUDA device")
    return trt, tensorrt_llm


# --- engine directory + manifest (pure) -------------------------------------------------------------------
def engine_dir_for(fingerprint: str, cfg: EngineConfig, cache_dir: str = "") -> Path:
    """Where the builder writes (and the engine looks for) the TensorRT-LLM engine of one target + shape.

    $TIDE_TRTLLM_ENGINE_DIR overrides it (a config key for it belongs in EngineConfig; see docs/TRTLLM.md).
    """
    override = os.environ.get(ENGINE_DIR_ENV, "")
    if override:
        return Path(override)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    return root / "trtllm" / f"{fingerprint}-{cfg.dtype}-b{cfg.max_batch_size}-s{cfg.max_seq_len}"


def make_manifest(
    fingerprint: str,
    capture_layers: list[int],
    dtype: str,
    max_batch_size: int,
    max_seq_len: int,
    max_num_tokens: int,
    tokens_per_block: int,
    plugin_library: str,
    capture_impl: str,
    gather_context_logits: bool = True,
) -> dict[str, Any]:
    """What the builder records next to the engine; `check_engine_manifest` reads it back."""
    return {
        "format": MANIFEST_FORMAT,
        "model_fingerprint": fingerprint,
        "capture_layers": list(capture_layers),
        "capture_output": CAPTURE_OUTPUT,
        "dtype": dtype,
        "max_batch_size": max_batch_size,
        "max_seq_len": max_seq_len,
        "max_num_tokens": max_num_tokens,
        "tokens_per_block": tokens_per_block,
        "plugin_library": plugin_library,
        "capture_impl": capture_impl,
        "gather_context_logits": gather_context_logits,
    }


def check_engine_manifest(
    manifest: dict[str, Any], fingerprint: str, cfg: EngineConfig, capture_layers: tuple[int, ...]
) -> None:
    """Refuse an engine that was not built for this target / config (one error listing every problem)."""
    if manifest.get("format") != MANIFEST_FORMAT:
        raise TideError(f"not a TIDE TensorRT-LLM engine (format={manifest.get('format')!r})")
    problems = []
    if manifest.get("model_fingerprint") != fingerprint:
        problems.append(f"model fingerprint {manifest.get('model_fingerprint')} != target {fingerprint}")
    if tuple(manifest.get("capture_layers", ())) != tuple(capture_layers):
        problems.append(
            f"capture layers {manifest.get('capture_layers')} != engine config {list(capture_layers)}"
        )
    if manifest.get("dtype") != cfg.dtype:
        problems.append(f"dtype {manifest.get('dtype')} != engine.dtype {cfg.dtype}")
    if int(manifest.get("max_batch_size", 0)) < cfg.max_batch_size:
        problems.append(f"built for max_batch_size {manifest.get('max_batch_size')} < {cfg.max_batch_size}")
    if int(manifest.get("max_seq_len", 0)) < cfg.max_seq_len:
        problems.append(f"built for max_seq_len {manifest.get('max_seq_len')} < {cfg.max_seq_len}")
    built_tokens = int(manifest.get("max_num_tokens", 0))
    if built_tokens < cfg.max_batch_size:
        problems.append(
            f"built for max_num_tokens {manifest.get('max_num_tokens')} < max_batch_size {cfg.max_batch_size} "
            "(a decode step of a full batch would not fit)"
        )
    if not manifest.get("gather_context_logits", False):
        problems.append("built without gather_context_logits (verification needs every token's logits)")
    if problems:
        raise TideError(
            "TensorRT-LLM engine does not match: "
            + "; ".join(problems)
            + " — rebuild it with builders/build_target_engine.py"
        )


def effective_max_num_tokens(manifest: dict[str, Any], cfg: EngineConfig) -> int:
    """The step token budget the serving loop must respect: min(engine's build-time max_num_tokens,
    engine.max_num_tokens). The engine's own value is a hard limit (its `input_ids` optimization profile); the
    config's is the latency budget the step loop chunks prompts under."""
    built = int(manifest.get("max_num_tokens", 0))
    if built < 1:
        raise TideError("the engine manifest records no max_num_tokens: rebuild with builders/build_target_engine.py")
    return min(built, int(getattr(cfg, "max_num_tokens", built)))


def read_manifest(engine_dir: Path) -> dict[str, Any]:
    path = engine_dir / MANIFEST
    if not path.is_file():
        raise TideError(
            f"no TensorRT-LLM engine at {engine_dir} ({MANIFEST} missing): "
            "build one with builders/build_target_engine.py"
        )
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TideError(f"unreadable {path}: {exc}") from exc


# --- engine inputs (pure) ---------------------------------------------------------------------------------
def engine_inputs(
    batch: PackedBatch, table: PagedSlotTable, num_layers: int, pool_pointer: int, pool_mapping_rank: int = 1
) -> dict[str, torch.Tensor]:
    """Every named input of a TensorRT-LLM decoder engine (packed input, paged KV, GPT attention plugin),
    as CPU tensors; `_TrtSession` moves the non-host ones to the GPU. B = requests, N = tokens."""
    b = batch.batch_size
    offsets = kv_block_offsets(batch, table, num_layers)  # [1, B, 2, M]
    if pool_mapping_rank == 1:
        mapping = torch.zeros(num_layers, dtype=torch.int32)  # [L] pool of each layer
    else:
        mapping = torch.stack(
            [torch.zeros(num_layers, dtype=torch.int32), torch.arange(num_layers, dtype=torch.int32)], dim=1
        )  # [L, 2] (pool, layer in pool)
    return {
        "input_ids": batch.input_ids,  # [N]
        "position_ids": batch.position_ids,  # [N]
        "last_token_ids": batch.last_token_ids,  # [B]
        "kv_cache_block_offsets": offsets,
        "host_kv_cache_block_offsets": offsets.clone(),
        "host_kv_cache_pool_pointers": torch.tensor([[pool_pointer, 0]], dtype=torch.int64),  # [1, 2]
        "host_kv_cache_pool_mapping": mapping,
        "sequence_length": batch.sequence_lengths,  # [B]
        "host_request_types": batch.request_types,  # [B]
        "host_past_key_value_lengths": batch.past_kv_lengths,  # [B]
        "context_lengths": batch.context_lengths,  # [B]
        "host_context_lengths": batch.context_lengths.clone(),  # [B]
        "host_max_attention_window_sizes": torch.full((num_layers,), table.max_seq_len, dtype=torch.int32),
        "host_sink_token_length": torch.zeros(1, dtype=torch.int32),
        "host_runtime_perf_knobs": torch.full((16,), -1, dtype=torch.int64),  # -1 = plugin defaults
        "host_context_progress": torch.zeros(1, dtype=torch.int64),
        "cache_indirection": torch.zeros((b, 1, table.max_seq_len), dtype=torch.int32),  # beam width 1
    }


# --- thin TensorRT layer (needs a GPU; not run in CI) ------------------------------------------------------
class EngineRuntime(Protocol):
    """The one seam between this backend and TensorRT: a loaded engine that runs a step from named tensors.

    `_TrtSession` is the real one (GPU). Everything on the other side of it — manifest, slots, token budget,
    packing, engine inputs, unpacking — is ours and runs on CPU in the tests.
    """

    outputs: list[str]

    def input_rank(self, name: str) -> int: ...

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


class _TrtSession:
    """One deserialized engine + execution context; runs a step from a dict of named torch tensors."""

    def __init__(self, trt: Any, engine: Any, device: str):
        self.trt = trt
        self.device = torch.device(device)
        self.engine = engine
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    @classmethod
    def deserialize(cls, trt: Any, engine_bytes: bytes, device: str) -> _TrtSession:
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(engine_bytes)
        if engine is None:
            raise TideError(
                "TensorRT could not deserialize the engine (plugin library not loaded, or a "
                "TensorRT version other than the one that built it)"
            )
        session = cls(trt, engine, device)
        session.runtime = runtime  # type: ignore[attr-defined]  # kept alive with its engine (no other use)
        return session

    def input_rank(self, name: str) -> int:
        return len(self.engine.get_tensor_shape(name))

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        trt = self.trt
        unknown = sorted(set(self.inputs) - set(feeds))
        if unknown:
            raise TideError(
                f"the engine needs inputs this backend does not produce: {unknown} (built with "
                "options builders/build_target_engine.py does not set?)"
            )
        keep = []  # host/device copies must outlive the enqueued step
        out: dict[str, torch.Tensor] = {}
        stream = torch.cuda.current_stream(
            self.device
        )  # the step runs on torch's stream: no cross-stream reuse
        for name in self.inputs:
            t = feeds[name]
            if self.engine.get_tensor_location(name) == trt.TensorLocation.DEVICE:
                t = t.to(self.device, non_blocking=True)
            t = t.contiguous()
            keep.append(t)
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise TideError(f"engine rejected shape {tuple(t.shape)} for input {name!r}")
            self.context.set_tensor_address(name, t.data_ptr())
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(name))
            out[name] = torch.empty(shape, dtype=dtype, device=self.device)
            self.context.set_tensor_address(name, out[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise TideError("TensorRT-LLM engine step failed (see the TensorRT log above)")
        stream.synchronize()  # host inputs (lengths, request types) must outlive the step
        del keep
        return out


def _torch_dtype(trt: Any, dt: Any) -> torch.dtype:
    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bfloat16: torch.bfloat16,
        trt.int32: torch.int32,
        trt.int64: torch.int64,
        trt.int8: torch.int8,
        trt.bool: torch.bool,
    }
    if dt not in table:
        raise TideError(f"unsupported engine tensor dtype {dt}")
    return table[dt]


def load_capture_plugin(trt: Any, library: str) -> None:
    """Register TideHiddenCapture's creator with TensorRT's plugin registry (library exports getCreators)."""
    if not library or not Path(library).is_file():
        raise TideError(
            f"capture plugin library not found: {library!r} (build plugins/hidden_capture with CMake)"
        )
    trt.get_plugin_registry().load_library(str(library))


def _require_cuda_device(cfg: EngineConfig) -> None:
    if not cfg.device.startswith("cuda"):
        raise TideError(
            f"engine.backend=trtllm runs on an NVIDIA GPU: set engine.device to 'cuda' (got {cfg.device!r})"
        )


class TrtllmTargetEngine(TargetEngine):
    """TargetEngine over a TensorRT-LLM engine with the hidden-capture plugin; torch's slot semantics.

    `runtime`: None (serving) loads TensorRT, the capture plugin and `rank0.engine` from the engine directory;
    anything else is used as the loaded engine (the `EngineRuntime` seam; validation scripts and CPU tests).
    The manifest is read and checked either way.
    """

    def __init__(
        self,
        ckpt: Any,
        cfg: EngineConfig,
        tokenizer: object | None = None,
        engine_dir: str | Path | None = None,
        cache_dir: str = "",
        runtime: EngineRuntime | None = None,
    ):
        trt = None
        if runtime is None:
            trt, trtllm = require_trtllm()
            check_supported_versions(str(trtllm.__version__), str(trt.__version__))  # 1.2.1's engine inputs
            _require_cuda_device(cfg)
        arch = ckpt.arch
        capture = tuple(cfg.capture_layers) if cfg.capture_layers else default_capture_layers(arch.num_layers)
        if len(capture) != 3 or any(not 0 <= c <= arch.num_layers for c in capture):
            raise TideError(
                f"capture_layers must be 3 layer indices in [0, {arch.num_layers}], got {list(capture)}"
            )
        directory = Path(engine_dir) if engine_dir else engine_dir_for(ckpt.fingerprint, cfg, cache_dir)
        manifest = read_manifest(directory)
        check_engine_manifest(manifest, ckpt.fingerprint, cfg, capture)
        self._max_num_tokens = effective_max_num_tokens(manifest, cfg)
        if runtime is None:
            if manifest.get("capture_impl", "plugin") == "plugin":
                load_capture_plugin(
                    trt, os.environ.get("TIDE_CAPTURE_PLUGIN", manifest.get("plugin_library", ""))
                )
            engine_file = directory / "rank0.engine"
            if not engine_file.is_file():
                raise TideError(f"{engine_file} missing (tensor-parallel engines are not supported)")
            runtime = _TrtSession.deserialize(trt, engine_file.read_bytes(), cfg.device)
        self.session: EngineRuntime = runtime
        self.capture_output = str(manifest.get("capture_output", CAPTURE_OUTPUT))
        if self.capture_output not in self.session.outputs or "logits" not in self.session.outputs:
            raise TideError(f"engine outputs {self.session.outputs} lack 'logits' or {self.capture_output!r}")
        self.dtype = DTYPES[cfg.dtype]
        self.device = cfg.device
        self.arch = arch
        self.capture_layers = capture
        self.tokenizer = tokenizer
        self.checkpoint_dir = ckpt.path  # as TorchTargetEngine (benchmarks compare against HF on it)
        self.slots = PagedSlotTable(
            cfg.max_batch_size,
            cfg.max_seq_len,
            int(manifest.get("tokens_per_block", DEFAULT_TOKENS_PER_BLOCK)),
        )
        per_block = arch.num_layers * 2 * self.slots.tokens_per_block * arch.num_kv_heads * arch.head_dim
        self.pool = torch.empty(
            (self.slots.num_blocks, per_block), dtype=self.dtype, device=cfg.device
        )  # [blocks, L * 2 * tokens_per_block * Hkv * D] the paged KV pool (layer-within-block layout)
        self._mapping_rank = self.session.input_rank("host_kv_cache_pool_mapping")
        st = ckpt.state
        self._embed = st["model.embed_tokens.weight"].to(cfg.device, self.dtype)  # [V, H]
        head = (
            "lm_head.weight"
            if "lm_head.weight" in st and not arch.tie_word_embeddings
            else "model.embed_tokens.weight"
        )
        self._lm_head = st[head].to(cfg.device, torch.float32)  # [V, H] fp32, as the torch engine
        self._norm = st["model.norm.weight"].to(cfg.device, self.dtype)  # [H]
        self.info = ModelInfo.from_arch(
            arch, name=ckpt.name, fingerprint=ckpt.fingerprint, capture_layers=capture, max_seq_len=cfg.max_seq_len,
            max_batch_size=cfg.max_batch_size, dtype=cfg.dtype, device=cfg.device,
        )
        log.info(
            "TensorRT-LLM target engine from %s (capture layers %s, max_num_tokens %d)",
            directory,
            list(capture),
            self._max_num_tokens,
        )

    @property
    def max_num_tokens(self) -> int:
        """Most tokens one step may carry: min(the engine's build-time max_num_tokens, engine.max_num_tokens).
        `forward_step` refuses a larger step before any TensorRT call (TokenBudgetError)."""
        return self._max_num_tokens

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, engine_cfg: EngineConfig) -> TrtllmTargetEngine:
        require_trtllm()  # fail before the (slow) checkpoint load
        _require_cuda_device(engine_cfg)
        from tide_trt.models.loader import load_checkpoint, load_tokenizer

        ckpt = load_checkpoint(model_cfg.path, model_cfg.cache_dir)
        return cls(ckpt, engine_cfg, load_tokenizer(ckpt.path), cache_dir=model_cfg.cache_dir)

    # --- slots -------------------------------------------------------------------------------------------
    def allocate_slot(self) -> int:
        return self.slots.allocate()

    def free_slot(self, slot: int) -> None:
        self.slots.free(slot)

    @property
    def num_free_slots(self) -> int:
        return self.slots.num_free

    def seq_len(self, slot: int) -> int:
        return self.slots.seq_len(slot)

    def truncate(self, slot: int, length: int) -> None:
        self.slots.truncate(slot, length)

    # --- compute -----------------------------------------------------------------------------------------
    def forward_step(self, batch: StepBatch) -> StepOutput:
        """One flat step through the engine: rows packed into TensorRT-LLM's layout (context rows first),
        outputs returned in the batch's row order. Over-budget steps raise before any engine input is built."""
        rows = batch.rows
        for r in rows:
            if r.start != self.slots.seq_len(r.slot):
                held = self.slots.seq_len(r.slot)
                raise TideError(f"row of slot {r.slot} starts at {r.start}, the slot holds {held}")
        packed = pack_batch(
            [r.slot for r in rows], batch.host_tokens(), self.slots, max_num_tokens=self.max_num_tokens
        )
        feeds = engine_inputs(packed, self.slots, self.arch.num_layers, self.pool.data_ptr(), self._mapping_rank)
        out = self.session.run(feeds)
        logits, hidden = out["logits"], out[self.capture_output]  # [N, V], [N, C, H] in packed order
        if logits.shape[0] != packed.num_tokens:
            raise TideError(
                f"engine returned {logits.shape[0]} logits rows for {packed.num_tokens} tokens "
                "(built without gather_context_logits?)"
            )
        index = caller_order_index(packed).to(logits.device)  # [N] packed row of each token in row order
        logit_index = batch.logit_index.to(logits.device)  # [M] flat token indices (row order) with logits
        result = StepOutput(
            logits.index_select(0, index).index_select(0, logit_index).float(),  # [M, V]
            hidden.index_select(0, index).to(self.dtype),  # [N, C, H]
        )
        commit(packed, self.slots)
        return result

    def embedding_weight(self) -> torch.Tensor:
        return self._embed

    def lm_head_weight(self) -> torch.Tensor:
        return self._lm_head

    def final_norm_weight(self) -> torch.Tensor:
        return self._norm

    def target_parameters(self) -> list[torch.Tensor]:
        """The target weights held as torch tensors; the rest live inside the (non-refittable) engine."""
        return [self._embed, self._lm_head, self._norm]
