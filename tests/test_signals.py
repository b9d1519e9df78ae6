"""Signal capture: captured states equal a fresh recompute prefill, cover exactly the committed positions,
are written atomically, and a full buffer drops signals (counted) but never requests.

Tolerances: float32 engine + float32 store -> atol 1e-5 (different batch shapes, same math);
bf16 store of float32 states -> bf16 rounding (|Δ| ≤ 2^-8·|x|); bf16 engine (real default model) ->
relative Frobenius error ≤ 1e-2 per capture layer (measured ≈ 2e-3: batched verification and prefill
shapes round differently in bf16, see DESIGN §6).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import make_engine
from tide_trt.config import EngineConfig, ModelConfig, SignalConfig
from tide_trt.draft.drafter import ChainDrafter
from tide_trt.engine.generator import GenerationRequest, SpeculativeGenerator
from tide_trt.engine.hooks import StaticGamma, run_step
from tide_trt.engine.torch_engine import TorchTargetEngine
from tide_trt.online.adaptation import OnlineAdaptation
from tide_trt.online.drift import DriftDetector
from tide_trt.online.recompute import recompute_signals, served_texts, stored_bytes_per_token
from tide_trt.online.signals import FinishInfo, ShardInfo, SignalBuffer, SignalSequence, read_shard
from tide_trt.online.store import SignalStore
from tide_trt.training.offline import new_head

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(tiny_checkpoint) -> TorchTargetEngine:
    return make_engine(tiny_checkpoint)


def make_buffer(engine: TorchTargetEngine, root: Path, **kw) -> SignalBuffer:
    i = engine.info
    return SignalBuffer(
        SignalStore(root), ShardInfo(i.fingerprint, i.name, i.capture_layers, i.hidden_size), **kw
    )


def prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, 96, (int(k),), generator=g).tolist() for k in torch.randint(3, 30, (n,), generator=g)
    ]


def serve(
    engine: TorchTargetEngine,
    buf: SignalBuffer | None,
    ps: list[list[int]],
    gamma: int = 3,
    max_new: int = 30,
    det: DriftDetector | None = None,
) -> dict[str, list[int]]:
    """Run requests to completion with the adaptation plugin (capture only); returns tokens per request."""
    torch.manual_seed(0)
    drafter = ChainDrafter(new_head(engine, torch.arange(96)), 8, 256, torch.float32, "cpu")
    plugin = OnlineAdaptation(det or DriftDetector(SignalConfig()), buf, None)
    gen = SpeculativeGenerator(engine, drafter, signal_sink=plugin.signal_sink)
    for j, p in enumerate(ps):
        gen.add(GenerationRequest(str(j), p, max_new))
    while any(not s.finished for s in gen.sequences.values()):
        run_step(gen, StaticGamma(gamma), [plugin])
    out = {k: list(s.tokens) for k, s in gen.sequences.items()}
    stats = {k: (s.draft_tokens, s.accepted_tokens, s.num_prompt) for k, s in gen.sequences.items()}
    for k in list(gen.sequences):
        gen.release(k)
    if buf is not None:
        assert buf.flush()
    serve.stats = stats  # type: ignore[attr-defined]
    return out


def stored(root: Path) -> dict[str, SignalSequence]:
    return {s.request_id: s for p in SignalStore(root).shard_paths() for s in read_shard(p)[0]}


def prefill_states(engine: TorchTargetEngine, tokens: list[int]) -> torch.Tensor:
    slot = engine.allocate_slot()
    try:
        return engine.forward([slot], [tokens]).hidden[0]  # [T, C, H]
    finally:
        engine.free_slot(slot)


def test_captured_signals_equal_recompute_prefill(engine: TorchTargetEngine, tmp_path: Path) -> None:
    buf = make_buffer(engine, tmp_path, dtype="float32")
    tokens = serve(engine, buf, prompts(4, 1))
    drafted = sum(d for d, _, _ in serve.stats.values())
    assert drafted > sum(
        a for _, a, _ in serve.stats.values()
    )  # rejected drafts happened (and are not stored)
    got = stored(tmp_path)
    assert sorted(got) == sorted(tokens)
    for rid, toks in tokens.items():
        s = got[rid]
        assert s.token_ids.tolist() == toks[:-1] and s.next_token_id == toks[-1]  # positions 0..len-2, no gap
        assert s.prompt_len == serve.stats[rid][2] and s.start_pos == 0
        torch.testing.assert_close(s.hidden, prefill_states(engine, toks[:-1]), atol=1e-5, rtol=0)
        assert s.labels(train_on_prompt=True).tolist() == toks[1:]
        assert (s.labels(train_on_prompt=False) >= 0).sum() == len(toks) - s.prompt_len  # output labels only
    buf.close()


def test_output_only_capture_covers_exactly_output_positions(
    engine: TorchTargetEngine, tmp_path: Path
) -> None:
    buf = make_buffer(engine, tmp_path, dtype="bfloat16", capture_prompt=False)
    tokens = serve(engine, buf, prompts(3, 2))
    got = stored(tmp_path)
    for rid, toks in tokens.items():
        s, n_prompt = got[rid], serve.stats[rid][2]
        assert s.start_pos == n_prompt and s.prompt_len == 0
        assert s.token_ids.tolist() == toks[n_prompt:-1]  # output positions P .. len-2, exactly
        assert s.hidden.dtype == torch.bfloat16
        ref = prefill_states(engine, toks[:-1])[n_prompt:]
        assert ((s.hidden.float() - ref).abs() <= ref.abs() * 2**-8 + 1e-6).all()
    buf.close()


def test_accepted_drafts_past_the_end_are_not_stored(engine: TorchTargetEngine, tmp_path: Path) -> None:
    """A verification may commit drafts after a stop token / max_new_tokens; only output positions stay."""
    buf = make_buffer(engine, tmp_path, dtype="float32")
    h = torch.randn(10, 3, engine.info.hidden_size)
    buf.sink("r", 0, h[:4], [5, 6, 7, 8], True)
    buf.sink("r", 4, h[4:10], [9, 10, 11, 12, 13, 14], False)  # pending + 5 accepted drafts
    buf.finish(
        "r",
        FinishInfo(
            next_token_id=11,
            num_positions=6,
            draft_tokens=5,
            accepted_tokens=5,
            accept_trials=5,
            verify_steps=1,
        ),
    )
    assert buf.flush()
    (s,) = stored(tmp_path).values()
    assert s.token_ids.tolist() == [5, 6, 7, 8, 9, 10] and s.next_token_id == 11
    torch.testing.assert_close(s.hidden, h[:6])
    assert buf.buffered_tokens == 0
    buf.close()


def test_full_buffer_drops_signals_never_requests(engine: TorchTargetEngine, tmp_path: Path) -> None:
    ps = prompts(6, 3)
    plain = serve(engine, None, ps)
    buf = make_buffer(
        engine, tmp_path, dtype="float32", buffer_tokens=80, shard_tokens=10_000, flush_seconds=600
    )
    tokens = serve(engine, buf, ps)
    assert tokens == plain  # every request completed, token-identical
    m = buf.metrics()
    assert m["signals_tokens_dropped"] > 0 and m["signals_sequences_dropped"] >= 1
    got = stored(tmp_path)
    assert 0 < len(got) < len(ps)
    for rid, s in got.items():  # what was kept is complete and contiguous
        assert s.token_ids.tolist() == tokens[rid][:-1]
    assert buf.buffered_tokens == 0
    buf.close()


def test_collection_switch_is_per_request(engine: TorchTargetEngine, tmp_path: Path) -> None:
    det = DriftDetector(SignalConfig(enabled=False))
    buf = make_buffer(engine, tmp_path, collect_fn=lambda: det.collection_enabled)
    serve(engine, buf, prompts(2, 4), det=det)
    assert stored(tmp_path) == {} and buf.metrics()["signals_sequences_skipped"] == 2
    assert buf.tracked() == []  # finished requests are forgotten
    buf.close()


def test_shards_are_atomic_and_self_describing(engine: TorchTargetEngine, tmp_path: Path) -> None:
    buf = make_buffer(engine, tmp_path, shard_tokens=40)
    serve(engine, buf, prompts(4, 5))
    buf.close()
    paths = SignalStore(tmp_path).shard_paths()
    assert len(paths) >= 2 and not list(tmp_path.glob(".tmp-*"))
    seqs, meta = read_shard(paths[0])
    i = engine.info
    assert meta["format"] == "tide-signals-v1" and meta["model_fingerprint"] == i.fingerprint
    assert meta["capture_layers"] == str(list(i.capture_layers)) and meta["dtype"] == "bfloat16"
    assert int(meta["num_tokens"]) == sum(s.num_tokens for s in seqs)
    assert all(s.draft_version == 0 and s.draft_tokens > 0 for s in seqs)  # the drafter's version


def test_recompute_path_rebuilds_the_same_signals(engine: TorchTargetEngine, tmp_path: Path) -> None:
    buf = make_buffer(engine, tmp_path, dtype="float32")
    serve(engine, buf, prompts(3, 6))
    buf.close()
    got = list(stored(tmp_path).values())
    texts = served_texts(got)
    rebuilt, seconds = recompute_signals(engine, texts, dtype="float32")
    assert seconds >= 0 and len(rebuilt) == len(got)
    by_id = {s.request_id: s for s in rebuilt}
    for a in got:
        b = by_id[a.request_id]
        assert a.token_ids.tolist() == b.token_ids.tolist() and a.next_token_id == b.next_token_id
        assert a.accept_trials == b.accept_trials and a.prompt_len == b.prompt_len
        torch.testing.assert_close(a.hidden, b.hidden, atol=1e-5, rtol=0)
    sizes = stored_bytes_per_token(got)
    assert sizes["reuse"] == 3 * engine.info.hidden_size * 4 + 4 and sizes["recompute"] == 4


def test_default_model_capture_matches_recompute(tmp_path: Path) -> None:
    """The real default model (bf16): one short chat request, plain decoding, captured by the buffer."""
    eng = TorchTargetEngine.from_config(ModelConfig(), EngineConfig(max_batch_size=1, max_seq_len=96))
    i = eng.info
    buf = SignalBuffer(
        SignalStore(tmp_path), ShardInfo(i.fingerprint, i.name, i.capture_layers, i.hidden_size)
    )
    plugin = OnlineAdaptation(DriftDetector(SignalConfig()), buf, None)
    gen = SpeculativeGenerator(eng, None, signal_sink=plugin.signal_sink)
    ids = eng.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three colors."}], tokenize=True, add_generation_prompt=True
    )
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    seq = gen.add(GenerationRequest("real", ids, 12))
    while not seq.finished:
        run_step(gen, StaticGamma(0), [plugin])
    gen.release("real")
    buf.close()
    (s,) = stored(tmp_path).values()
    assert s.token_ids.tolist() == seq.tokens[:-1] and s.prompt_len == len(ids)
    ref = prefill_states(eng, seq.tokens[:-1]).float()
    for c in range(len(i.capture_layers)):
        rel = (s.hidden[:, c].float() - ref[:, c]).norm() / ref[:, c].norm()
        assert rel <= 1e-2, (c, float(rel))


def test_drift_detection_switches_collection_on(engine: TorchTargetEngine, tmp_path: Path) -> None:
    """Algorithm 1 wiring: paused collection skips requests; an acceptance drop turns it back on."""
    from tide_trt.engine.generator import StepEvent

    det = DriftDetector(SignalConfig(drift_ema_short=0.2, drift_ema_long=0.02, drift_warmup_updates=20))
    det.pause("baseline")
    buf = make_buffer(engine, tmp_path, collect_fn=lambda: det.collection_enabled)
    plugin = OnlineAdaptation(det, buf, None)
    gen = SpeculativeGenerator(engine, None, signal_sink=plugin.signal_sink)

    def feed(accepted: int, steps: int) -> None:  # verification steps of a speculating request, γ = 3
        for _ in range(steps):
            plugin.after_step(gen, 3, [StepEvent("other", (1,), False, None, 3, accepted)], 0.01)

    def one_request(rid: str) -> None:
        seq = gen.add(GenerationRequest(rid, [5, 6, 7, 8], 6))
        while not seq.finished:
            run_step(gen, StaticGamma(0), [plugin])
        gen.release(rid)

    feed(3, 60)  # steady high acceptance, detector armed
    one_request("before")
    feed(0, 30)  # acceptance drops
    assert det.collection_enabled and det.snapshot().detections == 1
    one_request("after")
    buf.close()
    assert sorted(stored(tmp_path)) == ["after"]
    assert plugin.metrics()["signals_collection_enabled"] == 1.0
