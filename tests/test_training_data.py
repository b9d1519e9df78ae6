"""Self-distillation data: regeneration keeps prompt order, chunks are saved, resumed and checked."""

from __future__ import annotations

import pytest

from tests.conftest import make_engine, random_prompts
from tide_trt.training import data


def test_regenerate_chunked_saves_resumes_and_refuses_other_prompts(tiny_checkpoint, tmp_path, monkeypatch):
    engine = make_engine(tiny_checkpoint, max_batch_size=3, max_seq_len=64)
    prompts = random_prompts(7, engine.info.vocab_size, seed=5, max_len=12)
    first = data.regenerate_chunked(engine, prompts, 6, str(tmp_path), chunk_size=3, progress=False)
    assert len(first) == 7 and sorted(p.name for p in tmp_path.iterdir()) == [
        "chunk_00000_of3.safetensors", "chunk_00001_of3.safetensors", "chunk_00002_of3.safetensors"]
    for ex, prompt in zip(first, prompts, strict=True):  # prompt order, prompt + response, response labelled
        n = len(prompt)
        assert ex.tokens[:n] == prompt and n <= len(ex.tokens) <= n + 5  # 6 new tokens, the last has no state
        assert ex.labels[: n - 1] == [-1] * (n - 1)  # prompt positions: no target prediction recorded
        assert ex.labels[n - 1 : -1] == ex.tokens[n:]  # each response token is the label of the position before
        assert ex.hidden.shape == (len(ex.tokens), 3, engine.info.hidden_size)

    def no_generation(*args, **kwargs):
        raise AssertionError("a cached chunk was regenerated")

    monkeypatch.setattr(data, "regenerate_examples", no_generation)
    again = data.regenerate_chunked(engine, prompts, 6, str(tmp_path), chunk_size=3, progress=False)
    assert [e.tokens for e in again] == [e.tokens for e in first]
    assert all((a.hidden == b.hidden).all() for a, b in zip(again, first, strict=True))
    with pytest.raises(ValueError, match="other prompts"):
        data.regenerate_chunked(engine, prompts[1:], 6, str(tmp_path), chunk_size=3, progress=False)
