"""The deploy gate beside a suffix index (issue 21 item 4): a new head is judged by what serving with the hybrid
drafter would gain — its acceptance where the replayed index leaves positions to it, against the old head there —
not by its acceptance over every position, nor against a served acceptance that index rows inflate."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.test_online_trainer import config, tiny  # noqa: F401  (module fixture)
from tide_trt.config import SuffixConfig, TrainerConfig
from tide_trt.draft.checkpoint import load_draft
from tide_trt.draft.suffix import SuffixDrafter
from tide_trt.online.drift import TrainingGate
from tide_trt.online.index_replay import replay_index
from tide_trt.online.signals import SignalSequence, read_shard
from tide_trt.online.store import SignalStore
from tide_trt.online.trainer import OnlineTrainer, split_eval, train_round

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _seq(rid: str, tokens: list[int], prompt_len: int = 2) -> SignalSequence:
    return SignalSequence(rid, torch.zeros(len(tokens) - 1, 3, 4), torch.tensor(tokens[:-1]), tokens[-1], prompt_len)


def _drafter() -> SuffixDrafter:
    return SuffixDrafter(SuffixConfig(preload="", min_confidence=0.0), 1, 512)


def test_replay_marks_index_bases_where_the_index_knows_the_text() -> None:
    known = list(range(10, 70))  # served before: in the global index
    drafter = _drafter()
    drafter.add_finished(known)
    new = list(range(100, 160))  # never seen, no repeats: the head drafts everywhere
    r = replay_index([_seq("a", known), _seq("b", new)], drafter)
    a, b = r.head_bases
    labelled = len(known) - 2  # bases q = 0..T-2 (T = 59 rows): row q+1 has a label (only row 0 is prompt-only)
    assert int(b.sum()) == labelled  # unseen text: every labelled base is the head's
    assert int(a.sum()) <= 3  # the index knows this text: after a few tokens of context it drafts every base
    assert r.index_chains >= labelled - 3 and r.index_accepted == r.index_drafted > 0
    assert r.index_tau > 4.0
    assert drafter.sequences_indexed == 1  # the replay reads the global index, it does not add to it


def test_serving_tau_mixes_the_two_sources_by_their_counts() -> None:
    from tide_trt.online.index_replay import IndexReplay
    from tide_trt.training.ttt import ChainAcceptance

    r = IndexReplay([], index_chains=30, index_accepted=90, index_drafted=120)
    head = ChainAcceptance(gamma=3, chains=70, accepted=35.0, trials=100.0)
    assert r.index_share(head) == pytest.approx(0.3)
    assert r.serving_tau(head) == pytest.approx((30 + 90 + 70 + 35) / 100)


def _round(tiny, tmp_path: Path, index: bool, served_alpha: float):  # noqa: F811
    """One round on the tiny model's captured requests, their served acceptance set to `served_alpha` (as index rows
    would inflate it), with or without the index replay."""
    cfg = config(tiny, tmp_path, steps_per_round=150, gate_baseline="served", gate_min_served_trials=10)
    seqs = [s for p in SignalStore(cfg.signals.store_dir).shard_paths() for s in read_shard(p)[0]]
    for s in seqs:
        s.accept_trials, s.accepted_tokens = 100, int(100 * served_alpha)
    train, held = split_eval(seqs, cfg.trainer.eval_fraction)
    head, _ = load_draft(tiny[2], tiny[1].info, tiny[1].embedding_weight().float())
    drafter = _drafter()
    for s in train:
        drafter.add_finished(s.token_ids.tolist())
    replay = replay_index(held, drafter) if index else None
    gate = TrainingGate.from_config(cfg.signals, cfg.trainer)
    return train_round(head, train, held, cfg.trainer, gate, seed=0, index=replay).record, replay


def test_hybrid_gate_deploys_a_better_head_that_the_mixed_served_acceptance_would_block(
        tiny, tmp_path) -> None:  # noqa: F811
    plain, _ = _round(tiny, tmp_path / "a", index=False, served_alpha=0.97)
    assert not plain.deploy and plain.baseline == "served"  # the index's rows inflate the served baseline
    hybrid, replay = _round(tiny, tmp_path / "b", index=True, served_alpha=0.97)
    assert replay is not None and replay.index_chains > 0
    assert hybrid.deploy and hybrid.baseline == "parent_eval", hybrid.why
    # evaluated where the head drafts only: fewer chains than over every position
    assert hybrid.eval["chains"] < plain.eval["chains"]
    assert hybrid.eval["serving_tau"] > hybrid.parent_eval["serving_tau"]
    assert "hybrid serving: the suffix index drafts" in hybrid.why and "served τ" in hybrid.why
    assert 0.0 < hybrid.data["index_share"] < 1.0


def test_trainer_replays_the_configured_index_and_keeps_what_it_served(tiny, tmp_path) -> None:  # noqa: F811
    cfg = config(tiny, tmp_path)
    cfg = replace(cfg, draft=replace(cfg.draft, suffix=replace(cfg.draft.suffix, preload="")))
    trainer = OnlineTrainer(cfg, base_draft=tiny[2])
    records: list[dict] = []
    assert trainer.run(once=True, on_round=records.append) == 1
    assert "index_share" in records[0]["data"] and "serving_tau" in records[0]["eval"]
    index = trainer._replay_index()
    assert index is not None and index.sequences_indexed == records[0]["data"]["train_sequences"] + \
        records[0]["data"]["heldout_sequences"]
    off = replace(cfg, trainer=replace(cfg.trainer, hybrid_gate=False, drafts_dir=str(tmp_path / "d2")))
    rec2: list[dict] = []
    OnlineTrainer(off, base_draft=tiny[2]).run(once=True, on_round=rec2.append)
    assert "index_share" not in rec2[0]["data"]


def test_trainer_config_has_the_switch() -> None:
    assert TrainerConfig().hybrid_gate is True
