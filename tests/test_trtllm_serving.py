"""The trtllm backend inside the serving loop, on CPU: its step token budget and live draft refit.

Only TensorRT itself is stood in for (tests/trtllm_runtime.py, the `EngineRuntime` seam); the engine class,
manifest, packing, generator, drafter, draft store and refit watcher are the real ones.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.trtllm_runtime import ProfileShapeError, make_trtllm_engine
from tide_trt.draft.checkpoint import WEIGHTS, load_draft
from tide_trt.draft.drafter import ChainDrafter
from tide_trt.engine.generator import GenerationRequest, SpeculativeGenerator
from tide_trt.engine.hooks import StaticGamma, run_step
from tide_trt.engine.step_batch import StepBatch, StepRow
from tide_trt.engine.trtllm_layout import PagedSlotTable, TokenBudgetError, pack_batch
from tide_trt.errors import TideError
from tide_trt.online.refit import RefitWatcher
from tide_trt.online.store import DraftStore
from tide_trt.runtime import SHIPPED_DRAFTS_DIR, run_to_completion


# --- token budget ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("built", "configured", "effective"), [(64, 512, 64), (512, 48, 48), (32, 32, 32)])
def test_max_num_tokens_is_the_smaller_of_engine_and_config(tiny_checkpoint, tmp_path, built, configured, effective):
    eng, _ = make_trtllm_engine(tiny_checkpoint, tmp_path, max_num_tokens=configured, built_max_num_tokens=built)
    assert eng.max_num_tokens == effective


def test_engine_built_below_a_full_decode_step_is_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(TideError, match="max_num_tokens 3 < max_batch_size 4"):
        make_trtllm_engine(tiny_checkpoint, tmp_path, max_batch_size=4, built_max_num_tokens=3)


def test_over_budget_step_is_refused_before_any_engine_input(tiny_checkpoint, tmp_path):
    eng, runtime = make_trtllm_engine(tiny_checkpoint, tmp_path, max_num_tokens=16, built_max_num_tokens=64)
    a, b = eng.allocate_slot(), eng.allocate_slot()
    rows = [StepRow(a, 0, tuple(range(3, 14)), is_prompt=True), StepRow(b, 0, tuple(range(3, 9)), is_prompt=True)]
    with pytest.raises(TokenBudgetError, match="step has 17 tokens .* max_num_tokens=16"):
        eng.forward_step(StepBatch.build(rows))  # 11 + 6 = 17 > 16
    assert runtime.calls == [] and eng.seq_len(a) == eng.seq_len(b) == 0  # nothing reached TensorRT
    eng.forward_step(StepBatch.build(rows[:1] + [StepRow(b, 0, tuple(range(3, 8)), is_prompt=True)]))  # 16 fits
    assert [c["input_ids"].numel() for c in runtime.calls] == [16] and eng.seq_len(b) == 5


def test_long_prompts_packed_in_chunks_never_exceed_the_budget():
    """The packer under a budget of 24 tokens: two 40-token prompts go through as context chunks of at most the
    budget beside decode rows; every packed step stays within it, and one token more is refused."""
    budget = 24
    table = PagedSlotTable(max_slots=3, max_seq_len=64, tokens_per_block=8)
    long_a, long_b, short = table.allocate(), table.allocate(), table.allocate()
    table.advance(short, 5)
    prompts = {long_a: list(range(100, 140)), long_b: list(range(200, 240))}
    sent = {long_a: 0, long_b: 0}
    sizes = []
    while any(sent[s] < len(p) for s, p in prompts.items()):
        slots, tokens, room = [short], [[7]], budget - 1  # the decode row first
        for s, p in prompts.items():
            take = min(room, len(p) - sent[s])
            if take:
                slots.append(s)
                tokens.append(p[sent[s] : sent[s] + take])
                room -= take
        b = pack_batch(slots, tokens, table, max_num_tokens=budget)
        sizes.append(b.num_tokens)
        for s, chunk in zip(slots, tokens, strict=True):
            if s in sent:
                assert b.position_ids[b.token_offsets()[b.order.index(slots.index(s))]] == sent[s]
                sent[s] += len(chunk)
            table.advance(s, len(chunk))
    assert max(sizes) <= budget and sum(sizes) == 80 + len(sizes)
    with pytest.raises(TokenBudgetError):
        pack_batch([long_a], [[1] * (budget + 1)], table, max_num_tokens=budget)


def test_generator_keeps_every_step_within_the_trt_budget(tiny_checkpoint, tmp_path):
    budget = 16
    eng, runtime = make_trtllm_engine(
        tiny_checkpoint, tmp_path, max_batch_size=4, max_seq_len=64, max_num_tokens=budget, built_max_num_tokens=32
    )
    vocab = tiny_checkpoint.arch.vocab_size
    prompts = [[3 + (7 * i + j) % 90 for j in range(30)] for i in range(3)]  # 90 prompt tokens, each > budget
    requests = [GenerationRequest(f"r{i}", p, 5) for i, p in enumerate(prompts)]
    result = run_to_completion(SpeculativeGenerator(eng), requests, gamma=0)
    assert max(c["input_ids"].numel() for c in runtime.calls) <= budget
    for seq, p in zip(result.sequences, prompts, strict=True):  # the runtime's logits count up from each token
        assert seq.output_ids == [(p[-1] + k) % vocab for k in range(1, 6)]


def test_recording_runtime_enforces_its_profile(tiny_checkpoint, tmp_path):
    """The stand-in refuses what a TensorRT profile refuses, so the budget tests above are not vacuous."""
    eng, runtime = make_trtllm_engine(tiny_checkpoint, tmp_path, max_num_tokens=64, built_max_num_tokens=8)
    eng._max_num_tokens = 64  # pretend the engine forgot its manifest value
    s = eng.allocate_slot()
    with pytest.raises(ProfileShapeError):
        eng.forward_step(StepBatch.build([StepRow(s, 0, tuple(range(3, 12)), is_prompt=True)]))


# --- live refit with backend trtllm ------------------------------------------------------------------------
def _publish_dir(store: DraftStore, source, version: int):
    shutil.copytree(source, store.version_dir(version))
    store.append_manifest({"version": version, "parent": version - 1})
    return store.version_dir(version)


def _assert_serves(drafter: ChainDrafter, weights: dict[str, torch.Tensor]) -> None:
    served = drafter.head.state_dict()
    for name, w in weights.items():
        assert torch.equal(served[name], w.to(served[name].dtype)), name


def test_refit_with_trtllm_backend_swaps_the_pytorch_draft_and_never_touches_the_target(
    default_checkpoint, tmp_path
):
    """Backend trtllm, mode "PyTorch draft next to the TensorRT target": the RefitWatcher adopts a published
    version (shipped v3 -> v4, real checkpoints), a pin rolls it back, a corrupt version is rejected; the
    TensorRT engine is never run during a refit and the target weights held by the backend never change."""
    eng, runtime = make_trtllm_engine(
        default_checkpoint, tmp_path, dtype="bfloat16", max_batch_size=2, max_seq_len=96, tokens_per_block=32
    )
    store = DraftStore(tmp_path / "drafts").ensure()
    v1 = _publish_dir(store, SHIPPED_DRAFTS_DIR / "v3", 1)
    head, _ = load_draft(v1, eng.info, eng.embedding_weight())
    gen = SpeculativeGenerator(eng, ChainDrafter.for_engine(head, eng.info, version=1))
    watcher = RefitWatcher(store, eng.info, eng.embedding_weight(), poll_seconds=0, background=False)
    target = [p.clone() for p in eng.target_parameters()]

    v2 = _publish_dir(store, SHIPPED_DRAFTS_DIR / "v4", 2)
    watcher.before_step(gen)
    assert gen.drafter.version == 2 and watcher.stats["refits"] == 1
    _assert_serves(gen.drafter, load_file(str(v2 / WEIGHTS)))
    assert gen.drafter.head.fc.weight.dtype == eng.info.activation_dtype == torch.bfloat16
    assert gen.drafter.head.embed.data_ptr() == eng.embedding_weight().data_ptr()  # shared, never copied

    # the refitted draft serves next to the TensorRT target in the same step loop: a verification row of γ+1
    gen.add(GenerationRequest("q", list(range(40, 60)), 8))
    run_step(gen, StaticGamma(3), [watcher])  # prefill
    run_step(gen, StaticGamma(3), [watcher])  # draft 3 with v4, verify 4 through the engine
    assert runtime.calls[-1]["input_ids"].numel() == 4 and runtime.calls[-1]["host_request_types"].tolist() == [0]

    store.pin(1)  # rollback (`tide drafts use 1`)
    calls = len(runtime.calls)
    watcher.before_step(gen)
    assert gen.drafter.version == 1
    _assert_serves(gen.drafter, load_file(str(v1 / WEIGHTS)))

    bad = _publish_dir(store, SHIPPED_DRAFTS_DIR / "v4", 3)
    weights = load_file(str(bad / WEIGHTS))
    weights["fc.weight"][0, 0] = float("nan")
    save_file(weights, str(bad / WEIGHTS), metadata={"format": "tide-eagle3-v1"})
    store.unpin()
    watcher.before_step(gen)
    assert gen.drafter.version == 1 and 3 in watcher.rejected() and "NaN" in watcher.rejected()[3]
    assert len(runtime.calls) == calls  # no refit ran the engine
    assert all(torch.equal(a, b) for a, b in zip(target, eng.target_parameters(), strict=True))
