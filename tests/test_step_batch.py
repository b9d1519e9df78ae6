"""The flat step batch: layout, chunked prefill under the token budget, per-row draft lengths in one commit path."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_engine, random_prompts
from tests.oracle_draft import refit_prompts
from tide_trt.config import EngineConfig
from tide_trt.draft.drafter import ChainDrafter
from tide_trt.draft.plan import StepDrafting
from tide_trt.engine.generator import GenerationRequest, SpeculativeGenerator
from tide_trt.engine.step_batch import StepBatch, StepRow
from tide_trt.engine.torch_engine import TorchTargetEngine
from tide_trt.errors import TideError
from tide_trt.runtime import run_to_completion
from tide_trt.spec.sampling import SamplingParams


def test_step_batch_layout_is_flat_and_logits_only_where_used():
    rows = [StepRow(3, 10, (5,), gamma=2), StepRow(0, 4, (9,)),
            StepRow(1, 0, (1, 2, 3, 4), is_prompt=True, num_logits=0),
            StepRow(2, 8, (11, 12), is_prompt=True, num_logits=1)]
    drafts = torch.tensor([[6, 7, 99], [98, 97, 96]])  # [R', γmax]: row 0 drafts 6, 7; row 1 drafts none
    b = StepBatch.build(rows, drafts=drafts)
    assert b.token_ids.tolist() == [5, 6, 7, 9, 1, 2, 3, 4, 11, 12]  # drafts written from the draft tensor
    assert b.positions.tolist() == [10, 11, 12, 4, 0, 1, 2, 3, 8, 9]
    assert b.token_slots.tolist() == [3, 3, 3, 0, 1, 1, 1, 1, 2, 2]
    assert b.host_cu_seqlens == (0, 3, 4, 8, 10)
    assert b.logit_index.tolist() == [0, 1, 2, 3, 9]  # verify: all 3, decode: 1, unfinished chunk: 0, last chunk: 1
    assert b.logit_cu.tolist() == list(b.host_logit_cu) == [0, 3, 4, 4, 5]
    assert b.logit_row.tolist() == [0, 0, 0, 1, 3]
    assert b.is_draft.tolist() == [True, True, False, False, False]  # logits 0, 1 judge drafts 6, 7
    assert b.draft_ids()[:2].tolist() == [6, 7]
    assert b.host_tokens() == [[5, 6, 7], [9], [1, 2, 3, 4], [11, 12]]
    with pytest.raises(ValueError, match="twice"):
        StepBatch.build([StepRow(0, 0, (1,)), StepRow(0, 1, (2,))])
    with pytest.raises(ValueError, match="gamma"):
        StepRow(0, 0, (1, 2), gamma=-1)
    with pytest.raises(ValueError, match="draft tensor"):
        StepBatch.build([StepRow(0, 0, (1,), gamma=1)])


def test_one_forward_of_mixed_rows_equals_separate_runs(tiny_checkpoint):
    """Decode, verification and prompt-chunk rows in one flat forward give each row what it gets alone."""
    engine = make_engine(tiny_checkpoint)
    prompts = random_prompts(3, 96, seed=21, min_len=20, max_len=30)
    slots = [engine.allocate_slot() for _ in prompts]
    engine.forward(slots[:2], prompts[:2])  # rows 0, 1 are running; row 2's prompt arrives in two chunks
    engine.forward([slots[2]], [prompts[2][:7]])
    rows = [StepRow(slots[0], len(prompts[0]), (11,), gamma=2), StepRow(slots[1], len(prompts[1]), (14,)),
            StepRow(slots[2], 7, tuple(prompts[2][7:]), is_prompt=True, num_logits=1)]
    out = engine.forward_step(StepBatch.build(rows, drafts=torch.tensor([[12, 13]])))
    assert out.logits.shape[0] == 3 + 1 + 1 and out.hidden.shape[0] == 3 + 1 + len(prompts[2]) - 7
    ref_engine = make_engine(tiny_checkpoint)
    full = [prompts[0] + [11, 12, 13], prompts[1] + [14], prompts[2]]
    counts = [3, 1, len(prompts[2]) - 7]
    lo = 0
    logit_rows = [out.logits[0:3], out.logits[3:4], out.logits[4:5]]
    for seq, n, logits in zip(full, counts, logit_rows, strict=True):
        slot = ref_engine.allocate_slot()
        ref = ref_engine.forward([slot], [seq], logits="all")
        assert torch.allclose(out.hidden[lo:lo + n], ref.hidden[0, -n:], atol=1e-5)
        assert torch.allclose(logits, ref.logits[0, -logits.shape[0]:], atol=1e-5)
        lo += n
        ref_engine.free_slot(slot)
    assert [engine.seq_len(s) for s in slots] == [len(f) for f in full]


class _Recorder:
    """Signal sink keeping every captured state by (request, position), and the token count of every step."""

    def __init__(self):
        self.states: dict[tuple[str, int], torch.Tensor] = {}

    def __call__(self, rid, start, hidden, token_ids, is_prompt):
        for i in range(hidden.shape[0]):
            key = (rid, start + i)
            assert key not in self.states, f"position {key} captured twice"
            self.states[key] = hidden[i].clone()


def _budget_engine(ckpt, budget: int, max_batch_size: int = 8) -> TorchTargetEngine:
    return TorchTargetEngine(ckpt, EngineConfig(dtype="float32", max_batch_size=max_batch_size, max_seq_len=256,
                                                cpu_kernels="off", max_num_tokens=budget))


def _watch_steps(engine: TorchTargetEngine) -> list[int]:
    sizes: list[int] = []
    inner = engine.forward_step

    def counted(batch):
        sizes.append(batch.num_tokens)
        return inner(batch)

    engine.forward_step = counted
    return sizes


def test_chunked_prefill_equals_one_shot_and_respects_the_budget(tiny_checkpoint, tiny_oracle):
    """Long prompts prefilled in chunks under a small budget, with other sequences decoding speculatively in the
    same steps: outputs and every captured state equal a one-shot prefill, and no step exceeds the budget."""
    prompts = refit_prompts(4, 7)[:2] + random_prompts(3, 96, seed=6, min_len=90, max_len=120)
    runs = {}
    for budget in (4096, 24):
        engine = _budget_engine(tiny_checkpoint, budget)
        sizes = _watch_steps(engine)
        sink = _Recorder()
        drafter = ChainDrafter(tiny_oracle.load(engine), 8, 256, torch.float32, "cpu")
        gen = SpeculativeGenerator(engine, drafter, signal_sink=sink)
        reqs = [GenerationRequest(str(i), p, 24) for i, p in enumerate(prompts)]
        done = run_to_completion(gen, reqs, 3).sequences
        runs[budget] = ([s.output_ids for s in done], sink.states, sizes)
    (out_a, states_a, sizes_a), (out_b, states_b, sizes_b) = runs[4096], runs[24]
    assert max(sizes_a) > 24 and max(sizes_b) <= 24  # the small budget really chunked, and was never exceeded
    assert out_a == out_b
    assert states_a.keys() == states_b.keys()
    for key, h in states_a.items():
        assert torch.allclose(h, states_b[key], atol=1e-5), key


def test_short_requests_decode_while_a_long_prompt_is_prefilled(tiny_checkpoint):
    """A short request that arrives with a long one gets its first token, and keeps decoding, before the long
    prompt is fully prefilled: the long prompt is spread over steps under the budget."""
    engine = _budget_engine(tiny_checkpoint, 32)
    gen = SpeculativeGenerator(engine)
    long_prompt = random_prompts(1, 96, seed=8, min_len=200, max_len=200)[0]
    gen.add(GenerationRequest("long", long_prompt, 4))
    gen.add(GenerationRequest("short", [5, 6, 7], 4))
    first_token_step: dict[str, int] = {}
    for step in range(40):
        for ev in gen.step(0):
            first_token_step.setdefault(ev.request_id, step)
        if len(first_token_step) == 2:
            break
    assert first_token_step["long"] >= 200 // 32  # at least ceil(200 / 32) - 1 steps of chunks before it
    assert first_token_step["short"] < first_token_step["long"]


def test_per_row_draft_lengths_share_one_commit_path(tiny_checkpoint, tiny_oracle):
    """Rows with different γᵢ (0 = plain) in one step: greedy rows equal plain decoding, and a sampled γᵢ = 0 row
    draws exactly what plain sampling with its seed draws (one commit path for plain, probe and spec rows)."""
    prompts = refit_prompts(4, 7)  # memorised by the oracle draft: drafts are accepted
    sampling = [SamplingParams(), SamplingParams(), SamplingParams(temperature=0.9, seed=7), SamplingParams()]
    engine = make_engine(tiny_checkpoint)

    def run(gammas_of: dict[str, int] | None) -> list[list[int]]:
        drafter = None
        if gammas_of is not None:
            drafter = ChainDrafter(tiny_oracle.load(engine), 8, 256, torch.float32, "cpu")
        gen = SpeculativeGenerator(engine, drafter)
        for i, p in enumerate(prompts):
            gen.add(GenerationRequest(str(i), p, 20, sampling[i]))
        accepted = 0
        while any(not s.finished for s in gen.sequences.values()):
            for ev in gen.step(StepDrafting(3 if gammas_of is not None else 0, gammas=gammas_of)):
                accepted += ev.num_accepted
        outs = [gen.sequences[str(i)].output_ids for i in range(len(prompts))]
        for rid in list(gen.sequences):
            gen.release(rid)
        run.accepted = accepted
        return outs

    plain = run(None)
    mixed = run({"0": 4, "1": 0, "2": 0, "3": 2})
    assert run.accepted > 0  # the drafting rows really accepted drafts
    assert mixed == plain


def test_budget_below_the_batch_is_refused(tiny_checkpoint):
    with pytest.raises(TideError, match="max_num_tokens"):
        SpeculativeGenerator(_budget_engine(tiny_checkpoint, 4, max_batch_size=8))
