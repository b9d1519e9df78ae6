"""Suffix drafting: the native index's proposal rule, the per-request + global drafter, the config, and the
hybrid (index rows + EAGLE-3 head rows) in the real step loop — lossless greedy, index rows costing the head
nothing, finished requests feeding the global index, on the tiny Llama and on the default model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import make_engine, random_prompts
from tide_trt.config import SuffixConfig, config_from_dict
from tide_trt.draft.drafter import ChainDrafter
from tide_trt.draft.suffix import SuffixDrafter, SuffixIndex, corpus_sequences, load_suffix_native
from tide_trt.engine.generator import GenerationRequest, SpeculativeGenerator
from tide_trt.errors import TideError
from tide_trt.runtime import run_to_completion
from tide_trt.spec.sampling import SamplingParams
from tide_trt.training.offline import new_head

pytestmark = pytest.mark.skipif(load_suffix_native() is None, reason="the native suffix index cannot be built here")


def ctx(*tokens: int) -> np.ndarray:
    return np.array(tokens, dtype=np.int32)


def test_most_frequent_continuation_with_path_confidence() -> None:
    ix = SuffixIndex(1000, [3, 2], max_candidates=16)
    ix.add_sequence([1, 2, 3, 4, 5, 6])
    ix.add_sequence([8, 2, 3, 4, 5, 7])
    ix.add_sequence([9, 2, 3, 4, 1, 1])
    tokens, conf, order = ix.propose(ctx(0, 2, 3, 4), 4, 0.0)
    # "2 3 4" occurred 3 times: 5 follows twice (2/3); then 7 (the newest of the two) and 6 tie at 1/3 each
    assert order == 3 and tokens == [5, 7] and conf == pytest.approx([2 / 3, 1 / 3])
    assert ix.propose(ctx(0, 2, 3, 4), 4, 0.5)[0] == [5]  # the path stops below min_confidence
    assert ix.propose(ctx(7, 7, 7), 4, 0.0) == ([], [], 0)


def test_longest_match_wins_and_sequences_never_run_together() -> None:
    ix = SuffixIndex(1000, [4, 2], max_candidates=16)
    ix.add_sequence([1, 5, 6, 7, 8])  # "5 6" -> 7 (under the longer context "1 5 6")
    for _ in range(3):
        ix.add_sequence([2, 5, 6, 9])  # "5 6" -> 9, three times
    assert ix.propose(ctx(0, 1, 5, 6), 2, 0.0)[0] == [9]  # order 4 "0 1 5 6" absent: order 2 -> 9
    ix.add_sequence([3, 1, 5, 6, 7, 8])
    tokens, conf, order = ix.propose(ctx(3, 1, 5, 6), 3, 0.0)
    assert (tokens, order) == ([7, 8], 4)  # the longest match; stops at the sequence's end (no run-on into "2")


def test_oldest_tokens_are_evicted() -> None:
    ix = SuffixIndex(64, [2], max_candidates=8)
    ix.add_sequence([1, 2, 3])
    assert ix.propose(ctx(1, 2), 1, 0.0)[0] == [3]
    for k in range(30):  # 90 more tokens: the first sequence falls out of the 64-token ring
        ix.add_sequence([10 + k, 11 + k])
    assert ix.size == 64
    assert ix.propose(ctx(1, 2), 1, 0.0)[0] == []


def test_a_loop_keeps_proposing_the_loop() -> None:
    ix = SuffixIndex(256, [3], max_candidates=8)
    ix.extend([9, 1, 2, 3, 1, 2, 3, 1, 2])  # one open sequence: the request's own history
    assert ix.propose(ctx(3, 1, 2), 7, 0.0)[0] == [3, 1, 2, 3, 1, 2, 3]


def test_bad_input_is_refused() -> None:
    ix = SuffixIndex(64, [2], max_candidates=4)
    with pytest.raises(ValueError, match=">= 0"):
        ix.extend([1, -5])
    assert ix.size == 0  # nothing of a refused call was indexed
    with pytest.raises(ValueError, match="capacity"):
        SuffixIndex(4, [2], max_candidates=4)
    with pytest.raises(TideError, match="draft.suffix.orders"):
        config_from_dict({"draft": {"suffix": {"orders": [0, 3]}}})
    with pytest.raises(TideError, match="draft.suffix.max_draft"):
        config_from_dict({"draft": {"gamma_max": 4, "suffix": {"max_draft": 6}}})
    with pytest.raises(TideError, match="unknown key"):
        config_from_dict({"draft": {"suffix": {"size": 3}}})


def test_request_index_first_then_global_and_slots_move() -> None:
    cfg = SuffixConfig(orders=[3, 2], request_orders=[3, 2], min_confidence=0.0, preload="")
    d = SuffixDrafter(cfg, max_slots=4, max_seq_len=64)
    d.add_finished([4, 5, 6, 7])
    own = [1, 4, 5, 8, 2, 4, 5]  # "4 5" -> 8 in this request, -> 6 in the global index
    prop = d.propose(0, own, 3)
    assert prop is not None and prop.source == "request" and prop.tokens[0] == 8
    prop = d.propose(1, [9, 4, 5], 3)
    assert prop is not None and prop.source == "global" and prop.tokens == (6, 7)
    d.move_slot(0, 3)  # compaction: the request index moves with its sequence
    prop = d.propose(3, own + [8], 3)
    assert prop is not None and prop.source == "request"
    d.reset_slot(3)
    prop = d.propose(3, [9, 4, 5], 3)
    assert prop is not None and prop.source == "global"


def test_corpus_preload(tmp_path) -> None:
    path = tmp_path / "corpus.npz"
    np.savez(path, prompt_flat=np.array([1, 2, 3, 7, 7], np.uint16), prompt_off=np.array([0, 3, 5]),
             greedy_prompt_index=np.array([1, 0], np.int32), greedy_resp_flat=np.array([9, 4, 5, 6], np.uint16),
             greedy_resp_off=np.array([0, 1, 4]))
    seqs = corpus_sequences(path)
    assert [s.tolist() for s in seqs] == [[7, 7, 9], [1, 2, 3, 4, 5, 6]]
    from tide_trt.draft.suffix import build_suffix_drafter

    d = build_suffix_drafter(SuffixConfig(preload=str(path), min_confidence=0.0), 2, 64)
    assert d is not None and d.stats()["global_sequences"] == 2
    prop = d.propose(0, [0, 2, 3, 4], 2)
    assert prop is not None and prop.tokens == (5, 6)
    with pytest.raises(TideError, match="no corpus file"):
        build_suffix_drafter(SuffixConfig(preload=str(tmp_path / "missing.npz")), 2, 64)
    (tmp_path / "notes.npz").write_bytes(b"not a corpus")
    with pytest.raises(TideError, match="not a token corpus"):
        build_suffix_drafter(SuffixConfig(preload=str(tmp_path / "notes.npz")), 2, 64)
    assert build_suffix_drafter(SuffixConfig(enabled=False), 2, 64) is None


# ---- the hybrid in the step loop -------------------------------------------------------------------------


def _run(engine, drafter, prompts, gamma, max_new=32, sampling=None, gen=None):
    gen = gen or SpeculativeGenerator(engine, drafter)
    reqs = [GenerationRequest(f"r{i}", p, max_new, sampling=sampling or SamplingParams())
            for i, p in enumerate(prompts)]
    return run_to_completion(gen, reqs, gamma).sequences, gen


def _hybrid_drafter(engine, cfg: SuffixConfig) -> ChainDrafter:
    torch.manual_seed(0)
    head = new_head(engine, torch.arange(engine.info.vocab_size))  # untrained: accepted drafts come from the index
    info = engine.info
    return ChainDrafter(head, info.max_batch_size, info.max_seq_len, torch.float32, "cpu",
                        suffix=SuffixDrafter(cfg, info.max_batch_size, info.max_seq_len))


def test_hybrid_greedy_is_lossless_and_learns_from_finished_requests(tiny_checkpoint, monkeypatch) -> None:
    engine = make_engine(tiny_checkpoint)
    prompts = random_prompts(6, 96, seed=21)
    plain, _ = _run(engine, None, prompts, 0)
    drafter = _hybrid_drafter(engine, SuffixConfig(preload="", min_confidence=0.0))
    head_calls: list[int] = []
    real = drafter.propose
    monkeypatch.setattr(drafter, "propose", lambda slots, *a, **k: head_calls.append(len(slots)) or real(slots, *a,
                                                                                                          **k))
    first, gen = _run(engine, drafter, prompts[:3], 3)  # the index holds nothing yet: the head drafts
    for a, s in zip(plain[:3], first, strict=True):
        assert s.output_ids == a.output_ids
    assert gen.draft_source_stats["head"]["rows"] > 0
    assert drafter.suffix is not None and drafter.suffix.sequences_indexed == 3  # finished requests joined it
    head_calls.clear()
    again, gen = _run(engine, drafter, prompts, 3)  # 3 repeats (the index knows their answers) + 3 new ones
    for a, s in zip(plain, again, strict=True):
        assert s.output_ids == a.output_ids
    idx, head = gen.draft_source_stats["index"], gen.draft_source_stats["head"]
    assert idx["rows"] > 0 and head["rows"] > 0  # both kinds of rows, in the same steps
    for s in again[:3]:  # repeats: the index drafts what the target says
        assert s.accepted_tokens > 0.6 * s.draft_tokens, (s.accepted_tokens, s.draft_tokens)
    alone, _ = _run(engine, drafter, prompts[:1], 3)  # one row (memory-bound step): index drafts up to max_draft
    assert alone[0].output_ids == plain[0].output_ids
    assert alone[0].steps <= 6, alone[0].steps  # 32 tokens in a few steps: γᵢ up to 8, beyond the step's γ = 3
    assert sum(head_calls) == head["rows"]  # index rows never reach the head


def test_hybrid_sampling_feeds_one_hot_index_distributions(tiny_checkpoint, monkeypatch) -> None:
    """Sampled decoding with index rows and head rows in one batch: an index row hands verification a one-hot
    draft distribution at its tokens (the distribution test in test_spec_sampling_distribution.py checks the
    law of the output for such batches)."""
    import tide_trt.engine.generator as generator_module

    engine = make_engine(tiny_checkpoint)
    drafter = _hybrid_drafter(engine, SuffixConfig(preload="", min_confidence=0.0))
    prompts = random_prompts(4, 96, seed=5)
    seen = []
    real = generator_module.verify_flat

    def spy(logits, layout, sampling=None, draft_probs=None):
        seen.append((layout.draft_ids.clone(), layout.is_draft.clone(),
                     None if draft_probs is None else draft_probs.clone()))
        return real(logits, layout, sampling, draft_probs)

    monkeypatch.setattr(generator_module, "verify_flat", spy)
    greedy, _ = _run(engine, drafter, prompts[:2], 0)  # outputs of two prompts join the global index
    sampling = SamplingParams(temperature=0.7, seed=11)
    seqs, gen = _run(engine, drafter, prompts, 3, max_new=24, sampling=sampling)
    assert all(len(s.output_ids) == 24 for s in seqs)
    assert gen.draft_source_stats["index"]["rows"] > 0 and gen.draft_source_stats["head"]["rows"] > 0
    one_hot_rows = 0  # judged drafts whose q is one-hot at the draft (index rows)
    for drafts, is_draft, probs in seen:
        if probs is None:
            continue
        for m in is_draft.nonzero().flatten().tolist():
            if torch.equal(probs[m], torch.nn.functional.one_hot(drafts[m], 96).float()):
                one_hot_rows += 1
    assert one_hot_rows > 0


@pytest.mark.slow
def test_default_model_hybrid_greedy_identical_and_repeats_speed_up(default_checkpoint, default_tokenizer,
                                                                     default_draft_dir) -> None:
    from tide_trt.kernels import load_gemm_bf16w
    from tide_trt.runtime import build_drafter, encode_prompt
    from tide_trt.workloads import sharegpt_prompts

    native = load_gemm_bf16w() is not None
    engine = make_engine(default_checkpoint, dtype="bfloat16" if native else "float32", max_batch_size=3,
                         max_seq_len=320, tokenizer=default_tokenizer, cpu_kernels="auto" if native else "off")
    prompts = [encode_prompt(default_tokenizer, p)[:160] for p in sharegpt_prompts(3, seed=5)]
    plain, _ = _run(engine, None, prompts, 0, max_new=64)
    drafter = build_drafter(engine, default_draft_dir, suffix=SuffixConfig())  # shipped corpus preloaded
    spec, gen = _run(engine, drafter, prompts, 3, max_new=64)
    for a, s in zip(plain, spec, strict=True):
        assert s.output_ids == a.output_ids
    assert gen.draft_source_stats["index"]["accepted_tokens"] > 0
    assert gen.draft_source_stats["head"]["accepted_tokens"] > 0
    # served before: the global index has the answers (one row at a time: index drafts up to max_draft)
    again = [_run(engine, drafter, [p], 3, max_new=64)[0][0] for p in prompts]
    for a, s in zip(plain, again, strict=True):
        assert s.output_ids == a.output_ids
    tau = sum(len(s.output_ids) - 1 for s in again) / sum(s.steps for s in again)
    assert tau > 4.0, tau


def test_the_global_index_survives_a_refit(tiny_checkpoint) -> None:
    """A refit swaps the head only: the suffix index (and what it learned from served requests) stays."""
    engine = make_engine(tiny_checkpoint)
    drafter = _hybrid_drafter(engine, SuffixConfig(preload="", min_confidence=0.0))
    _run(engine, drafter, random_prompts(2, 96, seed=4), 0)
    suffix = drafter.suffix
    assert suffix is not None and suffix.sequences_indexed == 2
    torch.manual_seed(1)
    drafter.swap(new_head(engine, torch.arange(96)), version=7)
    assert drafter.version == 7 and drafter.suffix is suffix and suffix.sequences_indexed == 2
