"""The online trainer (its own process: `tide train`): signal store -> training rounds -> draft store.

Loop (Algorithm 1, trainer side): wait until the signal store holds ≥ N_threshold (`min_new_tokens`) new
label tokens in shards no round has consumed; split them by request into train / held-out; fine-tune the
current draft (pin or latest version, else the base draft) with the training-time-test loss, labels = the
next stored tokens (the target's own outputs); evaluate old and new draft by simulated greedy chain
drafting on the held-out requests; publish a new version only if its per-token acceptance beats the mean
acceptance served requests saw in the training data (TrainingGate margin); log the round either way. With a
hybrid drafter (`draft.suffix`, `trainer.hybrid_gate`) served acceptance mixes index rows in, so both heads are
evaluated where the replayed suffix index leaves positions to the head (online/index_replay.py) and the old head
there is the baseline: the gate judges what serving would gain.

State lives in the stores only (rounds.jsonl lists consumed shards; manifest.jsonl lists versions), so a
killed trainer restarts where it was: an unfinished round is redone, published versions are untouched.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import threading
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from tide_trt.config import TideConfig, TrainerConfig
from tide_trt.draft.checkpoint import load_draft, read_draft_config, save_draft
from tide_trt.draft.eagle3 import Eagle3Head
from tide_trt.draft.suffix import SuffixDrafter, build_suffix_drafter
from tide_trt.engine.base import ModelInfo, default_capture_layers
from tide_trt.errors import CheckpointError, TideError
from tide_trt.kernels import fast_bf16_matmul
from tide_trt.online.drift import Decision, TrainingGate
from tide_trt.online.index_replay import IndexReplay, replay_index
from tide_trt.online.rounds import RoundRecord
from tide_trt.online.signals import STORE_DTYPES, SignalSequence, read_shard
from tide_trt.online.store import DraftStore, SignalStore
from tide_trt.training.ttt import Batch, ChainAcceptance, collate, simulated_acceptance, ttt_loss
from tide_trt.training.vocab import t2d_from_d2t

log = logging.getLogger(__name__)

Chunk = tuple[torch.Tensor, list[int], list[int]]  # (hidden [T, C, H], tokens [T], labels [T])


# ---- training math (pure functions over SignalSequence records) -------------------------------------------
def chunk_spans(seqs: list[SignalSequence], chunk_len: int, train_on_prompt: bool) -> list[tuple[int, int, int]]:
    """Where sequences are cut into chunks: (sequence index, start row, end row) of every chunk with a label."""
    out = []
    for i, s in enumerate(seqs):
        lab = s.labels(train_on_prompt).tolist()
        for a in range(0, len(lab), chunk_len):
            b = min(len(lab), a + chunk_len)
            if b - a >= 4 and any(x >= 0 for x in lab[a + 1 : b]):
                out.append((i, a, b))
    return out


def make_chunks(seqs: list[SignalSequence], chunk_len: int, train_on_prompt: bool) -> list[Chunk]:
    """Cut sequences into training chunks (labels = next stored token; -1 = no label)."""
    labels = [s.labels(train_on_prompt).tolist() for s in seqs]
    tokens = [s.token_ids.tolist() for s in seqs]
    return [(seqs[i].hidden[a:b], tokens[i][a:b], labels[i][a:b])
            for i, a, b in chunk_spans(seqs, chunk_len, train_on_prompt)]


def _to(batch: Batch, device: str) -> Batch:
    return Batch(batch.hidden.to(device).float(), batch.tokens.to(device), batch.labels.to(device),
                 batch.lengths.to(device))


def evaluate(head: Eagle3Head, chunks: list[Chunk], t2d: torch.Tensor, gamma: int, device: str,
             batch_size: int = 8, bases: list[torch.Tensor] | None = None) -> ChainAcceptance:
    """Held-out simulated acceptance over `chunks` (ttt.simulated_acceptance summed over batches): α, τ, counts.
    `bases`: per chunk [T] bool, the positions that may be chain bases (None: all)."""
    head.eval()
    total = ChainAcceptance(gamma)
    for i in range(0, len(chunks), batch_size):
        batch = _to(collate(chunks[i : i + batch_size]), device)
        mask = None
        if bases is not None:
            mask = torch.zeros(batch.tokens.shape, dtype=torch.bool)  # [B, T]
            for j, m in enumerate(bases[i : i + batch_size]):
                mask[j, : m.numel()] = m
        total += simulated_acceptance(head, batch, t2d, gamma, mask)
    return total


def fit(head: Eagle3Head, chunks: list[Chunk], t2d: torch.Tensor, tc: TrainerConfig, *, seed: int = 0,
        stop: threading.Event | None = None) -> dict[str, Any]:
    """Fine-tune `head` in place (AdamW, warm-up + cosine, bf16 autocast if configured)."""
    steps = max(1, min(tc.steps_per_round, math.ceil(len(chunks) * tc.epochs_per_round / tc.batch_size)))
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / 10) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / steps)))
    )
    rng = random.Random(seed)
    order: list[int] = []
    dev_type = torch.device(tc.device).type
    head.train()
    t0 = time.perf_counter()
    losses: list[float] = []
    done = 0
    use_autocast = tc.autocast and (dev_type == "cuda" or fast_bf16_matmul())  # AVX2-only CPUs: bf16 is slower
    for _ in range(steps):
        if stop is not None and stop.is_set():
            raise InterruptedError("trainer stopping")
        if tc.max_round_seconds > 0 and time.perf_counter() - t0 > tc.max_round_seconds:
            log.info("round time budget (%.0f s) reached after %d steps", tc.max_round_seconds, done)
            break
        if len(order) < tc.batch_size:
            fresh = list(range(len(chunks)))
            rng.shuffle(fresh)
            order.extend(fresh)
        batch = _to(collate([chunks[i] for i in order[: tc.batch_size]]), tc.device)
        del order[: tc.batch_size]
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=use_autocast):
            loss = ttt_loss(head, batch, t2d, tc.ttt_steps, with_accuracy=False)[0]
        opt.zero_grad(set_to_none=True)
        if not loss.requires_grad:  # no label of this batch is in the draft vocabulary: nothing to learn from
            done += 1
            continue
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        done += 1
    head.eval()
    return {"steps": done, "seconds": time.perf_counter() - t0, "chunks": len(chunks),
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}


Split = tuple[list[SignalSequence], list[SignalSequence]]


def split_eval(seqs: list[SignalSequence], fraction: float) -> Split:
    """Deterministic split by request id (stable across restarts); at least one sequence on each side."""
    def bucket(s: SignalSequence) -> float:
        return (zlib.crc32(s.request_id.encode()) % 10007) / 10007

    held = [s for s in seqs if bucket(s) < fraction]
    train = [s for s in seqs if bucket(s) >= fraction]
    if not held and len(train) > 1:
        held, train = train[-1:], train[:-1]
    if not train and len(held) > 1:
        held, train = held[:1], held[1:]
    return train, held


def served_acceptance(seqs: list[SignalSequence]) -> tuple[float | None, int]:
    """Per-token acceptance the served requests saw (Σ accepted / Σ trials) and the trial count."""
    acc = sum(s.accepted_tokens for s in seqs)
    trials = sum(s.accept_trials for s in seqs)
    return (acc / trials if trials else None), trials


def gate_baseline(tc: TrainerConfig, served: float | None, served_trials: int, parent_eval: ChainAcceptance
                  ) -> tuple[float, str, int]:
    """(acceptance to beat, its kind, its trial count) for the deploy gate. Too few served draft tokens
    (speculation was mostly off) measure nothing — their SE would blind the gate — so below
    `gate_min_served_trials` the old draft's acceptance on the same held-out data is the baseline."""
    if tc.gate_baseline == "parent" or served is None or served_trials < tc.gate_min_served_trials:
        return parent_eval.alpha, "parent_eval", int(parent_eval.trials)
    if tc.gate_baseline == "max":
        return max(served, parent_eval.alpha), "max", served_trials
    return served, "served", served_trials


def explain_decision(decision: Decision, eval_alpha: float, baseline: float, kind: str, eval_trials: int,
                     baseline_trials: int, gate: TrainingGate, served_trials: int,
                     min_served_trials: int | None) -> str:
    """One sentence for the round record: what was compared, the margin it had to beat and where that margin
    came from, and what the server does next."""
    se_part = ""
    if eval_trials and baseline_trials:
        z_se = gate.z * 0.5 * math.sqrt(1.0 / eval_trials + 1.0 / baseline_trials)
        se_part = (f" = max(gate_min_gain {gate.min_gain:.3f}, z·SE {z_se:.3f} over {eval_trials} held-out and "
                   f"{baseline_trials} baseline trials)")
    fell_back = ""
    if kind == "parent_eval" and min_served_trials is not None and served_trials < min_served_trials:
        fell_back = (f"; the served requests drafted only {served_trials} trials (< gate_min_served_trials "
                     f"{min_served_trials}), so the old draft's held-out acceptance is the baseline")
    compared = (f"held-out acceptance {eval_alpha:.3f} vs {kind} baseline {baseline:.3f}: gain {decision.gain:+.3f}, "
                f"required > {decision.required_gain:.3f}{se_part}{fell_back}")
    if not decision.deploy:
        what = "worse than" if decision.gain <= 0 else "within the noise of"
        return f"not deployed: the new draft is {what} the baseline ({compared}); signal collection paused"
    if decision.reason == "plateau":
        return (f"deployed ({compared}); gain below plateau_min_gain {gate.plateau_min_gain:.3f} for "
                f"{gate.plateau_rounds} rounds in a row: signal collection paused")
    return f"deployed ({compared})"


@dataclass
class RoundResult:
    record: RoundRecord  # the rounds.jsonl line (round, parent, version and shards filled in by the trainer)
    head: Eagle3Head


def train_round(head: Eagle3Head, train: list[SignalSequence], held: list[SignalSequence], tc: TrainerConfig,
                gate: TrainingGate, *, stop: threading.Event | None = None, seed: int = 0,
                index: IndexReplay | None = None) -> RoundResult:
    """One round on in-memory data (store- and recompute-fed alike): eval old, train, eval new, gate.
    `index`: where a hybrid drafter's suffix index drafts the held-out sequences (`replay_index(held, ...)`): both
    heads are then evaluated on the positions the index leaves to the head, the baseline is the old head there
    (served acceptance mixes index rows in), and the record says what serving's τ would gain."""
    t2d = t2d_from_d2t(head.d2t.cpu(), head.cfg.target_vocab_size).to(tc.device)
    train_chunks = make_chunks(train, tc.chunk_len, tc.train_on_prompt)
    held_chunks = make_chunks(held, tc.chunk_len, tc.train_on_prompt)
    if not train_chunks or not held_chunks:
        raise TideError("a round needs at least one train and one held-out sequence with labels")
    bases = None
    if index is not None:
        bases = [index.head_bases[i][a:b] for i, a, b in chunk_spans(held, tc.chunk_len, tc.train_on_prompt)]
    parent_eval = evaluate(head, held_chunks, t2d, tc.eval_gamma, tc.device, bases=bases)
    history = fit(head, train_chunks, t2d, tc, seed=seed, stop=stop)
    new_eval = evaluate(head, held_chunks, t2d, tc.eval_gamma, tc.device, bases=bases)
    served, served_trials = served_acceptance(train)
    if index is not None:
        baseline, kind, n_base = parent_eval.alpha, "parent_eval", int(parent_eval.trials)
    else:
        baseline, kind, n_base = gate_baseline(tc, served, served_trials, parent_eval)
    decision = gate.decide(new_eval.alpha, baseline, num_eval=int(new_eval.trials), num_train=n_base)
    data: dict[str, float] = {"train_sequences": len(train), "heldout_sequences": len(held),
            "train_tokens": sum(s.num_tokens for s in train),
            "heldout_tokens": sum(s.num_tokens for s in held),
            "train_label_tokens": sum(s.num_label_tokens(tc.train_on_prompt) for s in train)}
    why = explain_decision(decision, new_eval.alpha, baseline, kind, int(new_eval.trials), n_base, gate,
                           served_trials, tc.gate_min_served_trials
                           if tc.gate_baseline != "parent" and index is None else None)
    new_dict, parent_dict = new_eval.as_dict(), parent_eval.as_dict()
    if index is not None:
        share = index.index_share(new_eval)
        tau_old, tau_new = index.serving_tau(parent_eval), index.serving_tau(new_eval)
        data.update(index_share=share, index_tau=index.index_tau, index_chains=index.index_chains)
        new_dict["serving_tau"], parent_dict["serving_tau"] = tau_new, tau_old
        why += (f"; hybrid serving: the suffix index drafts {share:.0%} of held-out positions (τ "
                f"{index.index_tau:.2f} there), the heads were compared on the other {1 - share:.0%}: served τ "
                f"{tau_old:.3f} -> {tau_new:.3f} ({tau_new - tau_old:+.3f})")
    record = RoundRecord(deploy=decision.deploy, pause_collection=decision.pause_collection,
                         reason=decision.reason, why=why, gain=decision.gain, required_gain=decision.required_gain,
                         baseline=kind, eval_acceptance=new_eval.alpha, eval=new_dict,
                         parent_eval_acceptance=parent_eval.alpha, parent_eval=parent_dict,
                         served_acceptance=served, served_trials=served_trials, data=data, training=history)
    return RoundResult(record, head)


# ---- the trainer process: stores in, versions out ---------------------------------------------------------
def load_target_identity(cfg: TideConfig, device: str) -> tuple[ModelInfo, torch.Tensor]:
    """What a draft needs from the target without building an engine: its ModelInfo and embedding [V, H]."""
    from tide_trt.models.loader import load_checkpoint

    ckpt = load_checkpoint(cfg.model.path, cfg.model.cache_dir)
    a = ckpt.arch
    layers = cfg.engine.capture_layers
    capture = tuple(layers) if layers else default_capture_layers(a.num_layers)
    info = ModelInfo.from_arch(a, name=ckpt.name, fingerprint=ckpt.fingerprint, capture_layers=capture,
                               max_seq_len=cfg.engine.max_seq_len, max_batch_size=1, dtype="float32", device=device)
    embed = ckpt.state["model.embed_tokens.weight"].to(device=device, dtype=torch.float32)  # [V, H]
    return info, embed


class OnlineTrainer:
    """Watches the signal store, runs rounds, publishes versions (see module docstring)."""

    def __init__(self, cfg: TideConfig, base_draft: str | Path | None = None,
                 stop: threading.Event | None = None):
        self.cfg = cfg
        self.tc = cfg.trainer
        self.signals = SignalStore(cfg.signals.store_dir)
        self.drafts = DraftStore(cfg.trainer.drafts_dir)
        self.base_draft = Path(base_draft) if base_draft else None
        self.gate = TrainingGate.from_config(cfg.signals, cfg.trainer)
        self.stop = stop or threading.Event()
        self._info: ModelInfo | None = None
        self._embed: torch.Tensor | None = None
        self._bad: set[str] = set()
        self._index: SuffixDrafter | None = None  # the deploy gate's replay of the serving suffix index
        self._index_built = False

    def setup(self) -> None:
        if self.tc.num_threads > 0:
            torch.set_num_threads(self.tc.num_threads)
        if self.tc.device.startswith("cuda") and not torch.cuda.is_available():
            raise TideError(f"trainer.device={self.tc.device} but CUDA is not available")
        self._info, self._embed = load_target_identity(self.cfg, self.tc.device)
        self.signals.ensure().remove_stale_tmp()
        self.drafts.ensure().remove_orphans()
        if not self.drafts.versions():
            self._publish_base()

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            raise TideError("OnlineTrainer.setup() has not run")
        return self._info

    @property
    def embed(self) -> torch.Tensor:
        if self._embed is None:
            raise TideError("OnlineTrainer.setup() has not run")
        return self._embed

    def _publish_base(self) -> None:
        if self.base_draft is None:
            raise TideError(f"{self.drafts.root} has no published draft and no base draft was given "
                            "(draft.path)")
        load_draft(self.base_draft, self.info, self.embed)  # validate before adopting it
        _, manifest = read_draft_config(self.base_draft)
        v = self.drafts.next_version()
        tmp = self.drafts.root / f".v{v:04d}.tmp-base"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(self.base_draft, tmp)
        tmp.rename(self.drafts.version_dir(v))
        self.drafts.append_manifest({"version": v, "parent": None, "base": str(self.base_draft),
                                     "eval_acceptance": manifest.get("eval_acceptance")})
        log.info("draft store %s: base draft %s published as version %d", self.drafts.root,
                 self.base_draft, v)

    # ---- state derived from the stores ---------------------------------------------------------------------
    def consumed(self) -> set[str]:
        names = set()
        for r in self.drafts.rounds():
            names.update(r.get("shards", []))
            names.update(r.get("skipped_shards", []))
        for m in self.drafts.manifest():
            names.update((m.get("data") or {}).get("shards", []))
        return names

    def pending(self) -> tuple[list[Path], int]:
        """Unconsumed shards of this target and their label-token count."""
        done = self.consumed()
        out, tokens = [], 0
        for p in self.signals.shard_paths():
            if p.name in done or p.name in self._bad:
                continue
            try:
                h = SignalStore.header(p)
                layers = tuple(json.loads(h.get("capture_layers", "[]")))
                ok = (h.get("model_fingerprint") == self.info.fingerprint
                      and layers == self.info.capture_layers)
                n = int(h["num_tokens"]) if self.tc.train_on_prompt else int(h["num_label_tokens"])
            except Exception as exc:
                log.error("signal shard %s is unreadable (%s); skipping it", p.name, exc)
                self._bad.add(p.name)
                continue
            if ok:
                out.append(p)
                tokens += n
        return out, tokens

    def _load_parent(self, version: int) -> tuple[int, Eagle3Head]:
        """The current version, or the newest older one that validates (a bad file never stops training)."""
        for v in [version] + [x for x in reversed(self.drafts.versions()) if x < version]:
            try:
                head, _ = load_draft(self.drafts.version_dir(v), self.info, self.embed)
                return v, head.to(self.tc.device)
            except CheckpointError as exc:
                log.error("cannot train from version %d: %s", v, exc)
        raise TideError(f"no valid draft version to train from in {self.drafts.root}")

    # ---- rounds -------------------------------------------------------------------------------------------
    def run_once(self) -> dict[str, Any] | None:
        """Train one round if enough new signals exist. Returns its rounds.jsonl line (`RoundRecord.to_json()`;
        None: not enough data)."""
        shards, new_tokens = self.pending()
        if not self.gate.should_train(new_tokens):
            return None
        current = self.drafts.current()
        if current is None:
            raise TideError(f"{self.drafts.root} has no published draft version")
        parent, head = self._load_parent(current)
        seqs: list[SignalSequence] = []
        skipped = []
        for p in shards:
            try:
                seqs.extend(read_shard(p)[0])
            except Exception as exc:
                log.error("cannot read signal shard %s (%s); skipping it", p.name, exc)
                skipped.append(p.name)
        train, held = split_eval(seqs, self.tc.eval_fraction)
        if not train or not held:
            log.warning("%d new sequence(s): a round needs one to train on and one to hold out", len(seqs))
            return None
        log.info("round: training version %d on %d sequences (%d new label tokens), %d held out", parent,
                 len(train), new_tokens, len(held))
        n_rounds = len(self.drafts.rounds())
        suffix = self._replay_index()
        index = replay_index(held, suffix, self.tc.train_on_prompt) if suffix is not None else None
        result = train_round(head, train, held, self.tc, self.gate, stop=self.stop, seed=n_rounds, index=index)
        if suffix is not None:  # served: the server's global index holds them now too
            for s in (*train, *held):
                suffix.add_finished(s.token_ids.tolist())
        rec = replace(result.record, round=n_rounds + 1, parent=parent, skipped_shards=skipped,
                      shards=[p.name for p in shards if p.name not in skipped])
        if rec.deploy:
            rec = replace(rec, version=self._publish(result.head, parent, rec))
        line = rec.to_json()
        self.drafts.append_round(line)
        self._retention()
        return line

    def _replay_index(self) -> SuffixDrafter | None:
        """The serving drafter's suffix index as the deploy gate replays it (built on the first round, preloaded as
        `draft.suffix` says); None when serving drafts with the head alone or `trainer.hybrid_gate` is off."""
        if not self._index_built:
            self._index_built = True
            if self.tc.hybrid_gate:
                self._index = build_suffix_drafter(self.cfg.draft.suffix, 1, self.cfg.engine.max_seq_len + 2)
        return self._index

    def _publish(self, head: Eagle3Head, parent: int, rec: RoundRecord) -> int:
        v = self.drafts.next_version()
        head.to(STORE_DTYPES[self.tc.save_dtype])
        entry = {"eval_acceptance": rec.eval_acceptance, "served_acceptance": rec.served_acceptance,
                 "parent_eval_acceptance": rec.parent_eval_acceptance, "gain": rec.gain, "baseline": rec.baseline,
                 "round": rec.round, "version": v, "parent": parent, "data": {**rec.data, "shards": rec.shards},
                 "train_seconds": rec.training["seconds"]}
        save_draft(head, self.drafts.version_dir(v), {**entry, "trained_by": "tide train (online)"})
        self.drafts.append_manifest(entry)
        log.info("published draft version %d (parent %d): α %.3f vs %s %.3f", v, parent,
                 rec.eval_acceptance, rec.baseline, (rec.eval_acceptance or 0.0) - rec.gain)
        return v

    def _retention(self) -> None:
        unconsumed = {p.name for p in self.pending()[0]}
        self.signals.prune(self.tc.keep_shards, protect=unconsumed)
        self.drafts.prune(self.tc.keep_versions)

    def run(self, once: bool = False, max_rounds: int | None = None, on_round=None) -> int:
        """The trainer loop (holds the store lock). Returns the number of rounds run."""
        rounds = 0
        with self.drafts.trainer_lock():
            self.setup()
            while not self.stop.is_set():
                try:
                    rec = self.run_once()
                except InterruptedError:
                    log.info("trainer stopped mid-round; the round will be redone on restart")
                    break
                if rec is not None:
                    rounds += 1
                    if on_round is not None:
                        on_round(rec)
                if once or (max_rounds is not None and rounds >= max_rounds):
                    break
                if rec is None:
                    self.stop.wait(self.tc.poll_seconds)
        return rounds
