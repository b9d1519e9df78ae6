"""TargetEngine (torch backend): numerics vs Hugging Face, ragged batches, KV-cache rollback, capture."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_engine, random_prompts
from tide_trt.errors import TideError


def hf_reference(model_dir, ids: list[int]):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        return hf(torch.tensor([ids]), output_hidden_states=True)


def test_tiny_matches_huggingface_logits_and_capture(tiny_model_dir, tiny_engine):
    ids = random_prompts(1, 96, seed=3, min_len=20, max_len=20)[0]
    ref = hf_reference(tiny_model_dir, ids)
    slot = tiny_engine.allocate_slot()
    out = tiny_engine.forward([slot], [ids], logits="all")
    assert torch.allclose(out.logits[0], ref.logits[0], atol=1e-4)
    for j, layer in enumerate(tiny_engine.info.capture_layers):
        assert torch.allclose(out.hidden[0, :, j], ref.hidden_states[layer][0], atol=1e-4)


def test_default_model_matches_huggingface(default_checkpoint):
    engine = make_engine(default_checkpoint, dtype="float32", max_batch_size=1, max_seq_len=128)
    assert engine.info.capture_layers == (2, 15, 27)
    ids = list(range(200, 232))
    ref = hf_reference(default_checkpoint.path, ids)
    out = engine.forward([engine.allocate_slot()], [ids], logits="all")
    assert (out.logits[0] - ref.logits[0]).abs().max() < 1e-3
    assert (out.hidden[0, :, 2] - ref.hidden_states[27][0]).abs().max() < 1e-3


def test_ragged_batch_equals_individual_runs(tiny_checkpoint):
    prompts = random_prompts(5, 96, seed=1)
    batched = make_engine(tiny_checkpoint)
    slots = [batched.allocate_slot() for _ in prompts]
    out = batched.forward(slots, prompts, logits="last")
    single = make_engine(tiny_checkpoint)
    for b, p in enumerate(prompts):
        s = single.allocate_slot()
        ref = single.forward([s], [p], logits="last")
        assert torch.allclose(out.logits[b, 0], ref.logits[0, 0], atol=1e-5)
        assert torch.allclose(out.hidden[b, : len(p)], ref.hidden[0], atol=1e-5)
        assert batched.seq_len(slots[b]) == len(p)


def test_rollback_gives_fresh_prefill_logits(tiny_engine):
    """After rejected tokens are rolled back (length change, no copy) the cache behaves like a fresh prefill."""
    prompt, rejected, kept_next = [5, 9, 17, 33, 4], [60, 61, 62, 63], [70, 71]
    slot = tiny_engine.allocate_slot()
    tiny_engine.forward([slot], [prompt])
    tiny_engine.forward([slot], [rejected], logits="all")  # a verification chunk that gets rejected
    tiny_engine.truncate(slot, len(prompt) + 1)  # keep only the first token of the chunk
    rolled = tiny_engine.forward([slot], [kept_next], logits="all")
    fresh_engine_slot = tiny_engine.allocate_slot()
    fresh = tiny_engine.forward([fresh_engine_slot], [prompt + rejected[:1] + kept_next], logits="all")
    assert torch.allclose(rolled.logits[0], fresh.logits[0, -2:], atol=1e-5)
    assert torch.allclose(rolled.hidden[0], fresh.hidden[0, -2:], atol=1e-5)


def test_mixed_lengths_decode_step(tiny_engine):
    prompts = random_prompts(3, 96, seed=7)
    slots = [tiny_engine.allocate_slot() for _ in prompts]
    tiny_engine.forward(slots, prompts)
    step = tiny_engine.forward(slots, [[11, 12, 13]] * 3, logits="all")
    for b, p in enumerate(prompts):
        ref_slot = tiny_engine.allocate_slot()
        ref = tiny_engine.forward([ref_slot], [p + [11, 12, 13]], logits="all")
        assert torch.allclose(step.logits[b], ref.logits[0, -3:], atol=1e-5)
        tiny_engine.free_slot(ref_slot)


def test_ragged_verification_chunks_equal_individual_runs(tiny_checkpoint):
    """A probe step: some rows verify γ+1 tokens while the others decode one. The matmuls run on the real rows
    only (the flat step batch); every row still equals a run of that sequence alone, and padded positions are zero."""
    prompts = random_prompts(4, 96, seed=9)
    chunks = [[11, 12, 13], [14], [15], [16, 17, 18]]
    engine = make_engine(tiny_checkpoint)
    slots = [engine.allocate_slot() for _ in prompts]
    engine.forward(slots, prompts)
    step = engine.forward(slots, chunks, logits="all")
    for b, (p, c) in enumerate(zip(prompts, chunks, strict=True)):
        ref_slot = engine.allocate_slot()
        ref = engine.forward([ref_slot], [p + c], logits="all")
        n = len(c)
        assert torch.allclose(step.logits[b, :n], ref.logits[0, -n:], atol=1e-5)
        assert torch.allclose(step.hidden[b, :n], ref.hidden[0, -n:], atol=1e-5)
        assert not step.logits[b, n:].any()
        assert engine.seq_len(slots[b]) == len(p) + n
        engine.free_slot(ref_slot)


def test_slots_and_limits(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint, max_batch_size=2, max_seq_len=16)
    a, b = engine.allocate_slot(), engine.allocate_slot()
    assert engine.num_free_slots == 0
    with pytest.raises(TideError):
        engine.allocate_slot()
    with pytest.raises(TideError, match="max_seq_len"):
        engine.forward([a], [list(range(3, 20))])
    engine.free_slot(b)
    assert engine.num_free_slots == 1
    with pytest.raises(ValueError):
        engine.truncate(a, 5)


def test_bad_capture_layers_refused(tiny_checkpoint):
    from tide_trt.config import EngineConfig
    from tide_trt.engine.torch_engine import TorchTargetEngine

    with pytest.raises(TideError, match="capture_layers"):
        TorchTargetEngine(tiny_checkpoint, EngineConfig(capture_layers=[1, 2, 99]))


def test_slot_compaction_keeps_cache(tiny_engine):
    """move_slot copies a live sequence's KV into a free slot; decoding continues identically."""
    prompts = random_prompts(3, 96, seed=9)
    slots = [tiny_engine.allocate_slot() for _ in prompts]
    tiny_engine.forward(slots, prompts)
    tiny_engine.free_slot(slots[0])
    tiny_engine.move_slot(slots[2], slots[0])
    moved = tiny_engine.forward([slots[0]], [[7, 8]], logits="all")
    ref_slot = tiny_engine.allocate_slot()
    ref = tiny_engine.forward([ref_slot], [prompts[2] + [7, 8]], logits="all")
    assert torch.allclose(moved.logits[0], ref.logits[0, -2:], atol=1e-5)
    assert tiny_engine.seq_len(slots[0]) == len(prompts[2]) + 2


@pytest.mark.parametrize(("b", "t"), [(1, 1), (3, 4), (5, 9)])
def test_grouped_attention_matches_sdpa(b, t):
    from tide_trt.models.llama import attention

    gen = torch.Generator().manual_seed(b * 10 + t)
    q = torch.randn(b, 6, t, 16, generator=gen)
    k = torch.randn(b, 2, 20, 16, generator=gen)
    v = torch.randn(b, 2, 20, 16, generator=gen)
    starts = torch.randint(0, 20 - t, (b,), generator=gen)
    mask = (torch.arange(20)[None, None, :] <= (starts[:, None] + torch.arange(t)[None, :])[:, :, None])[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=0.25)
    assert torch.allclose(attention(q, k, v, mask, False, 0.25), ref, atol=1e-5)


def test_local_hf_checkpoint_dir_loads(default_checkpoint, tmp_path):
    """Any local HF Llama directory (config.json + safetensors + tokenizer) loads; pickle-only dirs are refused."""
    from tide_trt.models.loader import load_checkpoint, load_tokenizer

    local = load_checkpoint(str(default_checkpoint.path))
    assert local.fingerprint == default_checkpoint.fingerprint
    assert load_tokenizer(local.path).encode("hello") == load_tokenizer(default_checkpoint.path).encode("hello")
    (tmp_path / "config.json").write_text((default_checkpoint.path / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(TideError, match="safetensors"):
        load_checkpoint(str(tmp_path))
