"""Online trainer: the TTT loss and evaluation it uses, rounds that publish only improvements (Algorithm 1),
state derived from the stores (resume after kill), retention, and the one-trainer lock."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from tide_trt.config import EngineConfig, ModelConfig, SignalConfig, TideConfig, TrainerConfig
from tide_trt.draft.checkpoint import save_draft
from tide_trt.engine.generator import GenerationRequest, SpeculativeGenerator
from tide_trt.engine.hooks import StaticGamma, run_step
from tide_trt.engine.torch_engine import TorchTargetEngine
from tide_trt.errors import TideError
from tide_trt.models.loader import load_checkpoint
from tide_trt.models.tiny import write_tiny_llama
from tide_trt.online.adaptation import OnlineAdaptation
from tide_trt.online.drift import DriftDetector
from tide_trt.online.refit import RefitWatcher
from tide_trt.online.signals import ShardInfo, SignalBuffer, read_shard
from tide_trt.online.store import DraftStore, SignalStore
from tide_trt.online.trainer import OnlineTrainer, gate_baseline, make_chunks
from tide_trt.training.offline import new_head
from tide_trt.training.ttt import ChainAcceptance, collate, simulated_acceptance
from tide_trt.training.vocab import t2d_from_d2t

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TorchTargetEngine, Path, Path]:
    """(model dir, engine, base draft dir, template signal store with 32 captured requests)."""
    model = write_tiny_llama(tmp_path_factory.mktemp("tiny"))
    eng = TorchTargetEngine(
        load_checkpoint(str(model)), EngineConfig(dtype="float32", max_batch_size=8, max_seq_len=256)
    )
    torch.manual_seed(0)
    base = save_draft(new_head(eng, torch.arange(96)), tmp_path_factory.mktemp("base") / "d", {"version": 0})
    store = tmp_path_factory.mktemp("signals")
    capture(eng, store, 32, seed=100)
    return model, eng, base, store


def capture(eng: TorchTargetEngine, root: Path, n: int, seed: int, max_new: int = 60) -> None:
    i = eng.info
    buf = SignalBuffer(
        SignalStore(root),
        ShardInfo(i.fingerprint, i.name, i.capture_layers, i.hidden_size),
        dtype="float32",
        shard_tokens=1500,
    )
    plugin = OnlineAdaptation(DriftDetector(SignalConfig()), buf, None)
    gen = SpeculativeGenerator(eng, None, signal_sink=plugin.signal_sink)
    g = torch.Generator().manual_seed(seed)
    for b in range(0, n, 8):
        for j in range(b, min(n, b + 8)):
            gen.add(
                GenerationRequest(f"{seed}-{j}", torch.randint(3, 96, (12,), generator=g).tolist(), max_new)
            )
        while any(not s.finished for s in gen.sequences.values()):
            run_step(gen, StaticGamma(0), [plugin])
        for k in list(gen.sequences):
            gen.release(k)
    buf.close()


def config(tiny, tmp_path: Path, **trainer) -> TideConfig:
    model, _, _, template = tiny
    store = tmp_path / "signals"
    if not store.exists():
        shutil.copytree(template, store)
    tc = dict(
        drafts_dir=str(tmp_path / "drafts"),
        min_new_tokens=1000,
        steps_per_round=150,
        epochs_per_round=100,
        lr=3e-3,
        chunk_len=64,
        eval_fraction=0.2,
        poll_seconds=0.05,
    )
    tc.update(trainer)
    return TideConfig(model=ModelConfig(path=str(model)), signals=SignalConfig(store_dir=str(store)),
                      trainer=TrainerConfig(**tc))


def test_losses_and_evaluation_match_the_training_module(tiny) -> None:
    _, eng, _, store = tiny
    seqs = [s for p in SignalStore(store).shard_paths() for s in read_shard(p)[0]][:4]
    torch.manual_seed(1)
    head = new_head(eng, torch.arange(0, 96, 2))  # half the vocabulary: some labels fall outside it
    t2d = t2d_from_d2t(head.d2t, 96)
    batch = collate(make_chunks(seqs, 64, train_on_prompt=True))
    batch.hidden = batch.hidden.float()
    # one evaluator (simulated_acceptance, formerly also chain_counts): a target token outside the draft vocabulary
    # is a miss at serving time, so its chain counts (as a miss) instead of being skipped
    r = simulated_acceptance(head, batch, t2d, 3)
    pos = torch.arange(batch.tokens.shape[1])[None, :]
    lab_next = torch.cat([batch.labels[:, 1:], torch.full_like(batch.labels[:, :1], -1)], dim=1)
    base = (lab_next >= 0) & (pos < batch.lengths[:, None] - 4)
    in_vocab = base & (t2d[lab_next.clamp(min=0)] >= 0)
    assert r.chains == int(base.sum()) > int(in_vocab.sum())
    assert r.accepted <= r.trials <= r.accepted + r.chains
    assert r.alpha == pytest.approx(r.accepted / r.trials) and r.tau == pytest.approx(1 + r.accepted / r.chains)
    full = new_head(eng, torch.arange(96))  # full vocabulary: every labelled base position is in the vocabulary
    t2d_full = t2d_from_d2t(full.d2t, 96)
    r = simulated_acceptance(full, batch, t2d_full, 3)
    assert r.chains == int(base.sum()) and r.accepted_per_drafted == pytest.approx(r.accepted / (r.chains * 3))


def test_gate_baseline_needs_enough_served_trials() -> None:
    parent = ChainAcceptance(gamma=3, chains=300, accepted=0.33 * 384, trials=384.0)  # α = 0.33
    tc = TrainerConfig(gate_baseline="served", gate_min_served_trials=100)
    assert gate_baseline(tc, 0.39, 171, parent) == (0.39, "served", 171)  # Algorithm 1: what requests saw
    # speculation was off: 9 probe trials measure nothing, the old draft on the same held-out data decides
    assert gate_baseline(tc, 0.22, 9, parent) == (0.33, "parent_eval", 384)
    assert gate_baseline(tc, None, 0, parent) == (0.33, "parent_eval", 384)
    assert gate_baseline(replace(tc, gate_baseline="max"), 0.39, 171, parent) == (0.39, "max", 171)
    assert gate_baseline(replace(tc, gate_baseline="parent"), 0.39, 171, parent)[1] == "parent_eval"


def test_round_publishes_an_improvement_and_consumes_its_shards(tiny, tmp_path) -> None:
    cfg = config(tiny, tmp_path)
    trainer = OnlineTrainer(cfg, base_draft=tiny[2])
    records = []
    assert trainer.run(once=True, on_round=records.append) == 1
    (rec,) = records
    assert rec["deploy"] and rec["version"] == 1 and rec["parent"] == 0 and rec["baseline"] == "parent_eval"
    assert rec["eval_acceptance"] > rec["parent_eval_acceptance"] + 0.2
    drafts = DraftStore(cfg.trainer.drafts_dir)
    assert drafts.versions() == [0, 1] and drafts.current() == 1
    assert sorted(rec["shards"]) == [p.name for p in SignalStore(cfg.signals.store_dir).shard_paths()]
    assert trainer.pending() == ([], 0)
    assert trainer.run(once=True) == 0  # nothing new: no round, nothing published
    assert len(drafts.rounds()) == 1


def test_gate_rejects_without_improvement_and_pauses(tiny, tmp_path) -> None:
    cfg = config(tiny, tmp_path, steps_per_round=2)
    cfg = replace(cfg, signals=replace(cfg.signals, gate_min_gain=0.99))
    rec = []
    OnlineTrainer(cfg, base_draft=tiny[2]).run(once=True, on_round=rec.append)
    assert not rec[0]["deploy"] and rec[0]["pause_collection"] and rec[0]["reason"] == "no_improvement"
    assert rec[0]["version"] is None and DraftStore(cfg.trainer.drafts_dir).versions() == [0]
    # the record says why, with the numbers: what was compared, the margin and where it came from
    why = rec[0]["why"]
    assert why.startswith("not deployed:") and "signal collection paused" in why
    assert f"held-out acceptance {rec[0]['eval_acceptance']:.3f}" in why
    assert f"required > {rec[0]['required_gain']:.3f}" in why and "gate_min_gain 0.990" in why
    assert DraftStore(cfg.trainer.drafts_dir).rounds()[0]["why"] == why  # in rounds.jsonl too


def test_round_record_explains_each_outcome() -> None:
    from tide_trt.online.drift import Decision, TrainingGate
    from tide_trt.online.trainer import explain_decision

    gate = TrainingGate(100, min_gain=0.01, z=1.645, plateau_min_gain=0.02, plateau_rounds=2)
    worse = explain_decision(Decision(False, True, "no_improvement", -0.02, 0.05), 0.30, 0.32, "served", 400,
                             300, gate, 300, 100)
    assert worse.startswith("not deployed: the new draft is worse than the baseline") and "z·SE 0.063" in worse
    noise = explain_decision(Decision(False, True, "no_improvement", 0.01, 0.05), 0.33, 0.32, "parent_eval", 400,
                             384, gate, 9, 100)
    assert "within the noise of" in noise and "drafted only 9 trials (< gate_min_served_trials 100)" in noise
    assert explain_decision(Decision(True, False, "improved", 0.1, 0.05), 0.42, 0.32, "served", 400, 300, gate,
                            300, 100).startswith("deployed (held-out acceptance 0.420 vs served baseline 0.320")
    assert "signal collection paused" in explain_decision(Decision(True, True, "plateau", 0.015, 0.01), 0.335,
                                                          0.32, "served", 400, 300, gate, 300, 100)


def write_yaml(cfg: TideConfig, path: Path) -> Path:
    doc = {
        "model": {"path": cfg.model.path},
        "signals": {"store_dir": cfg.signals.store_dir},
        "trainer": {
            k: getattr(cfg.trainer, k)
            for k in (
                "drafts_dir",
                "min_new_tokens",
                "epochs_per_round",
                "lr",
                "chunk_len",
                "eval_fraction",
                "poll_seconds",
            )
        },
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def test_killed_trainer_leaves_serving_alone_and_restart_resumes(tiny, tmp_path) -> None:
    _, eng, base, _ = tiny
    cfg = config(tiny, tmp_path)
    OnlineTrainer(cfg, base_draft=base).run(once=True)  # v0 (base) + v1 published
    drafts = DraftStore(cfg.trainer.drafts_dir)
    assert drafts.versions() == [0, 1]
    capture(eng, Path(cfg.signals.store_dir), 24, seed=200)  # new traffic
    pending = {p.name for p in OnlineTrainer(cfg).signals.shard_paths()} - OnlineTrainer(cfg).consumed()
    yml = write_yaml(cfg, tmp_path / "t.yaml")
    cmd = [sys.executable, "-m", "tide_trt.cli", "train", "--config", str(yml)]
    log = tmp_path / "trainer.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            cmd + ["--steps-per-round", "1000000"],
            stderr=err,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while "round: training" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        time.sleep(0.5)  # well inside the (long) training loop
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert drafts.versions() == [0, 1] and len(drafts.rounds()) == 1  # nothing published, nothing consumed
    # serving is unaffected: it keeps the published version and generates
    watcher = RefitWatcher(drafts, eng.info, eng.embedding_weight(), poll_seconds=0, background=False)
    gen = SpeculativeGenerator(eng, None)
    seq = gen.add(GenerationRequest("s", [5, 6, 7], 8))
    while not seq.finished:
        run_step(gen, StaticGamma(2), [watcher])
    assert gen.drafter.version == 1 and watcher.stats["rejected"] == 0
    gen.release("s")
    # restart: the unfinished round is redone on the same shards; published versions are kept
    done = subprocess.run(
        cmd + ["--once", "--steps-per-round", "5"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    rounds = drafts.rounds()
    assert len(rounds) == 2 and set(rounds[-1]["shards"]) == pending
    assert {0, 1} <= set(drafts.versions())


def test_restart_removes_unfinished_versions(tiny, tmp_path) -> None:
    cfg = config(tiny, tmp_path, min_new_tokens=10**9)
    OnlineTrainer(cfg, base_draft=tiny[2]).run(once=True)
    drafts = DraftStore(cfg.trainer.drafts_dir)
    shutil.copytree(drafts.version_dir(0), drafts.version_dir(1))  # killed between save and manifest line
    (drafts.root / ".v0002.tmp-x").mkdir()  # killed inside save_draft
    OnlineTrainer(cfg).run(once=True)
    assert drafts.dir_versions() == [0] and not list(drafts.root.glob(".v*")) and drafts.next_version() == 1


def test_retention_keeps_base_current_and_latest(tiny, tmp_path) -> None:
    drafts = DraftStore(tmp_path / "d").ensure()
    head = new_head(tiny[1], torch.arange(96))
    for v in range(6):
        save_draft(head, drafts.version_dir(v), {"version": v})
        drafts.append_manifest({"version": v})
    drafts.pin(2)
    assert drafts.prune(keep=2) == [1, 3]
    assert drafts.versions() == [0, 2, 4, 5] and drafts.current() == 2
    store = SignalStore(tmp_path / "s")
    shutil.copytree(tiny[3], store.root)
    names = [p.name for p in store.shard_paths()]
    store.prune(keep=1, protect={names[0]})
    assert [p.name for p in store.shard_paths()] == [names[0], names[-1]]


def test_only_one_trainer_per_store(tiny, tmp_path) -> None:
    drafts = DraftStore(tmp_path)
    with drafts.trainer_lock(), pytest.raises(TideError, match="another trainer"), drafts.trainer_lock():
        pass


def test_default_model_round(tmp_path) -> None:
    """Real default model: two short captured chats, one (tiny) round on the trainer side."""
    eng = TorchTargetEngine.from_config(ModelConfig(), EngineConfig(max_batch_size=2, max_seq_len=96))
    capture_cfg = {"n": 4, "max_new": 12}
    i = eng.info
    buf = SignalBuffer(
        SignalStore(tmp_path / "signals"), ShardInfo(i.fingerprint, i.name, i.capture_layers, i.hidden_size)
    )
    plugin = OnlineAdaptation(DriftDetector(SignalConfig()), buf, None)
    gen = SpeculativeGenerator(eng, None, signal_sink=plugin.signal_sink)
    for j, text in enumerate(["Name a color.", "Say hi."] * (capture_cfg["n"] // 2)):
        ids = eng.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True
        )
        seq = gen.add(
            GenerationRequest(
                f"r{j}", list(ids["input_ids"] if hasattr(ids, "keys") else ids), capture_cfg["max_new"]
            )
        )
        while not seq.finished:
            run_step(gen, StaticGamma(0), [plugin])
        gen.release(seq.request.request_id)
    buf.close()
    torch.manual_seed(0)
    base = save_draft(new_head(eng, torch.arange(2048)), tmp_path / "base", {"version": 0})
    cfg = TideConfig(
        trainer=TrainerConfig(
            drafts_dir=str(tmp_path / "drafts"),
            min_new_tokens=20,
            steps_per_round=2,
            chunk_len=32,
            eval_fraction=0.3,
        )
    )
    cfg = replace(cfg, signals=replace(cfg.signals, store_dir=str(tmp_path / "signals")),
                  engine=replace(cfg.engine, max_seq_len=96))
    rec = []
    OnlineTrainer(cfg, base_draft=base).run(once=True, on_round=rec.append)
    assert len(rec) == 1 and 1 <= rec[0]["training"]["steps"] <= 2 and rec[0]["data"]["train_sequences"] >= 1


def test_stores_survive_torn_lines_and_bad_pins(tiny, tmp_path) -> None:
    drafts = DraftStore(tmp_path).ensure()
    save_draft(new_head(tiny[1], torch.arange(96)), drafts.version_dir(0), {"version": 0})
    drafts.append_manifest({"version": 0})
    with drafts.manifest_path.open("a") as f:
        f.write('{"version": 1, "par')  # a writer killed mid-line
    drafts.pin_path.write_text("garbage\n")
    assert drafts.versions() == [0] and drafts.pinned() is None and drafts.current() == 0
    assert drafts.next_version() == 1
    save_draft(new_head(tiny[1], torch.arange(96)), drafts.version_dir(1), {"version": 1})
    drafts.append_manifest({"version": 1})  # the next line is intact
    assert drafts.versions() == [0, 1]
