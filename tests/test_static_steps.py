"""Fixed-shape steps (engine.batch_invariant, the CUDA-graph path): same results as the dynamic path, bitwise
batch invariance in bf16, padding confined to the scratch slot, greedy speculation identical to plain decoding."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import random_prompts
from tests.oracle_draft import refit_prompts
from tide_trt.config import EngineConfig
from tide_trt.draft.drafter import ChainDrafter
from tide_trt.engine.generator import GenerationRequest, SpeculativeGenerator
from tide_trt.engine.step_batch import StepBatch, StepRow
from tide_trt.engine.torch_engine import TorchTargetEngine
from tide_trt.runtime import run_to_completion


def _engine(ckpt, dtype: str = "float32", invariant: str = "on", max_seq_len: int = 128) -> TorchTargetEngine:
    return TorchTargetEngine(ckpt, EngineConfig(dtype=dtype, max_batch_size=8, max_seq_len=max_seq_len,
                                                cpu_kernels="off", batch_invariant=invariant))


def _mixed_step(engine: TorchTargetEngine, prompts: list[list[int]]):
    slots = [engine.allocate_slot() for _ in prompts]
    engine.forward(slots[:-1], prompts[:-1])
    rows = [StepRow(slots[0], len(prompts[0]), (11,), gamma=3),
            StepRow(slots[1], len(prompts[1]), (15,)),
            StepRow(slots[2], 0, tuple(prompts[2]), is_prompt=True, num_logits=1)]
    return engine.forward_step(StepBatch.build(rows, drafts=torch.tensor([[12, 13, 14]])))


def test_fixed_shape_step_equals_the_dynamic_step(tiny_checkpoint):
    prompts = random_prompts(3, 96, seed=41, min_len=10, max_len=30)
    static = _engine(tiny_checkpoint, invariant="on")
    dynamic = _engine(tiny_checkpoint, invariant="off")
    assert static.static_steps and not dynamic.static_steps
    a, b = _mixed_step(static, prompts), _mixed_step(dynamic, prompts)
    assert a.logits.shape == b.logits.shape and a.hidden.shape == b.hidden.shape
    assert torch.allclose(a.logits, b.logits, atol=1e-4)
    assert torch.allclose(a.hidden, b.hidden, atol=1e-4)


def _decode_logits(engine: TorchTargetEngine, prompt: list[int], company: list[list[int]]) -> torch.Tensor:
    """Logits of one decode token of `prompt`, computed in a step shared with prefill chunks of `company`."""
    slot = engine.allocate_slot()
    engine.forward([slot], [prompt])
    others = [engine.allocate_slot() for _ in company]
    rows = [StepRow(slot, len(prompt), (7,))] + [StepRow(s, 0, tuple(p), is_prompt=True, num_logits=1)
                                                 for s, p in zip(others, company, strict=True)]
    out = engine.forward_step(StepBatch.build(rows)).logits[0]
    for s in [slot, *others]:
        engine.free_slot(s)
    return out


@pytest.mark.parametrize("invariant", ["on", "off"])
def test_a_token_computes_bitwise_the_same_whatever_shares_its_step(tiny_checkpoint, invariant):
    """bf16 with PyTorch matmuls (no native kernel): alone, or next to 100 prompt tokens, a decode token's logits
    are bitwise equal with fixed-shape steps. Control: with the mode off the same two steps must differ (the
    dynamic path's GEMM shapes, and so its rounding, change with the step), or this test could not fail."""
    engine = _engine(tiny_checkpoint, dtype="bfloat16", invariant=invariant)
    assert engine.static_steps == (invariant == "on")
    prompt = random_prompts(1, 96, seed=3, min_len=20, max_len=20)[0]
    alone = _decode_logits(engine, prompt, [])
    crowded = _decode_logits(engine, prompt, random_prompts(3, 96, seed=4, min_len=30, max_len=40))
    assert torch.equal(alone, crowded) == (invariant == "on"), (alone - crowded).abs().max()


def test_padding_writes_only_the_scratch_slot(tiny_checkpoint):
    engine = _engine(tiny_checkpoint)
    a, b = engine.allocate_slot(), engine.allocate_slot()
    engine.forward([a], [[5, 6, 7]])
    before = [k[b].clone() for k in engine.cache.k]
    engine.forward([a], [[8]])  # one real token, 63 padding tokens
    assert all(torch.equal(k[b], x) for k, x in zip(engine.cache.k, before, strict=True))
    assert engine.cache.k[0][engine.scratch_slot].abs().sum() > 0  # padding went to the scratch slot


def test_greedy_speculation_is_identical_to_plain_in_bf16(tiny_checkpoint, tiny_oracle):
    """The mode's point: with every token computed the same way, spec == plain, token for token, in bf16."""
    prompts = refit_prompts(4, 7) + random_prompts(4, 96, seed=52, min_len=5, max_len=30)
    engine = _engine(tiny_checkpoint, dtype="bfloat16", max_seq_len=256)
    plain = run_to_completion(SpeculativeGenerator(engine),
                              [GenerationRequest(str(i), p, 40) for i, p in enumerate(prompts)], 0).sequences
    for gamma in (1, 3, 5):
        drafter = ChainDrafter(tiny_oracle.load(engine), 8, 256, engine.info.activation_dtype, "cpu")
        spec = run_to_completion(SpeculativeGenerator(engine, drafter),
                                 [GenerationRequest(str(i), p, 40) for i, p in enumerate(prompts)], gamma).sequences
        assert sum(s.accepted_tokens for s in spec) > 0
        assert [s.output_ids for s in spec] == [s.output_ids for s in plain], gamma


def test_fixed_shape_draft_chain_proposes_what_the_dynamic_chain_does(tiny_checkpoint, tiny_oracle):
    """The greedy chain at fixed shapes (rows padded to a power-of-two bucket with the scratch slot, each entry
    attending to the whole cache range: what a CUDA graph replays) proposes the same tokens as the dynamic chain,
    step after step, with rejections and odd batch sizes."""
    from tests.conftest import make_engine

    engine = make_engine(tiny_checkpoint)
    prompts = refit_prompts(4, 7)[:3] + random_prompts(2, 96, seed=61, min_len=5, max_len=20)  # 5 rows: bucket 8
    proposals = {}
    for static in (False, True):
        drafter = ChainDrafter(tiny_oracle.load(engine), 8, 256, torch.float32, "cpu")
        drafter.static_chain = static
        seen: list[list[list[int]]] = []
        inner = drafter.propose

        def recording(*args, inner=inner, seen=seen, **kwargs):
            out = inner(*args, **kwargs)
            seen.append(out.tokens.tolist())
            return out

        drafter.propose = recording
        run_to_completion(SpeculativeGenerator(engine, drafter),
                          [GenerationRequest(str(i), p, 30) for i, p in enumerate(prompts)], 3)
        proposals[static] = seen
    assert len(proposals[True]) > 5 and proposals[True] == proposals[False]
