"""The corpus training pipeline as the references train it: top-K soft labels stored at prefill and the loss against
them, the draft vocabulary rebuilt from the corpus, per-capture-layer normalisation applied identically in training
and serving, exact resume on the soft path, and `tide train-draft --data corpus` as a thin front of the pipeline."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import make_engine
from tests.test_corpus_training import write_corpus
from tide_trt.errors import TideError
from tide_trt.training.corpus import load_corpus, select_sequences
from tide_trt.training.corpus_train import CorpusTrainSettings, train_on_shards
from tide_trt.training.offline import new_head
from tide_trt.training.state_cache import build_state_cache, load_shard, shard_label_counts
from tide_trt.training.ttt import Batch, ttt_loss
from tide_trt.training.vocab import build_draft_vocab, t2d_from_d2t

VOCAB = 96  # the tiny random Llama's vocabulary


@pytest.fixture()
def corpus(tmp_path, tiny_checkpoint):
    return load_corpus(write_corpus(tmp_path / "corpus.npz", tiny_checkpoint.arch.vocab_size, n_prompts=16))


def test_soft_labels_round_trip_through_the_state_cache(tiny_checkpoint, corpus, tmp_path):
    engine = make_engine(tiny_checkpoint, dtype="float32", max_batch_size=3, max_seq_len=64)
    seqs = select_sequences(corpus, "greedy", "train", 4)[:5]
    paths = build_state_cache(engine, seqs, tmp_path / "c", {}, shard_sequences=3, batch_tokens=64, progress=False,
                              soft_top_k=8)
    shards = [load_shard(p, soft=True) for p in paths]
    for seq, (shard, a, b) in zip(seqs, [(d, a, b) for d in shards for a, b, _ in d.sequences()], strict=True):
        slot = engine.allocate_slot()
        logits = engine.forward([slot], [seq.tokens.tolist()], logits="all").logits[0].float()  # [T, V]
        engine.free_slot(slot)
        probs = torch.softmax(logits, -1)
        ref_p, ref_ids = probs.topk(8, -1)
        assert shard.soft_ids is not None and shard.soft_probs is not None
        assert shard.soft_ids[a:b].shape == (b - a, 8)
        assert torch.equal(shard.soft_ids[a:b], ref_ids)
        torch.testing.assert_close(shard.soft_probs[a:b], ref_p, atol=1e-3, rtol=1e-3)  # stored as float16
        assert torch.equal(shard.soft_ids[a:b, 0], shard.labels[a:b])  # top-1 is the argmax label
    assert load_shard(paths[0]).soft_ids is None  # the hard path does not read them

    # the cache is versioned: a format-1 cache (argmax labels only) is refused with a clear message
    old = tmp_path / "old"
    old.mkdir()
    (old / "cache.json").write_text(json.dumps({}))
    with pytest.raises(TideError, match="format 1"):
        build_state_cache(engine, seqs, old, {}, shard_sequences=3, progress=False)
    # and another top-K is another cache
    with pytest.raises(TideError, match="soft_top_k"):
        build_state_cache(engine, seqs, tmp_path / "c", {}, shard_sequences=3, progress=False, soft_top_k=4)


def _batch(c: int, h: int, b: int = 2, t: int = 12, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB, (b, t), generator=g)
    labels[0, :3] = -1  # prompt positions
    return Batch(torch.randn(b, t, c, h, generator=g), torch.randint(0, VOCAB, (b, t), generator=g), labels,
                 torch.tensor([t, t - 3]))


def test_soft_loss_equals_hard_loss_on_one_hot_targets(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint)
    torch.manual_seed(0)
    head = new_head(engine, torch.arange(0, VOCAB, 2))  # half the vocabulary: some labels fall outside it
    t2d = t2d_from_d2t(head.d2t, VOCAB)
    batch = _batch(len(head.cfg.capture_layers), head.cfg.hidden_size)
    hard, _ = ttt_loss(head, batch, t2d, 3, loss="hard")
    k = 4
    soft_ids = torch.randint(0, VOCAB, (*batch.labels.shape, k))
    soft_ids[..., 0] = batch.labels.clamp(min=0)
    soft_ids[..., 1:] = 1  # an odd id: outside the draft vocabulary (only even ids are in it)
    soft_probs = torch.zeros(*batch.labels.shape, k)
    soft_probs[..., 0] = 0.7
    soft_probs[..., 1:] = 0.1  # mass outside the draft vocabulary is dropped and the rest renormalised
    one_hot = Batch(batch.hidden, batch.tokens, batch.labels, batch.lengths, soft_ids, soft_probs)
    soft, _ = ttt_loss(head, one_hot, t2d, 3, loss="soft")
    torch.testing.assert_close(soft, hard)

    # a real distribution gives another loss, and its gradient reaches the head
    spread = soft_probs.clone()
    soft_ids[..., 1] = (batch.labels.clamp(min=0) + 2) % VOCAB // 2 * 2  # an even id: inside the vocabulary
    spread[..., 1] = 0.3
    other, _ = ttt_loss(head, Batch(batch.hidden, batch.tokens, batch.labels, batch.lengths, soft_ids, spread),
                        t2d, 3, loss="soft")
    assert not torch.allclose(other, hard)
    other.backward()
    assert head.fc.weight.grad is not None and head.fc.weight.grad.abs().sum() > 0


def test_vocabulary_rebuilt_from_the_corpus_and_its_coverage(tiny_checkpoint, corpus, tmp_path):
    from tide_trt.training.pipeline import label_coverage

    engine = make_engine(tiny_checkpoint, dtype="float32", max_batch_size=4, max_seq_len=64)
    train = build_state_cache(engine, select_sequences(corpus, "both", "train", 4), tmp_path / "t", {}, 8,
                              progress=False)
    held = build_state_cache(engine, select_sequences(corpus, "greedy", "heldout", 4), tmp_path / "h", {}, 8,
                             progress=False)
    counts = shard_label_counts(train, VOCAB)
    d2t, t2d = build_draft_vocab(counts, 16)
    assert d2t.numel() == 16 and torch.equal(t2d[d2t], torch.arange(16))
    assert counts[d2t].min() >= counts[t2d < 0].max()  # the most frequent training labels
    held_counts = shard_label_counts(held, VOCAB)
    labels = torch.cat([load_shard(p).labels for p in held])  # every held-out position, prompts included
    assert held_counts.sum() < labels.numel()  # coverage counts answer positions only
    manual = sum(int(held_counts[t]) for t in d2t.tolist()) / float(held_counts.sum())
    assert label_coverage(held_counts, d2t) == pytest.approx(manual)
    wider = [label_coverage(held_counts, build_draft_vocab(counts, n)[0]) for n in (8, 16, 48, VOCAB)]
    assert wider == sorted(wider) and wider[-1] == 1.0 and wider[0] < 1.0


def test_capture_norm_is_applied_identically_in_training_and_serving(tiny_checkpoint, tmp_path):
    """A head with per-capture-layer normalisation, written and loaded as a draft checkpoint, gives the serving
    drafter's logits equal to the training forward's (step 0), and the norm changes them."""
    from tide_trt.draft.checkpoint import load_draft, save_draft
    from tide_trt.draft.drafter import ChainDrafter

    engine = make_engine(tiny_checkpoint)
    torch.manual_seed(0)
    head = new_head(engine, torch.arange(VOCAB), capture_norm=True)
    with torch.no_grad():
        head.capture_norm_weight.copy_(torch.rand_like(head.capture_norm_weight) * 2)
        head.capture_norm_weight[0, 3] = 0.0  # a dimension the norm silences
    save_draft(head.to(torch.bfloat16), tmp_path / "d", {})
    loaded, _ = load_draft(tmp_path / "d", engine.info, engine.embedding_weight())
    assert loaded.cfg.capture_norm
    torch.testing.assert_close(loaded.capture_norm_weight, head.capture_norm_weight.float())
    g = torch.Generator().manual_seed(1)
    t = 12
    captured = torch.randn(1, t, len(loaded.cfg.capture_layers), loaded.cfg.hidden_size, generator=g)
    captured[..., 3] *= 300  # an outlier dimension, as SmolLM2's layer 27 dim 17
    tokens = torch.randint(0, VOCAB, (1, t), generator=g)
    with torch.no_grad():
        train_logits = loaded.ttt_forward(captured, tokens, 1)[0][0]  # [T, Vd]
    drafter = ChainDrafter(loaded, max_slots=2, max_seq_len=64, dtype=torch.float32, device="cpu")
    _, serve_logits = drafter._catch_up([0], [captured[0]], [tokens[0].tolist()])  # [1, Vd] at the last entry
    torch.testing.assert_close(serve_logits[0], train_logits[-1], atol=1e-4, rtol=1e-4)
    plain = load_draft(tmp_path / "d", engine.info, engine.embedding_weight())[0]
    with torch.no_grad():
        plain.capture_norm_weight.fill_(1.0)
        assert not torch.allclose(plain.ttt_forward(captured, tokens, 1)[0][0, -1], train_logits[-1], atol=1e-3)


@pytest.mark.parametrize("capture_norm", [False, True])
def test_soft_training_resumes_bit_identically(tiny_checkpoint, corpus, tmp_path, one_torch_thread, capture_norm):
    engine = make_engine(tiny_checkpoint, dtype="float32", max_batch_size=4, max_seq_len=64)
    shards = build_state_cache(engine, select_sequences(corpus, "both", "train", 4), tmp_path / "c", {},
                               shard_sequences=4, progress=False, soft_top_k=8)
    d2t = torch.arange(0, VOCAB, 2)
    t2d = t2d_from_d2t(d2t, VOCAB)
    s = CorpusTrainSettings(epochs=2, batch_size=2, chunk_len=16, pool_shards=2, autocast=False, warmup_steps=2,
                            loss="soft", grad_clip=0.5, lr=5e-4, eval_every_steps=3)

    def curve(epoch: int, h) -> dict:  # a learning-curve point every 3 steps must not disturb the run
        return {"fc_sum": float(h.fc.weight.detach().sum())}

    def fresh():
        torch.manual_seed(0)
        return new_head(engine, d2t, capture_norm=capture_norm)

    straight = fresh()
    full = train_on_shards(straight, t2d, shards, s, tmp_path / "a", resume=False, meta={}, progress=False,
                           on_epoch_end=curve)
    assert full["finished"] and full["total_steps"] > 8
    assert [e["step"] for e in full["epoch_evals"]][:3] == [3, 6, 9]
    stopped = fresh()
    part = train_on_shards(stopped, t2d, shards, s, tmp_path / "b", resume=False, meta={}, max_steps=5,
                           progress=False, on_epoch_end=curve)
    assert not part["finished"]
    hard = CorpusTrainSettings(**{**s.__dict__, "loss": "hard"})
    with pytest.raises(TideError, match="settings"):  # the loss is part of what a checkpoint continues
        train_on_shards(fresh(), t2d, shards, hard, tmp_path / "b", resume=True, meta={}, progress=False)
    resumed = fresh()
    rest = train_on_shards(resumed, t2d, shards, s, tmp_path / "b", resume=True, meta={}, progress=False,
                           on_epoch_end=curve)
    assert rest["epoch_evals"] == full["epoch_evals"]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    hard_head = fresh()  # and the soft loss trains another head than the hard one
    train_on_shards(hard_head, t2d, shards, hard, tmp_path / "h", resume=False, meta={}, progress=False)
    assert not torch.equal(hard_head.fc.weight, straight.fc.weight)


def test_cli_is_a_thin_front_of_the_pipeline(monkeypatch, tmp_path):
    """`tide train-draft --data corpus` parses its arguments into the pipeline's config and calls the pipeline —
    nothing else; and the two train-draft command modules do not import each other in a circle."""
    from tide_trt import cli
    from tide_trt.training import pipeline

    seen = []
    monkeypatch.setattr(pipeline, "run_corpus_pipeline", lambda cfg: seen.append(cfg) or {"ok": True})
    rc = cli.main(["train-draft", "--data", "corpus", "--corpus", "c.npz", "--greedy-sequences", "7",
                   "--sampled-sequences", "3", "--draft-vocab", "16384", "--loss", "hard", "--soft-top-k", "12",
                   "--capture-norm", "--lr", "5e-4", "--grad-clip", "0.5", "--state-cache", str(tmp_path / "s"),
                   "--out", str(tmp_path / "o"), "--resume", "--threads", "1", "--eval-gammas", "3"])
    assert rc == 0 and len(seen) == 1
    cfg = seen[0]
    assert (cfg.data.corpus, cfg.data.greedy_sequences, cfg.data.sampled_sequences, cfg.data.soft_top_k) == (
        "c.npz", 7, 3, 12)
    assert (cfg.head.draft_vocab, cfg.head.capture_norm, cfg.head.init) == (16384, True, None)
    assert (cfg.train.loss, cfg.train.lr, cfg.train.grad_clip) == ("hard", 5e-4, 0.5)
    assert cfg.resume and cfg.eval.gammas == (3,) and cfg.work == Path(f"{tmp_path / 'o'}.work")
    assert cfg.engine.num_threads == 1 and cfg.data.state_cache == str(tmp_path / "s")

    root = Path(__file__).resolve().parents[1] / "tide_trt" / "commands"
    imported = {n.module for n in ast.walk(ast.parse((root / "train_draft_corpus.py").read_text()))
                if isinstance(n, ast.ImportFrom)}
    assert "tide_trt.commands.train_draft" not in imported
    assert len((root / "train_draft_corpus.py").read_text().splitlines()) < 120  # a front, not a second pipeline


def test_pipeline_continues_a_draft_with_its_vocabulary(tiny_model_dir, tiny_checkpoint, tmp_path, one_torch_thread):
    """The pipeline called from Python (no CLI): --init keeps the parent's vocabulary and architecture."""
    from tide_trt.config import EngineConfig, ModelConfig
    from tide_trt.draft.checkpoint import load_draft, save_draft
    from tide_trt.training.pipeline import (
        CorpusDataConfig,
        CorpusPipelineConfig,
        EvalConfig,
        HeadConfig,
        run_corpus_pipeline,
    )

    engine = make_engine(tiny_checkpoint)
    torch.manual_seed(0)
    parent = new_head(engine, torch.arange(3, 40), capture_norm=True)
    save_draft(parent.to(torch.bfloat16), tmp_path / "parent", {"command": "parent"})
    cfg = CorpusPipelineConfig(
        model=ModelConfig(path=str(tiny_model_dir)), engine=EngineConfig(dtype="float32", num_threads=1),
        out=str(tmp_path / "child"),
        data=CorpusDataConfig(corpus=str(write_corpus(tmp_path / "c.npz", VOCAB)), greedy_sequences=6,
                              heldout_sequences=2, heldout_every=5, state_cache=str(tmp_path / "s"), soft_top_k=4),
        head=HeadConfig(init=str(tmp_path / "parent"), draft_vocab=16),  # draft_vocab: ignored with init
        train=CorpusTrainSettings(epochs=1, batch_size=2, chunk_len=16, autocast=False, loss="soft"),
        eval=EvalConfig(gammas=(3,)))
    out = run_corpus_pipeline(cfg)
    child, manifest = load_draft(out["out"], engine.info, engine.embedding_weight())
    assert torch.equal(child.d2t, torch.arange(3, 40)) and child.cfg.capture_norm
    assert manifest["parent_manifest_command"] == "parent" and manifest["draft_vocab_source"] == "init"
    assert set(manifest["heldout_acceptance"]) == {"3"}
