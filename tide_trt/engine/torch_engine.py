"""PyTorch backend of TargetEngine: the reference engine on CPU or CUDA."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from tide_trt.config import EngineConfig, ModelConfig
from tide_trt.engine.base import DTYPES, ModelInfo, TargetEngine, default_capture_layers
from tide_trt.engine.cuda_graphs import GraphCache
from tide_trt.engine.kv_cache import KVCache
from tide_trt.engine.slots import SlotTable
from tide_trt.engine.step_batch import StepBatch, StepOutput
from tide_trt.errors import TideError
from tide_trt.models.gguf_weights import QuantWeight, auto_format, find_gguf, gguf_linear_types, load_quant_linears
from tide_trt.models.llama import LlamaModel, LlamaWeights
from tide_trt.models.loader import LoadedCheckpoint, load_checkpoint, load_tokenizer
from tide_trt.models.static_forward import padded_size, static_forward

log = logging.getLogger(__name__)


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise TideError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def use_native_linears(cfg: EngineConfig) -> bool:
    """bf16 weights on CPU run in the native kernel with float32 activations, unless turned off or unbuildable
    (`engine.cpu_kernels` is auto | off, validated by the config)."""
    if cfg.cpu_kernels == "off" or cfg.device != "cpu" or cfg.dtype != "bfloat16":
        return False
    from tide_trt.kernels.linear import native_linears_available

    return native_linears_available()


def resolve_weights(cfg: EngineConfig, ckpt: LoadedCheckpoint) -> tuple[str, dict[str, QuantWeight] | None]:
    """engine.weights -> (the format served, the quantized linears or None for bf16), logged with where each
    linear's blocks came from. Without the native GGUF kernel, quantized formats fall back to float32 copies of
    the same values (logged)."""
    fmt: str = cfg.weights
    gguf = find_gguf(ckpt.path) if fmt != "bf16" and cfg.device == "cpu" else None
    if fmt == "auto":
        fmt = auto_format(gguf, ckpt.arch) if cfg.device == "cpu" else "bf16"
        kinds = sorted(set(gguf_linear_types(gguf, ckpt.arch).values())) if gguf is not None else []
        log.info("engine.weights auto -> %s (%s)", fmt,
                 f"{gguf.name} holds linears in {', '.join(kinds)}" if gguf is not None else "no GGUF file")
    if fmt == "bf16":
        return "bf16", None
    head = "lm_head.weight" if ("lm_head.weight" in ckpt.state and not ckpt.arch.tie_word_embeddings) \
        else "model.embed_tokens.weight"
    quant, sources = load_quant_linears(ckpt.state, ckpt.arch, fmt, gguf, head)  # type: ignore[arg-type]
    lm = quant["lm_head.weight"]
    log.info("engine.weights %s: linears from %s (%s); LM head %s [%s]; embeddings and norms float32", fmt,
             gguf.name if gguf is not None else "the checkpoint (no GGUF file)",
             ", ".join(f"{n} {src}" for src, n in sorted(sources.items())), lm.fmt, lm.source)
    if any(src.startswith("quantized") for src in sources):
        log.warning("engine.weights %s: %d linears were quantized on load (lossy: not the file's own numbers)", fmt,
                    sum(n for src, n in sources.items() if src.startswith("quantized")))
    from tide_trt.kernels.linear import quant_kernel_available

    if not quant_kernel_available():
        log.warning("engine.weights %s: the GGUF-block CPU kernel is not available here; serving float32 copies of "
                    "the same values through PyTorch matmuls (not batch-invariant)", fmt)
    return fmt, quant


def graph_step_tokens(cfg: EngineConfig, gamma_max: int) -> int:
    """The largest padded step CUDA graphs are captured for: a full batch (`engine.max_batch_size` rows) each
    verifying `gamma_max` drafts (`draft.gamma_max`, as configured), within the token budget
    (`engine.max_num_tokens`). Larger steps (prompt chunks) run the same fixed-shape function eagerly."""
    if gamma_max < 0:
        raise TideError(f"gamma_max must be >= 0, got {gamma_max}")
    return padded_size(min(cfg.max_num_tokens, cfg.max_batch_size * (gamma_max + 1)))


class TorchTargetEngine(TargetEngine):
    def __init__(self, ckpt: LoadedCheckpoint, cfg: EngineConfig, tokenizer: object | None = None, *,
                 gamma_max: int = 0):
        """`gamma_max`: the longest draft a step verifies (`draft.gamma_max`; 0: plain decoding only), which
        sizes the CUDA graphs (`graph_step_tokens`); `from_config` / `runtime.build_engine` pass the configured
        value."""
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise TideError(f"engine.device={cfg.device} but CUDA is not available")
        if cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)
        arch = ckpt.arch
        dtype = parse_dtype(cfg.dtype)
        capture = tuple(cfg.capture_layers) if cfg.capture_layers else default_capture_layers(arch.num_layers)
        if len(capture) != 3 or any(not 0 <= c <= arch.num_layers for c in capture):
            raise TideError(f"capture_layers must be 3 layer indices in [0, {arch.num_layers}], got {list(capture)}")
        if cfg.max_batch_size < 1 or cfg.max_seq_len < 8:
            raise TideError("engine.max_batch_size must be >= 1 and engine.max_seq_len >= 8")
        weights, blocks = resolve_weights(cfg, ckpt)
        quant: dict[str, torch.Tensor | QuantWeight] | None = None
        native = False
        if blocks is not None:
            from tide_trt.kernels.linear import quant_kernel_available

            native = quant_kernel_available()
            # without the kernel: the same values as float32 tensors
            quant = dict(blocks) if native else {name: w.dequantize() for name, w in blocks.items()}
        else:
            native = use_native_linears(cfg)
        compute = torch.float32 if native or quant is not None else dtype
        self.arch = arch
        self.dtype = compute  # activations, KV cache, captured states
        self.device = cfg.device
        self.weights = LlamaWeights(arch, ckpt.state, dtype, cfg.device, compute_dtype=compute, quant=quant)
        self.model = LlamaModel(arch, self.weights, cfg.max_seq_len, compute, cfg.device)
        on_cuda = cfg.device.startswith("cuda")
        # fixed-shape steps: batch-invariant numerics, and the shape CUDA graphs need
        self.static_steps = cfg.batch_invariant == "on" or (on_cuda and not native and (
            cfg.batch_invariant == "auto" or cfg.cuda_graphs))
        self.scratch_slot = cfg.max_batch_size  # padding tokens of fixed-shape steps write here; no sequence owns it
        self.cache = KVCache(arch.num_layers, cfg.max_batch_size + int(self.static_steps), arch.num_kv_heads,
                             cfg.max_seq_len, arch.head_dim, compute, cfg.device)
        self.capture_layers = capture
        self.tokenizer = tokenizer
        self.checkpoint_dir = ckpt.path
        self.info = ModelInfo.from_arch(
            arch, name=ckpt.name, fingerprint=ckpt.fingerprint, capture_layers=capture, max_seq_len=cfg.max_seq_len,
            max_batch_size=cfg.max_batch_size, dtype=cfg.dtype, device=cfg.device, native_linears=native,
            weights=weights)
        self._max_num_tokens = cfg.max_num_tokens
        # steps up to a full batch verifying γ_max drafts replay a CUDA graph per padded size; larger ones (prompt
        # chunks) run the same fixed-shape function eagerly
        self.graph_max_tokens = graph_step_tokens(cfg, gamma_max)
        self.graphs = GraphCache(self._static_step, cfg.device, enabled=self.static_steps and cfg.cuda_graphs,
                                 name="target step")
        log.info("torch engine: %s weights, %s activations%s%s%s", cfg.dtype if weights == "bf16" else weights,
                 str(compute).removeprefix("torch."), " (native CPU kernel)" if native else "",
                 ", fixed-shape batch-invariant steps" if self.static_steps else "",
                 ", CUDA graphs" if self.graphs.enabled else "")
        self.slots = SlotTable(cfg.max_batch_size)

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, engine_cfg: EngineConfig, gamma_max: int = 0) -> TorchTargetEngine:
        """`gamma_max`: `draft.gamma_max` of the configuration (sizes the CUDA graphs; 0: plain decoding only)."""
        ckpt = load_checkpoint(model_cfg.path, model_cfg.cache_dir)
        return cls(ckpt, engine_cfg, load_tokenizer(ckpt.path), gamma_max=gamma_max)

    # --- slots -------------------------------------------------------------------------------------------
    def allocate_slot(self) -> int:
        return self.slots.allocate()

    def free_slot(self, slot: int) -> None:
        self.slots.free(slot)

    @property
    def num_free_slots(self) -> int:
        return self.slots.num_free

    supports_compaction = True

    def move_slot(self, src: int, dst: int) -> None:
        """Move a live sequence from slot src to the free slot dst (keeps running batches contiguous, so the
        KV cache is read through views instead of gathers)."""
        length = self.slots.move(src, dst)
        self.cache.move(src, dst, length)

    def seq_len(self, slot: int) -> int:
        return self.slots.seq_len(slot)

    def truncate(self, slot: int, length: int) -> None:
        self.slots.truncate(slot, length)

    # --- compute -----------------------------------------------------------------------------------------
    def forward_step(self, batch: StepBatch) -> StepOutput:
        for row in batch.rows:
            if row.start != self.slots.seq_len(row.slot):
                raise ValueError(f"row of slot {row.slot} starts at {row.start}; the slot holds "
                                 f"{self.slots.seq_len(row.slot)} tokens")
            if row.start + row.num_tokens > self.info.max_seq_len:
                raise TideError(f"sequence in slot {row.slot} would exceed max_seq_len={self.info.max_seq_len}")
        if self.static_steps:
            logits, hidden = self._forward_static(batch)
        else:
            logits, hidden = self.model.forward(self.cache, batch, self.capture_layers)
        for row in batch.rows:
            self.slots.advance(row.slot, row.num_tokens)
        return StepOutput(logits, hidden)

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.graphs.enabled

    @property
    def max_num_tokens(self) -> int:
        """engine.max_num_tokens: the step loop's token budget (a scheduling bound; this engine has no hard one)."""
        return self._max_num_tokens

    def _forward_static(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The step padded to a multiple of the tile (padding -> the scratch slot), run by the fixed-shape forward
        (replayed from a CUDA graph when captured). Returns (logits [M, V], hidden [N, C, H])."""
        n = batch.num_tokens
        pad = padded_size(n) - n
        ids = F.pad(batch.token_ids, (0, pad))  # [P]
        pos = F.pad(batch.positions, (0, pad))
        slots = F.pad(batch.token_slots, (0, pad), value=self.scratch_slot)
        if n + pad <= self.graph_max_tokens:
            logits, hidden = self.graphs.run(n + pad, ids, pos, slots)  # [P, V], [P, C, H]
        else:
            logits, hidden = self._static_step(ids, pos, slots)
        return logits[batch.logit_index], hidden[:n]

    def _static_step(self, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        return static_forward(self.model, self.cache, ids, pos, slots, self.capture_layers)

    def use_prefill_linears(self) -> None:
        """Bulk-prefill mode for training data: with native linears, run float32 copies of the bf16 weights
        through PyTorch's GEMM (same values and accumulation dtype as serving, measured label agreement 100 %,
        ~3x the prefill throughput). Not batch-invariant: an engine in this mode must not serve."""
        if self.info.native_linears:
            self.weights.upcast_linears()

    def embedding_weight(self) -> torch.Tensor:
        return self.weights.embed

    def lm_head_weight(self) -> torch.Tensor:
        head = self.weights.lm_head
        return head.dequantize() if isinstance(head, QuantWeight) else head

    def final_norm_weight(self) -> torch.Tensor:
        return self.weights.norm

    def target_parameters(self) -> list[torch.Tensor]:
        return self.weights.parameters()
