"""Draft training from a token corpus: corpus validation, resumable state caches that equal a plain prefill,
exact resume of training, the CLI end to end (tiny random Llama), and the default model's prefill numerics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_engine
from tide_trt.errors import TideError
from tide_trt.training import state_cache
from tide_trt.training.corpus import load_corpus, select_sequences
from tide_trt.training.corpus_train import CorpusTrainSettings, evaluate_shards, train_on_shards
from tide_trt.training.offline import new_head
from tide_trt.training.state_cache import build_state_cache, load_shard
from tide_trt.training.vocab import t2d_from_d2t


def write_corpus(path: Path, vocab: int, n_prompts: int = 12, seed: int = 0, sampled: bool = True) -> Path:
    """A small corpus in the shipped format: prompts, one greedy answer each, sampled answers to half of them."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, rng.integers(3, 9)) for _ in range(n_prompts)]
    arrays: dict[str, np.ndarray] = {
        "prompt_flat": np.concatenate(prompts).astype(np.uint16),
        "prompt_off": np.cumsum([0] + [len(p) for p in prompts]).astype(np.int64),
    }
    kinds = {"greedy": list(range(n_prompts))}
    if sampled:
        kinds["sampled"] = list(range(0, n_prompts, 2))
    for kind, idx in kinds.items():
        answers = [rng.integers(3, vocab, rng.integers(10, 30)) for _ in idx]
        arrays[f"{kind}_prompt_index"] = np.array(idx, dtype=np.int32)
        arrays[f"{kind}_resp_flat"] = np.concatenate(answers).astype(np.uint16)
        arrays[f"{kind}_resp_off"] = np.cumsum([0] + [len(a) for a in answers]).astype(np.int64)
    arrays["meta"] = np.array(json.dumps({"made_by": "tests"}))
    np.savez(path, **arrays)
    return path


@pytest.fixture()
def corpus(tmp_path, tiny_checkpoint):
    return load_corpus(write_corpus(tmp_path / "corpus.npz", tiny_checkpoint.arch.vocab_size))


def test_corpus_selection_keeps_heldout_prompts_out_and_is_stable(corpus):
    train = select_sequences(corpus, "both", "train", heldout_every=4)
    held = select_sequences(corpus, "greedy", "heldout", heldout_every=4)
    assert {s.prompt_index for s in held} == {0, 4, 8}
    assert not {s.prompt_index for s in train} & {0, 4, 8}  # no answer of a held-out prompt is trained on
    assert [s.key for s in train[:4]] == ["greedy:1", "sampled:1", "greedy:2", "sampled:3"]  # kinds interleaved
    seq = train[0]
    a = corpus.arrays
    prompt = a["prompt_flat"][a["prompt_off"][1]:a["prompt_off"][2]]
    assert seq.num_prompt == len(prompt) and (seq.tokens[:seq.num_prompt] == prompt).all()
    assert [s.key for s in select_sequences(corpus, "both", "train", 4, limit=3)] == [s.key for s in train[:3]]
    assert all(len(s.tokens) <= 12 for s in select_sequences(corpus, "greedy", "train", 4, max_len=12))


def test_bad_corpora_get_clear_errors(tmp_path, corpus):
    with pytest.raises(TideError, match="not found"):
        load_corpus(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(TideError, match="not a readable"):
        load_corpus(tmp_path / "junk.npz")
    np.savez(tmp_path / "noprompts.npz", greedy_resp_flat=np.zeros(3, np.uint16))
    with pytest.raises(TideError, match="missing arrays"):
        load_corpus(tmp_path / "noprompts.npz")
    arrays = dict(corpus.arrays)
    arrays["greedy_prompt_index"] = arrays["greedy_prompt_index"] + 100  # points past the prompts
    np.savez(tmp_path / "bad_index.npz", **arrays)
    with pytest.raises(TideError, match="inconsistent"):
        load_corpus(tmp_path / "bad_index.npz")
    with pytest.raises(TideError, match="no sampled answers"):
        select_sequences(load_corpus(write_corpus(tmp_path / "g.npz", 96, sampled=False)), "both", "train", 4)


def test_state_cache_equals_a_plain_prefill_and_resumes_by_shard(tiny_checkpoint, corpus, tmp_path, monkeypatch):
    engine = make_engine(tiny_checkpoint, dtype="float32", max_batch_size=3, max_seq_len=64)
    seqs = select_sequences(corpus, "greedy", "train", 4)[:8]
    root = tmp_path / "cache"
    ident = {"test": 1}
    paths = build_state_cache(engine, seqs, root, ident, shard_sequences=3, batch_tokens=64, progress=False)
    assert len(paths) == 3 and all(p.is_file() for p in paths)  # 8 sequences in shards of 3, 3, 2
    rows = [load_shard(p) for p in paths]
    got = [(d.hidden[a:b], d.labels[a:b], d.token_ids[a:b], plen) for d in rows for a, b, plen in d.sequences()]
    for seq, (hidden, labels, tokens, plen) in zip(seqs, got, strict=True):
        slot = engine.allocate_slot()  # one sequence alone, no batching: the reference
        out = engine.forward([slot], [seq.tokens.tolist()], logits="all")
        engine.free_slot(slot)
        torch.testing.assert_close(hidden.float(), out.hidden[0].to(torch.bfloat16).float())
        assert labels.tolist() == out.logits[0].argmax(-1).tolist()
        assert tokens.tolist() == seq.tokens.tolist() and plen == seq.num_prompt

    # resume: only a missing shard is prefilled again; the partial last shard grows when more sequences are asked
    paths[1].unlink()
    calls = []
    real = state_cache.prefill_shard
    monkeypatch.setattr(state_cache, "prefill_shard", lambda e, plan, *a, **k: (calls.append(plan.index),
                                                                                real(e, plan, *a, **k)))
    build_state_cache(engine, seqs, root, ident, shard_sequences=3, batch_tokens=64, progress=False)
    assert calls == [1]
    more = select_sequences(corpus, "greedy", "train", 4) + select_sequences(corpus, "sampled", "train", 4)
    calls.clear()
    build_state_cache(engine, more, root, ident, shard_sequences=3, batch_tokens=64, progress=False)
    assert calls == [2, 3]  # shard 2 held 2 of its 3 sequences; shard 3 is new
    with pytest.raises(TideError, match="other sequences"):
        build_state_cache(engine, seqs[1:], root, ident, shard_sequences=3, batch_tokens=64, progress=False)
    with pytest.raises(TideError, match="caches other states"):
        build_state_cache(engine, seqs, root, {"test": 2}, shard_sequences=3, progress=False)


def _cache(tiny_checkpoint, corpus, root: Path) -> list[Path]:
    engine = make_engine(tiny_checkpoint, dtype="float32", max_batch_size=4, max_seq_len=64)
    return build_state_cache(engine, select_sequences(corpus, "both", "train", 4), root, {}, shard_sequences=4,
                             progress=False)


def test_training_resumes_exactly(tiny_checkpoint, corpus, tmp_path, one_torch_thread):
    shards = _cache(tiny_checkpoint, corpus, tmp_path / "cache")
    engine = make_engine(tiny_checkpoint)
    d2t = torch.arange(0, 96, 2)
    t2d = t2d_from_d2t(d2t, 96)
    s = CorpusTrainSettings(epochs=3, batch_size=2, chunk_len=16, pool_shards=2, autocast=False, warmup_steps=2)

    def fresh():
        torch.manual_seed(0)
        return new_head(engine, d2t)

    straight = fresh()
    full = train_on_shards(straight, t2d, shards, s, tmp_path / "a", resume=False, meta={}, progress=False)
    assert full["finished"] and full["step"] == full["total_steps"] > 10

    stopped = fresh()
    part = train_on_shards(stopped, t2d, shards, s, tmp_path / "b", resume=False, meta={}, max_steps=7,
                           progress=False)
    assert not part["finished"] and part["step"] == 7
    with pytest.raises(TideError, match="--resume"):
        train_on_shards(fresh(), t2d, shards, s, tmp_path / "b", resume=False, meta={}, progress=False)
    other = CorpusTrainSettings(**{**s.__dict__, "lr": 5e-3})
    with pytest.raises(TideError, match="settings"):
        train_on_shards(fresh(), t2d, shards, other, tmp_path / "b", resume=True, meta={}, progress=False)
    resumed = fresh()  # a new process: weights and optimizer come from the checkpoint alone
    rest = train_on_shards(resumed, t2d, shards, s, tmp_path / "b", resume=True, meta={}, progress=False)
    assert rest["finished"] and rest["steps_this_run"] == full["total_steps"] - 7
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_training_raises_heldout_acceptance_on_learnable_data(tiny_checkpoint, tmp_path, one_torch_thread):
    """Answers that repeat one short pattern are easy to predict: training must lift the simulated acceptance."""
    vocab = tiny_checkpoint.arch.vocab_size
    path = write_corpus(tmp_path / "c.npz", vocab, n_prompts=24, sampled=False)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["greedy_resp_flat"] = np.tile(np.array([5, 9, 13, 17], np.uint16), len(arrays["greedy_resp_flat"]) // 4 + 1
                                         )[:len(arrays["greedy_resp_flat"])]
    np.savez(path, **arrays)
    corpus = load_corpus(path)
    engine = make_engine(tiny_checkpoint, dtype="float32", max_batch_size=4, max_seq_len=64)
    train = build_state_cache(engine, select_sequences(corpus, "greedy", "train", 6), tmp_path / "t", {}, 8,
                              progress=False)
    held = build_state_cache(engine, select_sequences(corpus, "greedy", "heldout", 6), tmp_path / "h", {}, 8,
                             progress=False)
    torch.manual_seed(0)
    head = new_head(engine, torch.arange(vocab))
    t2d = t2d_from_d2t(head.d2t, vocab)
    before = evaluate_shards(head, t2d, held, "cpu", (3,))["3"].tau
    s = CorpusTrainSettings(epochs=30, batch_size=4, chunk_len=32, lr=3e-3, autocast=False, warmup_steps=5)
    train_on_shards(head, t2d, train, s, tmp_path / "w", resume=False, meta={}, progress=False)
    after = evaluate_shards(head, t2d, held, "cpu", (3,))["3"].tau
    assert after > before + 0.3, (before, after)


def _tide(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tide_trt.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_cli_trains_resumes_and_writes_a_loadable_draft(tiny_model_dir, tmp_path):
    from tide_trt.draft.checkpoint import load_draft
    from tide_trt.models.loader import load_checkpoint

    corpus = write_corpus(tmp_path / "corpus.npz", 96, n_prompts=16)
    common = ["train-draft", "--data", "corpus", "--corpus", str(corpus), "--model", str(tiny_model_dir),
              "--dtype", "float32", "--threads", "1", "--greedy-sequences", "8", "--sampled-sequences", "4",
              "--heldout-sequences", "3", "--heldout-every", "5", "--draft-vocab", "48", "--epochs", "4",
              "--batch-size", "2", "--chunk-len", "16", "--eval-every-epoch", "--state-cache", str(tmp_path / "states"),
              "--capture-norm", "--soft-top-k", "8", "--lr", "5e-4", "--grad-clip", "0.5",
              "--out", str(tmp_path / "draft")]
    first = _tide(*common, "--max-train-steps", "5", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["finished"] is False and not (tmp_path / "draft").exists()
    again = _tide(*common, cwd=tmp_path)  # without --resume the checkpoint is not silently overwritten
    assert again.returncode == 2 and "--resume" in again.stderr
    done = _tide(*common, "--resume", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["finished"] and report["steps_this_run"] == report["total_steps"] - 5
    engine = make_engine(load_checkpoint(str(tiny_model_dir)))
    head, manifest = load_draft(tmp_path / "draft", engine.info, engine.embedding_weight())
    assert head.d2t.numel() == 48 and head.cfg.capture_norm  # the v5 recipe's pieces, through the real pipeline
    assert manifest["settings"]["loss"] == "soft" and manifest["data"]["soft_top_k"] == 8
    assert manifest["settings"]["grad_clip"] == 0.5 and 0 < manifest["draft_vocab_coverage"] <= 1
    assert manifest["data"]["greedy_sequences"] == 8 and manifest["data"]["corpus_meta"] == {"made_by": "tests"}
    assert set(manifest["heldout_acceptance"]) == {"1", "3", "5"}
    by_epoch = manifest["heldout_by_epoch"]  # --eval-every-epoch: one held-out score per finished epoch
    assert [e["epoch"] for e in by_epoch][:3] == [1, 2, 3] and all(e["tau_gamma3"] >= 1.0 for e in by_epoch)
    bad = _tide(*common[:4], str(tmp_path / "nope.npz"), *common[5:], cwd=tmp_path)
    assert bad.returncode == 2 and "token corpus not found" in bad.stderr


def test_cache_identity_records_the_weights(tiny_checkpoint, corpus, tmp_path):
    """A state cache says which target weights made it, and one made with other weights is refused."""
    from tide_trt.training.corpus_prefill import cache_identity

    def ident(eng):
        return cache_identity(corpus, eng, "serving", "greedy", "train", 4, 64, 4)

    plain = make_engine(tiny_checkpoint, dtype="float32", max_batch_size=2, max_seq_len=64)
    q8 = make_engine(tiny_checkpoint, dtype="float32", max_batch_size=2, max_seq_len=64, weights="q8_0")
    assert ident(plain)["weights"] == "float32" and ident(q8)["weights"] == "q8_0"
    seqs = select_sequences(corpus, "greedy", "train", 4)[:2]
    build_state_cache(plain, seqs, tmp_path, ident(plain), shard_sequences=4, progress=False)
    with pytest.raises(TideError, match="weights"):
        build_state_cache(q8, seqs, tmp_path, ident(q8), shard_sequences=4, progress=False)


@pytest.mark.parametrize("weights", ["bf16", "q4_1"])
def test_default_model_prefill_numerics_match_serving(default_checkpoint, one_torch_thread, weights):
    """The bulk-prefill mode (float32 copies of the bf16 weights, or of the GGUF blocks' values, through PyTorch's
    GEMM) gives the serving engine's labels and states (native kernels: the same weights, float32 products)."""
    from tide_trt.kernels.linear import native_linears_available, quant_kernel_available

    if not (quant_kernel_available() if weights == "q4_1" else native_linears_available()):
        pytest.skip("the native CPU kernel cannot be built here: serving and prefill both use PyTorch matmuls")
    serving = make_engine(default_checkpoint, dtype="bfloat16", max_batch_size=2, max_seq_len=96, cpu_kernels="auto",
                          weights=weights)
    bulk = make_engine(default_checkpoint, dtype="bfloat16", max_batch_size=2, max_seq_len=96, cpu_kernels="auto",
                       weights=weights)
    assert serving.info.weights == weights
    bulk.use_prefill_linears()
    assert bulk.weights.layers[0]["qkv"].dtype == torch.float32
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(100, 20000, (n,), generator=gen).tolist() for n in (80, 57)]
    outs = []
    for eng in (serving, bulk):
        slots = [eng.allocate_slot() for _ in seqs]
        outs.append(eng.forward(slots, seqs, logits="all"))
    assert torch.equal(outs[0].logits.argmax(-1), outs[1].logits.argmax(-1))
    torch.testing.assert_close(outs[1].hidden, outs[0].hidden, rtol=1e-4, atol=1e-4)
