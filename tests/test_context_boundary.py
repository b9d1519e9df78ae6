"""Speculation at the context boundary (`max_seq_len`).

With speculation on, sequences run into the context limit: γ must be capped so that no verification pass
writes past `max_seq_len`, the engine must not raise, the sequence must end
with finish_reason "context", the target KV length must stay `len(tokens) - 1` (the last token is pending) at
every step (and reach, never pass, the limit in verification: observed on `truncate`, which rolls every verified
row back), and greedy outputs must equal plain greedy decoding up to the boundary. Drafts: n-gram lookups over
prompts that repeat a pattern (accepted often, so full acceptances happen right at the boundary) with an
untrained head for the other rows; the default model with its shipped draft in the last test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import make_engine, random_prompts
from tide_trt.draft.drafter import ChainDrafter
from tide_trt.draft.plan import StepDrafting
from tide_trt.engine.base import TargetEngine
from tide_trt.engine.generator import GenerationRequest, SequenceState, SpeculativeGenerator
from tide_trt.models.loader import LoadedCheckpoint
from tide_trt.spec.sampling import SamplingParams
from tide_trt.training.offline import new_head

MAX_SEQ_LEN = 48
VOCAB = 96  # the tiny checkpoint's
GAMMA = 5


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one intra-op thread (conftest)


class KVSpy:
    """Watches a real engine's KV lengths: the generator rolls every verified row back with `truncate`, so the
    slot's length just before that call is how far the verification pass wrote. Checks it stays in the context."""

    def __init__(self, engine: TargetEngine):
        self.engine = engine
        self.real = engine.truncate
        self.max_end = 0  # the longest cached length any step reached
        self.calls = 0

    def __call__(self, slot: int, length: int) -> None:
        limit = self.engine.info.max_seq_len
        end = self.engine.seq_len(slot)
        assert end <= limit, f"a verification wrote position {end - 1} in slot {slot}; max_seq_len={limit}"
        self.max_end = max(self.max_end, end)
        self.calls += 1
        self.real(slot, length)


def loopy_prompts(lengths: list[int], seed: int) -> list[list[int]]:
    """Prompts of the given lengths that repeat a short pattern (n-gram lookups find continuations)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        pattern = torch.randint(3, VOCAB, (int(torch.randint(2, 4, (1,), generator=gen)),), generator=gen).tolist()
        out.append((torch.randint(3, VOCAB, (2,), generator=gen).tolist() + pattern * n)[:n])
    return out


def plain_greedy(engine: TargetEngine, prompts: list[list[int]], max_new: int) -> list[SequenceState]:
    gen = SpeculativeGenerator(engine)
    seqs = [gen.add(GenerationRequest(str(i), p, max_new)) for i, p in enumerate(prompts)]
    while any(not s.finished for s in seqs):
        gen.step(0)
    for s in seqs:
        gen.release(s.request.request_id)
    return seqs


def run_speculative(engine: TargetEngine, drafter: ChainDrafter, requests: list[GenerationRequest], gamma: int,
                    probe: bool = False) -> tuple[list[SequenceState], dict[str, int]]:
    """Step until every request finished, checking KV lengths and the γ cap at every step. probe: every other
    step only half of the requests draft (the others decode one token in the same, wider, target pass)."""
    gen = SpeculativeGenerator(engine, drafter)
    seqs = [gen.add(r) for r in requests]
    limit = engine.info.max_seq_len
    stats = {"capped": 0, "full_accept_at_limit": 0, "steps": 0}
    while any(not s.finished for s in seqs):
        running = [s for s in seqs if s.prefilled and not s.finished]
        before = {s.request.request_id: len(s.tokens) for s in seqs}
        drafting = None
        if probe and stats["steps"] % 2:
            drafting = {s.request.request_id for s in running[::2]}
        for ev in gen.step(StepDrafting(gamma, rows=drafting)):
            if ev.is_prefill:
                continue
            n = before[ev.request_id]
            assert ev.num_draft <= min(gamma, limit - n), (ev, n)  # verification needs γ + 1 positions
            stats["capped"] += 0 < ev.num_draft < gamma
            # every capped draft accepted, and the output reached the limit
            stats["full_accept_at_limit"] += (0 < ev.num_draft < gamma and ev.num_accepted == ev.num_draft
                                              and n + ev.num_draft + 1 >= limit)
        for s in seqs:
            assert len(s.tokens) <= limit + 1
            if not s.finished:
                assert engine.seq_len(s.slot) == len(s.tokens) - 1, "target KV length != committed tokens"
            else:
                assert engine.seq_len(s.slot) <= limit
        stats["steps"] += 1
    for s in seqs:
        gen.release(s.request.request_id)
    assert engine.num_free_slots == engine.info.max_batch_size
    return seqs, stats


def boundary_prompts() -> list[list[int]]:
    """Lengths right at the limit (the prefill's token ends it), a few tokens short, and further away."""
    return loopy_prompts([MAX_SEQ_LEN - 1, MAX_SEQ_LEN - 2, MAX_SEQ_LEN - 3, 40, 33, 26, 17, 12], seed=4)


def tiny_drafter(engine: TargetEngine) -> ChainDrafter:
    torch.manual_seed(0)
    head = new_head(engine, torch.arange(0, VOCAB, 2))  # an untrained head; the lookups make the acceptances
    return ChainDrafter(head, engine.info.max_batch_size, engine.info.max_seq_len, torch.float32, "cpu",
                        lookup_ngram=2)


@pytest.mark.parametrize("probe", [False, True])
def test_greedy_speculation_runs_into_the_context_limit(tiny_checkpoint: LoadedCheckpoint,
                                                       monkeypatch: pytest.MonkeyPatch, probe: bool) -> None:
    engine = make_engine(tiny_checkpoint, max_batch_size=8, max_seq_len=MAX_SEQ_LEN)
    prompts = boundary_prompts()
    plain = plain_greedy(engine, prompts, max_new=1000)
    assert all(s.finish_reason == "context" and len(s.tokens) == MAX_SEQ_LEN for s in plain)
    spy = KVSpy(engine)
    monkeypatch.setattr(engine, "truncate", spy)
    # each request alone (γ is capped by its own room) and all together (by the tightest sequence's)
    batches = [[p] for p in prompts] + [prompts]
    capped = 0
    for batch in batches:
        reqs = [GenerationRequest(str(i), p, 1000) for i, p in enumerate(batch)]
        seqs, stats = run_speculative(engine, tiny_drafter(engine), reqs, GAMMA, probe)
        for s, a in zip(seqs, [plain[prompts.index(p)] for p in batch], strict=True):
            assert s.finish_reason == "context"
            assert s.output_ids[: len(a.output_ids)] == a.output_ids, "speculative != plain greedy"
            assert len(s.tokens) >= MAX_SEQ_LEN
        capped += stats["capped"]
    assert capped >= len(batches) // 2  # the boundary really capped γ, in most runs
    assert spy.max_end >= MAX_SEQ_LEN - 1  # verification reached the last usable positions, never beyond


def test_speculative_output_stops_at_the_context_limit_like_plain_decoding(tiny_checkpoint: LoadedCheckpoint
                                                                          ) -> None:
    engine = make_engine(tiny_checkpoint, max_batch_size=8, max_seq_len=MAX_SEQ_LEN)
    prompts = boundary_prompts()
    plain = plain_greedy(engine, prompts, max_new=1000)
    seqs, stats = run_speculative(engine, tiny_drafter(engine),
                                  [GenerationRequest(str(i), p, 1000) for i, p in enumerate(prompts)], GAMMA)
    assert stats["full_accept_at_limit"] > 0, "no full acceptance at the boundary: nothing was tested"
    for s, a in zip(seqs, plain, strict=True):
        assert len(s.tokens) <= MAX_SEQ_LEN
        assert s.output_ids == a.output_ids


def test_sampled_speculation_runs_into_the_context_limit(tiny_checkpoint: LoadedCheckpoint,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(tiny_checkpoint, max_batch_size=8, max_seq_len=MAX_SEQ_LEN)
    spy = KVSpy(engine)
    monkeypatch.setattr(engine, "truncate", spy)
    prompts = boundary_prompts()[2:] + random_prompts(2, VOCAB, seed=3, min_len=30, max_len=44)
    reqs = [GenerationRequest(str(i), p, 1000, SamplingParams(0.9, top_p=0.95, seed=i)) for i, p in enumerate(prompts)]
    seqs, stats = run_speculative(engine, tiny_drafter(engine), reqs, GAMMA, probe=True)
    assert all(s.finish_reason == "context" and len(s.tokens) >= MAX_SEQ_LEN for s in seqs)
    assert stats["capped"] > 0 and spy.max_end >= MAX_SEQ_LEN - 1


@pytest.mark.slow
def test_default_model_speculation_at_the_context_limit(default_checkpoint: LoadedCheckpoint, default_tokenizer: object,
                                                        default_draft_dir: Path, monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """The real model and its shipped draft (float32: token-identical to plain decoding), prompts ending 24 and
    9 tokens before the limit."""
    from tide_trt.runtime import build_drafter, encode_prompt
    from tide_trt.workloads import sharegpt_prompts

    limit = 112
    engine = make_engine(default_checkpoint, dtype="float32", max_batch_size=2, max_seq_len=limit,
                         tokenizer=default_tokenizer)
    prompts = [encode_prompt(default_tokenizer, p)[: limit - cut] for p, cut in zip(sharegpt_prompts(2, seed=7),
                                                                                   (24, 9), strict=True)]
    plain = plain_greedy(engine, prompts, max_new=1000)
    spy = KVSpy(engine)
    monkeypatch.setattr(engine, "truncate", spy)
    seqs, stats = run_speculative(engine, build_drafter(engine, default_draft_dir),
                                  [GenerationRequest(str(i), p, 1000) for i, p in enumerate(prompts)], 4)
    for s, a in zip(seqs, plain, strict=True):
        assert a.finish_reason == s.finish_reason == "context"
        assert s.output_ids[: len(a.output_ids)] == a.output_ids
    assert sum(s.accepted_tokens for s in seqs) > 0 and stats["capped"] > 0
    assert spy.max_end >= limit - 1
