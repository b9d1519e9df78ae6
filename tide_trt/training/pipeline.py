"""The corpus training pipeline: corpus -> prefill cache -> vocabulary -> head -> train -> evaluate -> write draft.

One dataclass config (`CorpusPipelineConfig`) in, one summary dict out; `tide train-draft --data corpus` only parses
its arguments into the config and calls `run_corpus_pipeline`. Each stage is a function of the config and the
previous stages' outputs, so the flow reads top to bottom in `run_corpus_pipeline`:

1. `prefill_stage`: the serving target's prefill over the corpus sequences fills the state caches (capture states,
   argmax labels, top-K soft labels; resumable by shard) — `corpus_prefill`, `state_cache`;
2. `vocabulary_stage`: the draft vocabulary — the `draft_vocab` most frequent target labels of the training shards,
   or the parent draft's (`init`) — and its coverage of the held-out labels;
3. `head_stage`: a fresh head (LM head rows from the target's) or the parent draft;
4. `train_stage`: the training-time-test objective over the shards, checkpointed, resumable exactly — `corpus_train`;
5. `evaluate_stage`: held-out simulated acceptance at each γ;
6. `write_stage`: the draft checkpoint + manifest.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tide_trt.config import EngineConfig, ModelConfig
from tide_trt.draft.eagle3 import Eagle3Head
from tide_trt.engine.base import ModelInfo
from tide_trt.errors import TideError
from tide_trt.training.corpus import TokenCorpus
from tide_trt.training.corpus_train import CorpusTrainSettings
from tide_trt.training.state_cache import DEFAULT_SOFT_TOP_K

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CorpusDataConfig:
    """Which sequences of which corpus, and how they are prefilled."""

    corpus: str
    greedy_sequences: int = 3072
    sampled_sequences: int = 0
    heldout_sequences: int = 256
    heldout_every: int = 50
    max_seq_len: int = 640
    state_cache: str = "runs/corpus_states"
    prefill_numerics: str = "serving"  # "serving" | "bf16" (corpus_prefill.prefill_engine)
    soft_top_k: int = DEFAULT_SOFT_TOP_K  # top-K soft labels stored per position


@dataclass(frozen=True)
class HeadConfig:
    init: str | None = None  # continue a draft (keeps its vocabulary and architecture)
    draft_vocab: int = 8192  # a fresh head's vocabulary size (most frequent training labels)
    capture_norm: bool = False  # a fresh head's per-capture-layer RMSNorm before the FC


@dataclass(frozen=True)
class EvalConfig:
    gammas: tuple[int, ...] = (1, 3, 5)
    sequences: int | None = None  # the first N held-out sequences only (None: all)
    every_epoch: bool = False  # held-out τ(γ=3) after every epoch (kept in the checkpoint and manifest)


@dataclass(frozen=True)
class CorpusPipelineConfig:
    model: ModelConfig
    engine: EngineConfig
    out: str
    data: CorpusDataConfig
    head: HeadConfig = field(default_factory=HeadConfig)
    train: CorpusTrainSettings = field(default_factory=CorpusTrainSettings)
    eval: EvalConfig = field(default_factory=EvalConfig)
    work_dir: str | None = None  # training checkpoints (default: <out>.work)
    resume: bool = False
    prefill_only: bool = False
    max_train_seconds: float | None = None
    max_train_steps: int | None = None
    command: str = ""  # the command line, for the manifest

    @property
    def work(self) -> Path:
        return Path(self.work_dir or f"{self.out}.work")

    def validate(self) -> None:
        d, t = self.data, self.train
        if d.greedy_sequences < 0 or d.sampled_sequences < 0 or d.greedy_sequences + d.sampled_sequences < 1:
            raise TideError("need --greedy-sequences + --sampled-sequences >= 1 (and neither negative)")
        if d.heldout_sequences < 1 or d.heldout_every < 2:
            raise TideError("need --heldout-sequences >= 1 and --heldout-every >= 2")
        if not 8 < t.chunk_len <= d.max_seq_len:
            raise TideError("need 8 < --chunk-len <= --max-seq-len")
        if t.loss not in ("soft", "hard"):
            raise TideError(f"--loss must be soft or hard, got {t.loss!r}")
        if d.soft_top_k < 1:
            raise TideError("need --soft-top-k >= 1")
        if t.grad_clip <= 0 or t.lr <= 0 or not 0 <= t.min_lr_ratio <= 1:
            raise TideError("need --lr > 0, --grad-clip > 0 and 0 <= --min-lr-ratio <= 1")
        if self.engine.device.startswith("cuda") and not torch.cuda.is_available():
            raise TideError(f"--device {self.engine.device} but CUDA is not available")


# ---- stage outputs ---------------------------------------------------------------------------------------------
@dataclass
class PrefilledStates:
    corpus: TokenCorpus
    train: list[Path]  # shard paths, greedy then sampled
    heldout: list[Path]
    info: ModelInfo
    engine: Any  # the prefill engine (TorchTargetEngine); dropped before training to free its RAM
    seconds: float


@dataclass(frozen=True)
class Vocabulary:
    d2t: torch.Tensor  # [Vd] draft id -> target id
    t2d: torch.Tensor  # [V] target id -> draft id or -1
    coverage: float  # share of held-out labels (answer positions) inside the vocabulary
    source: str  # "corpus" (rebuilt from the training labels) or "init" (the parent's)


# ---- stages ------------------------------------------------------------------------------------------------------
def prefill_stage(cfg: CorpusPipelineConfig) -> PrefilledStates:
    from tide_trt.training.corpus import load_corpus
    from tide_trt.training.corpus_prefill import prefill_corpus, prefill_engine

    d = cfg.data
    corpus = load_corpus(d.corpus)
    t0 = time.perf_counter()
    engine = prefill_engine(cfg.model, cfg.engine, d.prefill_numerics, d.max_seq_len)  # type: ignore[arg-type]
    common: dict[str, Any] = {"numerics": d.prefill_numerics, "heldout_every": d.heldout_every,
                              "max_len": d.max_seq_len, "soft_top_k": d.soft_top_k}
    heldout = prefill_corpus(engine, corpus, "greedy", "heldout", d.heldout_sequences, d.state_cache, **common)
    train: list[Path] = []
    for kind, n in (("greedy", d.greedy_sequences), ("sampled", d.sampled_sequences)):
        if n:
            train += prefill_corpus(engine, corpus, kind, "train", n, d.state_cache, **common)
    return PrefilledStates(corpus, train, heldout, engine.info, engine, time.perf_counter() - t0)


def label_coverage(counts: torch.Tensor, d2t: torch.Tensor) -> float:
    """Share of the labels counted in `counts` [V] whose token is in the vocabulary `d2t` [Vd]."""
    return float(counts[d2t].sum() / counts.sum().clamp(min=1))


def vocabulary_stage(cfg: CorpusPipelineConfig, states: PrefilledStates) -> Vocabulary:
    from tide_trt.runtime import resolve_draft_path
    from tide_trt.training.state_cache import shard_label_counts
    from tide_trt.training.vocab import build_draft_vocab, t2d_from_d2t

    v = states.info.vocab_size
    heldout_counts = shard_label_counts(states.heldout, v)  # [V]
    if cfg.head.init:
        init = resolve_draft_path(cfg.head.init)
        if init is None:
            raise TideError("--init needs a draft checkpoint directory or a shipped draft name")
        with safe_open(str(Path(init) / "model.safetensors"), "pt") as f:
            d2t = f.get_tensor("d2t").long()
        vocab = Vocabulary(d2t, t2d_from_d2t(d2t, v), label_coverage(heldout_counts, d2t), "init")
    else:
        counts = shard_label_counts(states.train, v)
        d2t, t2d = build_draft_vocab(counts, cfg.head.draft_vocab)
        vocab = Vocabulary(d2t, t2d, label_coverage(heldout_counts, d2t), "corpus")
    log.info("draft vocabulary (%s): %d tokens cover %.4f of the held-out labels", vocab.source, vocab.d2t.numel(),
             vocab.coverage)
    return vocab


def head_stage(cfg: CorpusPipelineConfig, states: PrefilledStates, vocab: Vocabulary
               ) -> tuple[Eagle3Head, dict[str, Any]]:
    """(head in float32, parent manifest): the parent draft (`init`) or a fresh head on `vocab`."""
    from tide_trt.draft.checkpoint import load_draft
    from tide_trt.runtime import resolve_draft_path
    from tide_trt.training.offline import new_head

    if cfg.head.init:
        head, parent = load_draft(resolve_draft_path(cfg.head.init), states.info,  # type: ignore[arg-type]
                                  states.engine.embedding_weight())
        return head.float(), parent
    torch.manual_seed(cfg.train.seed)
    return new_head(states.engine, vocab.d2t, capture_norm=cfg.head.capture_norm), {}


def train_stage(cfg: CorpusPipelineConfig, head: Eagle3Head, vocab: Vocabulary, states: PrefilledStates
                ) -> dict[str, Any]:
    from tide_trt.training.corpus_train import evaluate_shards, train_on_shards

    meta = {"corpus": str(states.corpus.path), "corpus_sha256_16": states.corpus.fingerprint,
            "init": cfg.head.init, "draft_vocab": int(vocab.d2t.numel()), "capture_norm": head.cfg.capture_norm,
            "soft_top_k": cfg.data.soft_top_k}

    def epoch_eval(epoch: int, h: Eagle3Head) -> dict:
        r = evaluate_shards(h, vocab.t2d, states.heldout, cfg.train.device, (3,),
                            max_sequences=cfg.eval.sequences)["3"]
        log.info("epoch %d: held-out τ(γ=3) %.3f, α %.3f", epoch + 1, r.tau, r.alpha)
        return {"tau_gamma3": r.tau, "alpha_gamma3": r.alpha}

    return train_on_shards(head, vocab.t2d, states.train, cfg.train, cfg.work, resume=cfg.resume, meta=meta,
                           max_seconds=cfg.max_train_seconds, max_steps=cfg.max_train_steps,
                           on_epoch_end=epoch_eval if cfg.eval.every_epoch else None)


def evaluate_stage(cfg: CorpusPipelineConfig, head: Eagle3Head, vocab: Vocabulary, heldout: list[Path]
                   ) -> dict[str, dict]:
    from tide_trt.training.corpus_train import evaluate_shards

    report = evaluate_shards(head, vocab.t2d, heldout, cfg.train.device, cfg.eval.gammas,
                             max_sequences=cfg.eval.sequences)
    return {g: r.as_dict() for g, r in report.items()}


def write_stage(cfg: CorpusPipelineConfig, head: Eagle3Head, manifest: dict[str, Any]) -> Path:
    from tide_trt.draft.checkpoint import save_draft

    head.to("cpu", torch.bfloat16)
    return save_draft(head, cfg.out, manifest)


def build_manifest(cfg: CorpusPipelineConfig, head: Eagle3Head, states: PrefilledStates, vocab: Vocabulary,
                   parent: dict[str, Any], history: dict[str, Any], heldout: dict[str, dict]) -> dict[str, Any]:
    d = cfg.data
    return {
        "version": 0, "parent": cfg.head.init, "parent_manifest_command": parent.get("command"),
        "trained_by": "tide train-draft --data corpus (tide_trt.training.pipeline, recompute path)",
        "command": cfg.command,
        "data": {"corpus": str(states.corpus.path), "corpus_sha256_16": states.corpus.fingerprint,
                 "corpus_meta": states.corpus.meta, "greedy_sequences": d.greedy_sequences,
                 "sampled_sequences": d.sampled_sequences, "heldout_sequences": d.heldout_sequences,
                 "heldout_every": d.heldout_every, "max_seq_len": d.max_seq_len,
                 "prefill_numerics": d.prefill_numerics, "soft_top_k": d.soft_top_k,
                 "train_positions": history["train_positions"], "corpus_positions": history["corpus_positions"]},
        "settings": dataclasses.asdict(cfg.train), "draft_vocab_coverage": vocab.coverage,
        "draft_vocab_source": vocab.source, "capture_norm": head.cfg.capture_norm,
        "ttt_steps": cfg.train.ttt_steps, "epochs": cfg.train.epochs, "prefill_seconds": states.seconds,
        "train_seconds_last_run": history["seconds_this_run"], "heldout_acceptance": heldout,
        "heldout_by_epoch": history["epoch_evals"], "eval_acceptance": heldout[str(cfg.eval.gammas[0])]["alpha"],
        "model_name": states.info.name, "dtype_of_signals": cfg.engine.dtype,
    }


# ---- the pipeline ------------------------------------------------------------------------------------------------
def run_corpus_pipeline(cfg: CorpusPipelineConfig) -> dict[str, Any]:
    """Run every stage (each resumes what is on disk). Returns a summary: after `prefill_only`, the shard counts;
    when a training budget stopped it, the training history (`finished` False: run again with resume); else the
    written draft's path, held-out acceptance and coverage with the history."""
    cfg.validate()
    states = prefill_stage(cfg)
    if cfg.prefill_only:
        return {"train_shards": len(states.train), "heldout_shards": len(states.heldout), "seconds": states.seconds}
    vocab = vocabulary_stage(cfg, states)
    head, parent = head_stage(cfg, states, vocab)
    states.engine = None  # the target's weights are not needed for training: free the RAM
    history = train_stage(cfg, head, vocab, states)
    if not history["finished"]:
        log.info("stopped at step %d of %d: run the same command with --resume to continue", history["step"],
                 history["total_steps"])
        return history
    heldout = evaluate_stage(cfg, head, vocab, states.heldout)
    out = write_stage(cfg, head, build_manifest(cfg, head, states, vocab, parent, history, heldout))
    return {"out": str(out), "heldout": heldout, "coverage": vocab.coverage, **history}
