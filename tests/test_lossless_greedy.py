"""Greedy speculative decoding is token-for-token identical to plain greedy decoding.

Rule enforced (docs/ARCHITECTURE.md, "Losslessness"): in float32 the outputs are identical, always. In bfloat16
the target's verification chunk (γ+1 tokens) rounds differently from a one-token step; outputs must be
identical up to the first position where plain decoding's top-2 logit margin is below BF16_TIE_MARGIN (a
near-tie that bf16 rounding alone can flip); the LM head runs in float32 so exact bf16 ties do not occur.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_engine, random_prompts
from tide_trt.draft.drafter import ChainDrafter
from tide_trt.draft.plan import StepDrafting
from tide_trt.engine.generator import GenerationRequest, SpeculativeGenerator
from tide_trt.runtime import run_to_completion
from tide_trt.training.data import recompute_examples
from tide_trt.training.offline import TrainSettings, build_vocab_and_head, train_head

BF16_TIE_MARGIN = 0.05


@pytest.fixture(scope="module")
def tiny_trained_head(tiny_checkpoint):
    """A draft trained for a few seconds on the tiny target's own greedy outputs, so that drafts are
    partly accepted (every verification outcome is exercised), not all rejected."""
    engine = make_engine(tiny_checkpoint, max_batch_size=16)
    gen = SpeculativeGenerator(engine)
    reqs = [GenerationRequest(str(i), p, 48) for i, p in enumerate(random_prompts(16, 96, seed=11))]
    done = run_to_completion(gen, reqs, 0)
    seqs = [s.tokens for s in done.sequences]
    examples = recompute_examples(engine, seqs, progress=False, store_dtype=torch.float32)
    head, t2d, _ = build_vocab_and_head(engine, examples, 64)
    train_head(head, examples, t2d, TrainSettings(epochs=30, batch_size=8, lr=3e-3, ttt_steps=3), progress=False)
    return head


def _run(engine, drafter, prompts, gamma, max_new=40, catch_up_window=0):
    if drafter is not None:
        drafter.catch_up_window = catch_up_window
    gen = SpeculativeGenerator(engine, drafter)
    reqs = [GenerationRequest(str(i), p, max_new) for i, p in enumerate(prompts)]
    return run_to_completion(gen, reqs, gamma).sequences


@pytest.mark.parametrize("gamma", [1, 2, 3, 4, 5, 6, 7, 8])
def test_tiny_greedy_identical_all_gammas(tiny_checkpoint, tiny_trained_head, gamma):
    engine = make_engine(tiny_checkpoint)
    prompts = random_prompts(6, 96, seed=100 + gamma)  # mixed lengths in one batch
    plain = _run(engine, None, prompts, 0)
    drafter = ChainDrafter(tiny_trained_head, 8, 256, torch.float32, "cpu")
    spec = _run(engine, drafter, prompts, gamma)
    for a, s in zip(plain, spec, strict=False):
        assert s.output_ids == a.output_ids
    accepted = sum(s.accepted_tokens for s in spec)
    assert 0 < accepted < sum(s.draft_tokens for s in spec), "draft must be partly accepted to test anything"


def test_tiny_requests_joining_mid_batch(tiny_checkpoint, tiny_trained_head):
    """Continuous batching: requests added between steps still decode exactly as alone."""
    engine = make_engine(tiny_checkpoint)
    prompts = random_prompts(5, 96, seed=5)
    plain = {s.request.request_id: s.output_ids for s in _run(engine, None, prompts, 0)}
    gen = SpeculativeGenerator(engine, ChainDrafter(tiny_trained_head, 8, 256, torch.float32, "cpu"))
    pending = [GenerationRequest(str(i), p, 40) for i, p in enumerate(prompts)]
    outputs = {}
    step = 0
    while pending or gen.num_active:
        if pending and step % 3 == 0:
            gen.add(pending.pop(0))
        gen.step(1 + step % 4)  # γ changes every step too
        for rid, seq in list(gen.sequences.items()):
            if seq.finished:
                outputs[rid] = gen.release(rid).output_ids
        step += 1
    assert outputs == plain


def test_tiny_probe_subset_drafts_while_others_decode(tiny_checkpoint, tiny_trained_head):
    """A controller probe drafts for a few requests only: in the same target pass the others decode one token.
    Every request still decodes exactly as plain greedy, and only the chosen ones draft."""
    engine = make_engine(tiny_checkpoint)
    prompts = random_prompts(6, 96, seed=21)
    plain = {s.request.request_id: s.output_ids for s in _run(engine, None, prompts, 0)}
    gen = SpeculativeGenerator(engine, ChainDrafter(tiny_trained_head, 8, 256, torch.float32, "cpu"))
    for i, p in enumerate(prompts):
        gen.add(GenerationRequest(str(i), p, 40))
    outputs, step, drafted = {}, 0, 0
    while gen.num_active:
        ids = sorted(gen.sequences)
        chosen = set(ids[step % len(ids)::3])  # a rotating third of the batch drafts
        for ev in gen.step(StepDrafting(1 + step % 3, rows=chosen)):
            if not ev.is_prefill:
                assert (ev.num_draft > 0) == (ev.request_id in chosen)
                drafted += ev.num_draft
        for rid, seq in list(gen.sequences.items()):
            if seq.finished:
                outputs[rid] = gen.release(rid).output_ids
        step += 1
    assert outputs == plain
    assert drafted > 0


def test_tiny_bounded_catch_up_is_lossless(tiny_checkpoint, tiny_trained_head):
    """With a catch-up window the draft restarts on a prompt's last positions (and after a probe gap) instead of
    reading the whole context: proposals change, outputs do not."""
    engine = make_engine(tiny_checkpoint)
    prompts = random_prompts(6, 96, seed=31, min_len=12)
    plain = _run(engine, None, prompts, 0)
    drafter = ChainDrafter(tiny_trained_head, 8, 256, torch.float32, "cpu")
    spec = _run(engine, drafter, prompts, 3, catch_up_window=5)
    assert [s.output_ids for s in spec] == [s.output_ids for s in plain]
    assert max(drafter.origin) > 0  # frames were restarted
    assert sum(s.accepted_tokens for s in spec) > 0


def _margins(engine, prompt: list[int], out: list[int]) -> list[float]:
    slot = engine.allocate_slot()
    logits = [engine.forward([slot], [prompt]).logits[0, -1]]
    for t in out[:-1]:
        logits.append(engine.forward([slot], [[t]]).logits[0, -1])
    engine.free_slot(slot)
    return [float(v[0] - v[1]) for v in (lg.topk(2).values for lg in logits)]


def assert_bf16_equivalent(engine, plain_seq, spec_seq) -> None:
    a, s = plain_seq.output_ids, spec_seq.output_ids
    if a == s:
        return
    i = next((j for j, (x, y) in enumerate(zip(a, s, strict=False)) if x != y), min(len(a), len(s)))
    margin = _margins(engine, plain_seq.request.prompt_ids, a)[i]
    assert margin < BF16_TIE_MARGIN, f"diverged at {i} with top-2 margin {margin:.4f} (not a bf16 near-tie)"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "native", "q4_1"])
def test_default_model_greedy_lossless(default_checkpoint, default_tokenizer, default_draft_dir, dtype):
    """float32, native (bf16 weights, fp32 activations, batch-invariant kernel) and q4_1 (the GGUF's own blocks in
    the batch-invariant GGUF kernel): token-identical. bfloat16 end to end: identical up to the documented bf16
    near-tie rule."""
    from tide_trt.runtime import build_drafter, encode_prompt
    from tide_trt.workloads import sharegpt_prompts

    native = dtype in ("native", "q4_1")
    if native:
        from tide_trt.kernels import load_gemm_bf16w, load_gemm_gguf

        if (load_gemm_gguf() if dtype == "q4_1" else load_gemm_bf16w()) is None:
            pytest.skip("native kernel not buildable here (no AVX2 or C++ compiler)")
    engine = make_engine(default_checkpoint, dtype="bfloat16" if native else dtype, max_batch_size=4,
                         max_seq_len=384, tokenizer=default_tokenizer, cpu_kernels="auto" if native else "off",
                         weights="q4_1" if dtype == "q4_1" else "bf16")
    assert engine.info.native_linears == native
    assert engine.info.weights == ("q4_1" if dtype == "q4_1" else "bf16")
    prompts = [encode_prompt(default_tokenizer, p)[:160] for p in sharegpt_prompts(4, seed=3)]
    plain = _run(engine, None, prompts, 0, max_new=48)
    drafter = build_drafter(engine, default_draft_dir)
    for gamma in (1, 3, 5):
        spec = _run(engine, drafter, prompts, gamma, max_new=48)
        assert sum(s.accepted_tokens for s in spec) > 0
        for a, s in zip(plain, spec, strict=False):
            if dtype in ("float32", "native", "q4_1"):
                assert s.output_ids == a.output_ids
            else:
                assert_bf16_equivalent(engine, a, s)


def test_long_prompt_joiner_does_not_overflow_draft_cache(tiny_checkpoint, tiny_trained_head):
    """A joiner's long catch-up is not padded onto rows that are already deep into their context."""
    engine = make_engine(tiny_checkpoint, max_batch_size=2, max_seq_len=64)
    drafter = ChainDrafter(tiny_trained_head, 2, 64, torch.float32, "cpu")
    long_a, long_b = random_prompts(2, 96, seed=77, min_len=36, max_len=40)
    plain = {s.request.request_id: s.output_ids for s in _run(engine, None, [long_a, long_b], 0, max_new=20)}
    gen = SpeculativeGenerator(engine, drafter)
    gen.add(GenerationRequest("0", long_a, 20))
    for _ in range(6):
        gen.step(3)
    gen.add(GenerationRequest("1", long_b, 20))
    while any(not s.finished for s in gen.sequences.values()):
        gen.step(3)
    assert {rid: s.output_ids for rid, s in gen.sequences.items()} == plain
