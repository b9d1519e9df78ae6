"""Draft-side state vs recompute: after rejections, bounded catch-up windows, slot compaction and refits, the
live drafter's next draft distribution equals that of a FRESH drafter that prefills the kept tokens.

Greedy-lossless tests cannot see draft bugs (a stale draft KV cache only lowers acceptance), so this compares
the draft itself. Real generator steps run with speculation (rejections and acceptances both happen: asserted).
After each step, for every running sequence:
- the target KV length equals the committed tokens (`len(tokens) - 1`; the last token is pending);
- capture states of the kept positions are recomputed by an independent target prefill;
- a copy of the live drafter proposes γ tokens from its own cache plus the entries it has not seen yet (from
  `next_position`), and a fresh drafter with the same head proposes from a prefill of the kept entries of the
  sequence's frame (position 0, or where a bounded catch-up restarted it), with the same seeded generator;
- both give the same draft distributions at every chain step (float32, |Δp| <= 1e-5) and the same tokens.
A fresh drafter over a frame shifted by one position gives different distributions (asserted too), so the check
can tell a wrong frame apart.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import make_engine, random_prompts
from tide_trt.draft.drafter import ChainDrafter, DraftSampling
from tide_trt.draft.eagle3 import Eagle3Head
from tide_trt.draft.plan import StepDrafting
from tide_trt.engine.base import TargetEngine
from tide_trt.engine.generator import GenerationRequest, SequenceState, SpeculativeGenerator
from tide_trt.models.loader import LoadedCheckpoint
from tide_trt.spec.sampling import SamplingParams
from tide_trt.training.offline import new_head

MAX_SEQ_LEN = 128
PROBE_GAMMA = 3
ATOL = 1e-5
VOCAB = 96  # the tiny checkpoint's


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one intra-op thread (conftest)


@pytest.fixture(scope="module")
def recompute_engine(tiny_checkpoint: LoadedCheckpoint) -> TargetEngine:
    return make_engine(tiny_checkpoint, max_batch_size=1, max_seq_len=MAX_SEQ_LEN)


def make_head(engine: TargetEngine, seed: int, scale: float = 1.0) -> Eagle3Head:
    """An untrained head over a reduced draft vocabulary (every other target id), LM head scaled."""
    torch.manual_seed(seed)
    head = new_head(engine, torch.arange(0, VOCAB, 2))
    with torch.no_grad():
        head.lm_head.weight.mul_(scale)
    return head


def loopy_prompts(n: int, seed: int, repeats: int = 4) -> list[list[int]]:
    """Prompts repeating a short pattern: n-gram lookups then propose tokens the target accepts."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        pattern = torch.randint(3, VOCAB, (int(torch.randint(2, 5, (1,), generator=gen)),), generator=gen).tolist()
        out.append(torch.randint(3, VOCAB, (3,), generator=gen).tolist() + pattern * repeats)
    return out


def capture_states(engine: TargetEngine, tokens: list[int]) -> torch.Tensor:
    """Capture-layer states of a plain prefill of `tokens` -> [n, C, H]."""
    slot = engine.allocate_slot()
    try:
        return engine.forward([slot], [tokens], logits="last").hidden[0]
    finally:
        engine.free_slot(slot)


def probe(drafter: ChainDrafter, slot: int, states: torch.Tensor, tokens: list[int], lo: int, hi: int,
          seed: int) -> tuple[torch.Tensor, list[int]]:
    """What `drafter` (left untouched: a copy proposes) drafts for a slot once fed the true entries lo..hi-1
    (capture state of position p with token p+1). Returns (draft probs [γ, V] at T = 1, draft tokens)."""
    d = copy.deepcopy(drafter)
    sampling = DraftSampling(torch.ones(1), torch.ones(1), torch.zeros(1, dtype=torch.long),
                             [torch.Generator().manual_seed(seed)])
    out = d.propose([slot], [states[lo:hi]], [tokens[lo + 1: hi + 1]], PROBE_GAMMA, sampling)
    assert out.probs is not None
    return out.probs[0], out.tokens[0].tolist()


def check_against_fresh(gen: SpeculativeGenerator, head: Eagle3Head, seq: SequenceState, frame_start: int,
                        recompute: TargetEngine, seed: int) -> None:
    """The live drafter's next proposal for `seq` equals a fresh drafter's prefill of the frame's kept entries."""
    drafter = gen.drafter
    assert drafter is not None
    tokens = seq.tokens
    hi = len(tokens) - 1  # positions 0..hi-1 are in the target cache; token hi is pending
    assert gen.engine.seq_len(seq.slot) == hi, "target KV length != committed tokens"
    lo = drafter.next_position(seq.slot)
    assert frame_start <= lo < hi, (frame_start, lo, hi)
    states = capture_states(recompute, tokens[:hi])  # [hi, C, H]
    live_p, live_t = probe(drafter, seq.slot, states, tokens, lo, hi, seed)
    fresh = ChainDrafter(head, 1, MAX_SEQ_LEN, torch.float32, "cpu")
    fresh_p, fresh_t = probe(fresh, 0, states, tokens, frame_start, hi, seed)
    torch.testing.assert_close(live_p, fresh_p, atol=ATOL, rtol=0)
    assert live_t == fresh_t
    if hi - frame_start >= 2:  # the comparison tells frames apart
        shifted_p, _ = probe(fresh, 0, states, tokens, frame_start + 1, hi, seed)
        assert (shifted_p - live_p).abs().max() > 100 * ATOL


def step_and_count(gen: SpeculativeGenerator, gamma: int, stats: dict[str, int],
                   drafting: set[str] | None = None) -> None:
    for ev in gen.step(StepDrafting(gamma, rows=drafting)):
        if ev.num_draft:
            stats["drafted"] += ev.num_draft
            stats["accepted"] += ev.num_accepted
            stats["rejections"] += ev.num_accepted < ev.num_draft


def test_draft_cache_after_rejections_and_compaction_equals_fresh_prefill(tiny_checkpoint: LoadedCheckpoint,
                                                                         recompute_engine: TargetEngine) -> None:
    """Greedy and sampled rows, head and n-gram lookup proposals (the head catches up either way), requests of
    different lengths so that a finished one is released mid-run and the highest slot moves into its hole."""
    engine = make_engine(tiny_checkpoint, max_batch_size=4, max_seq_len=MAX_SEQ_LEN)
    head = make_head(engine, seed=1)
    drafter = ChainDrafter(head, 4, MAX_SEQ_LEN, torch.float32, "cpu", lookup_ngram=2)
    drafter.catch_up_window = 0
    gen = SpeculativeGenerator(engine, drafter)
    prompts = loopy_prompts(2, seed=5) + random_prompts(2, VOCAB, seed=6, min_len=5, max_len=12)
    samplings = [SamplingParams(), SamplingParams(1.2, seed=3), SamplingParams(), SamplingParams(0.9, 0.9, 20, 4)]
    max_new = [12, 30, 30, 30]
    for i, (p, s, m) in enumerate(zip(prompts, samplings, max_new, strict=True)):
        gen.add(GenerationRequest(str(i), p, m, s))
    stats = {"drafted": 0, "accepted": 0, "rejections": 0}
    moved = False
    for step in range(40):
        step_and_count(gen, 1 + step % 4, stats)
        for rid in [r for r, s in gen.sequences.items() if s.finished]:
            moved |= gen.sequences[rid].slot < max(s.slot for s in gen.sequences.values())
            gen.release(rid)
        if not gen.sequences:
            break
        for seq in gen.sequences.values():
            if seq.prefilled:
                check_against_fresh(gen, head, seq, 0, recompute_engine, seed=step)
    assert moved, "no slot was compacted"
    assert stats["rejections"] > 5 and stats["accepted"] > 5, stats


def test_draft_cache_with_catch_up_window_equals_fresh_prefill_of_the_window(tiny_checkpoint: LoadedCheckpoint,
                                                                            recompute_engine: TargetEngine) -> None:
    """A bounded catch-up restarts a frame on the last `window` positions: on a long prompt, and after a probe
    gap (the request did not draft for more than `window` tokens). The draft then equals a fresh drafter that
    prefills just that window."""
    window = 6
    engine = make_engine(tiny_checkpoint, max_batch_size=2, max_seq_len=MAX_SEQ_LEN)
    head = make_head(engine, seed=2, scale=0.3)
    gen = SpeculativeGenerator(engine, ChainDrafter(head, 2, MAX_SEQ_LEN, torch.float32, "cpu",
                                                    catch_up_window=window))
    prompts = random_prompts(2, VOCAB, seed=8, min_len=20, max_len=24)
    for i, p in enumerate(prompts):
        gen.add(GenerationRequest(str(i), p, 60, SamplingParams(1.0, seed=10 + i)))
    seqs = list(gen.sequences.values())
    frame = {s.request.request_id: 0 for s in seqs}
    stats = {"drafted": 0, "accepted": 0, "rejections": 0}
    gen.step(2)  # prefill
    for step in range(24):
        drafting = {"0", "1"} if not 6 <= step < 16 else {"1"}  # request 0 pauses for 10 steps (> window)
        for s in seqs:  # the documented rule: more than `window` pending positions -> restart on the last ones
            rid = s.request.request_id
            hi = len(s.tokens) - 1
            if rid in drafting and hi - gen.drafter.next_position(s.slot) > window:
                frame[rid] = hi - window
        step_and_count(gen, 2, stats, drafting)
        for s in seqs:
            check_against_fresh(gen, head, s, frame[s.request.request_id], recompute_engine, seed=100 + step)
    restarts = [f for f in frame.values() if f > 0]
    assert len(restarts) == 2 and frame["0"] > frame["1"], frame  # both prompts restarted; request 0 again later
    assert stats["rejections"] > 5, stats


def test_draft_cache_after_refit_equals_fresh_prefill_with_the_new_head(tiny_checkpoint: LoadedCheckpoint,
                                                                       recompute_engine: TargetEngine) -> None:
    """`ChainDrafter.swap` installs new weights mid-run: the stale draft cache must not leak into the new head's
    proposals, immediately after the swap and after more speculative steps."""
    engine = make_engine(tiny_checkpoint, max_batch_size=3, max_seq_len=MAX_SEQ_LEN)
    old, new = make_head(engine, seed=3), make_head(engine, seed=4, scale=2.0)
    drafter = ChainDrafter(old, 3, MAX_SEQ_LEN, torch.float32, "cpu")
    drafter.catch_up_window = 0
    gen = SpeculativeGenerator(engine, drafter)
    for i, p in enumerate(random_prompts(3, VOCAB, seed=12, min_len=4, max_len=16)):
        gen.add(GenerationRequest(str(i), p, 50, SamplingParams(1.1, seed=20 + i) if i else SamplingParams()))
    stats = {"drafted": 0, "accepted": 0, "rejections": 0}
    for _ in range(6):
        step_and_count(gen, 3, stats)
    for seq in gen.sequences.values():
        check_against_fresh(gen, old, seq, 0, recompute_engine, seed=1)
    drafter.swap(new, version=1)
    for seq in gen.sequences.values():
        check_against_fresh(gen, new, seq, 0, recompute_engine, seed=2)
        hi = len(seq.tokens) - 1
        states = capture_states(recompute_engine, seq.tokens[:hi])
        old_p, _ = probe(ChainDrafter(old, 1, MAX_SEQ_LEN, torch.float32, "cpu"), 0, states, seq.tokens, 0, hi, 2)
        new_p, _ = probe(drafter, seq.slot, states, seq.tokens, drafter.next_position(seq.slot), hi, 2)
        assert (old_p - new_p).abs().max() > 1e-2  # the swap took effect
    for step in range(8):
        step_and_count(gen, 1 + step % 3, stats)
        for seq in gen.sequences.values():
            if not seq.finished:
                check_against_fresh(gen, new, seq, 0, recompute_engine, seed=30 + step)
    assert stats["rejections"] > 5, stats
