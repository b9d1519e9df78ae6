"""Prefill a token corpus into state caches: one cache directory per (split, answer kind), grown by shards.

`<cache_root>/<split>_<kind>/` holds the capture states and the target's labels of the first N sequences of that
split and kind (see `state_cache`). Keeping kinds apart lets one prefill serve every data mix (greedy only,
greedy + sampled) and lets a later run ask for more sequences without redoing the ones on disk.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Literal

import torch

from tide_trt.config import EngineConfig, ModelConfig
from tide_trt.engine.torch_engine import TorchTargetEngine
from tide_trt.errors import TideError
from tide_trt.models.loader import load_checkpoint
from tide_trt.training.corpus import TokenCorpus, select_sequences
from tide_trt.training.state_cache import DEFAULT_SOFT_TOP_K, build_state_cache

log = logging.getLogger(__name__)

PrefillNumerics = Literal["serving", "bf16"]


def prefill_engine(model: ModelConfig, engine: EngineConfig, numerics: PrefillNumerics, max_len: int,
                   max_batch: int = 8) -> TorchTargetEngine:
    """A target engine for bulk prefill on `engine.device`.

    numerics "serving": the serving engine's numbers. On CPU that is bf16 weights with float32 products
    (the native kernel's math, run through PyTorch's float32 GEMM: labels identical, 3x faster); on CUDA the
    configured dtype. With `engine.weights` q4_1 / q8_0 (GGUF blocks), "serving" runs float32 copies of exactly the
    blocks' values through the same GEMM. "bf16": bf16 end to end (AMX / tensor cores): ~2x faster again on CPUs
    with AMX, but ~1 % of labels flip at near-ties (measured on the default model), so the draft learns slightly
    different numbers. The cache records which weights it used (`cache_identity`'s "weights").
    """
    if numerics not in ("serving", "bf16"):
        raise TideError(f"prefill numerics must be 'serving' or 'bf16', got {numerics!r}")
    cfg = dataclasses.replace(engine, max_batch_size=max_batch, max_seq_len=max_len + 8)
    if numerics == "bf16":
        cfg = dataclasses.replace(cfg, dtype="bfloat16", cpu_kernels="off", weights="bf16")
    eng = TorchTargetEngine(load_checkpoint(model.path, model.cache_dir), cfg)  # token ids in, no tokenizer
    eng.use_prefill_linears()
    return eng


def cache_identity(corpus: TokenCorpus, eng: TorchTargetEngine, numerics: str, kind: str, split: str,
                   heldout_every: int, max_len: int, shard_sequences: int) -> dict:
    return {"corpus": str(corpus.path.name), "corpus_sha256_16": corpus.fingerprint, "kind": kind, "split": split,
            "heldout_every": heldout_every, "max_len": max_len, "shard_sequences": shard_sequences,
            "target": eng.info.fingerprint, "capture_layers": list(eng.info.capture_layers),
            "numerics": numerics, "weights": weights_label(eng), "device_type": torch.device(eng.info.device).type}


def weights_label(eng: TorchTargetEngine) -> str:
    """Which target weights produced a cache's labels and states: the dtype for bf16-mode engines ("bfloat16",
    "float32"), else the GGUF block format ("q4_1", "q8_0": engine.weights)."""
    return eng.info.dtype if eng.info.weights == "bf16" else eng.info.weights


def prefill_corpus(eng: TorchTargetEngine, corpus: TokenCorpus, kind: str, split: Literal["train", "heldout"],
                   num_sequences: int, cache_root: str | Path, *, numerics: str, heldout_every: int,
                   max_len: int, shard_sequences: int = 256, batch_tokens: int = 4096,
                   soft_top_k: int = DEFAULT_SOFT_TOP_K, progress: bool = True) -> list[Path]:
    """The shard paths holding the first `num_sequences` sequences of (split, kind), prefilling what is missing."""
    seqs = select_sequences(corpus, kind, split, heldout_every, limit=num_sequences, max_len=max_len)
    if not seqs:
        raise TideError(f"{corpus.path}: no {kind} sequences in the {split} split")
    root = Path(cache_root) / f"{split}_{kind}"
    identity = cache_identity(corpus, eng, numerics, kind, split, heldout_every, max_len, shard_sequences)
    return build_state_cache(eng, seqs, root, identity, shard_sequences=shard_sequences, batch_tokens=batch_tokens,
                             progress=progress, soft_top_k=soft_top_k)
