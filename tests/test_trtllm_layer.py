"""The TensorRT-LLM path on CPU: everything except the TensorRT calls themselves (no GPU, no TensorRT here).

The packed layout is checked against TensorRT-LLM's own rules, written out by hand as expected values (a worked
example), not against our packer. `TrtllmTargetEngine.forward_step` runs end to end over the `EngineRuntime`
seam (tests/trtllm_runtime.py stands in for TensorRT only); numerics against the torch engine need a GPU
(builders/validate_trtllm.py).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import make_engine
from tide_trt.config import EngineConfig, config_from_dict
from tide_trt.engine import trt_refit
from tide_trt.engine.trtllm_engine import (
    TrtllmTargetEngine,
    check_engine_manifest,
    engine_dir_for,
    engine_inputs,
    make_manifest,
)
from tide_trt.engine.trtllm_layout import (
    CONTEXT,
    GENERATION,
    PagedSlotTable,
    pack_batch,
    unpack_logits,
    unpack_tokens,
)
from tide_trt.errors import TideError

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# --- import + construction without TensorRT ------------------------------------------------------------
def test_modules_import_without_tensorrt():
    for mod in (
        "tide_trt.engine.trtllm_engine",
        "tide_trt.engine.trtllm_layout",
        "tide_trt.engine.trt_refit",
    ):
        importlib.import_module(mod)
    _load("capture_network", ROOT / "plugins/hidden_capture/network.py")
    if not _has("tensorrt"):
        assert "tensorrt" not in sys.modules


@pytest.mark.skipif(_has("tensorrt_llm") and torch.cuda.is_available(), reason="TensorRT-LLM is usable here")
def test_constructing_without_tensorrt_llm_raises_clear_error():
    prefix = "engine.backend=trtllm needs TensorRT-LLM on an NVIDIA GPU: "
    with pytest.raises(TideError, match=prefix):
        TrtllmTargetEngine(None, EngineConfig(backend="trtllm", device="cuda"))
    from tide_trt.runtime import build_engine

    with pytest.raises(TideError, match=prefix):
        build_engine(config_from_dict({"engine": {"backend": "trtllm", "device": "cuda"}}))


# --- slots, packing, rollback --------------------------------------------------------------------------
def test_slot_table_bookkeeping():
    t = PagedSlotTable(max_slots=3, max_seq_len=10, tokens_per_block=4)
    assert t.blocks_per_slot == 3 and t.num_blocks == 9
    assert [t.allocate(), t.allocate()] == [0, 1] and t.num_free == 1
    t.advance(1, 5)
    t.advance(1, 2)
    assert t.seq_len(1) == 7 and t.prompt_len(1) == 5
    t.truncate(1, 3)
    assert t.seq_len(1) == 3 and t.prompt_len(1) == 3
    with pytest.raises(ValueError):
        t.truncate(1, 4)
    t.free(0)
    assert t.allocate() == 0 and t.seq_len(0) == 0
    with pytest.raises(ValueError):
        t.seq_len(2)  # never allocated
    assert t.block_ids(2) == [6, 7, 8]


def _reference_pack(slots, tokens, pasts):
    """Straightforward per-request expectations, in caller order."""
    rows = []
    for i, (s, t, p) in enumerate(zip(slots, tokens, pasts, strict=True)):
        gen = len(t) == 1 and p > 0
        rows.append(
            {
                "row": i,
                "slot": s,
                "ids": t,
                "pos": list(range(p, p + len(t))),
                "gen": gen,
                "seq": p + len(t),
                "past_kv": p if gen else p + len(t),
            }
        )
    return [r for r in rows if not r["gen"]] + [r for r in rows if r["gen"]]


def test_pack_batch_matches_reference():
    gen = torch.Generator().manual_seed(3)
    t = PagedSlotTable(max_slots=8, max_seq_len=64, tokens_per_block=8)
    slots = [t.allocate() for _ in range(6)]
    pasts = [0, 5, 9, 0, 17, 2]
    for s, p in zip(slots, pasts, strict=True):
        if p:
            t.advance(s, p)
    counts = [4, 1, 3, 1, 1, 6]  # ragged: prompts, a verification block, generation steps, a 1-token prompt
    tokens = [torch.randint(0, 99, (n,), generator=gen).tolist() for n in counts]
    order = [4, 1, 0, 5, 2, 3]  # caller order differs from slot order
    b = pack_batch([slots[i] for i in order], [tokens[i] for i in order], t)
    ref = _reference_pack([slots[i] for i in order], [tokens[i] for i in order], [pasts[i] for i in order])
    assert list(b.order) == [r["row"] for r in ref]
    assert b.input_ids.tolist() == [x for r in ref for x in r["ids"]]
    assert b.position_ids.tolist() == [x for r in ref for x in r["pos"]]
    assert b.request_types.tolist() == [GENERATION if r["gen"] else CONTEXT for r in ref]
    assert b.sequence_lengths.tolist() == [r["seq"] for r in ref]
    assert b.past_kv_lengths.tolist() == [r["past_kv"] for r in ref]
    assert b.last_token_ids.tolist() == torch.cumsum(torch.tensor([len(r["ids"]) for r in ref]), 0).tolist()
    assert b.num_context == sum(not r["gen"] for r in ref) and b.input_ids.dtype == torch.int32
    assert b.request_types.tolist() == sorted(b.request_types.tolist())  # contexts first
    with pytest.raises(TideError, match="max_seq_len"):
        pack_batch([slots[4]], [[1] * 48], t)
    with pytest.raises(ValueError):
        pack_batch([slots[0], slots[0]], [[1], [2]], t)


def test_unpack_tokens_and_logits():
    t = PagedSlotTable(max_slots=4, max_seq_len=32, tokens_per_block=4)
    slots = [t.allocate() for _ in range(3)]
    t.advance(slots[1], 4)
    tokens = [[1, 2, 3], [4], [5, 6]]
    b = pack_batch(slots, tokens, t)  # packed order: rows 0, 2 (context), then 1 (generation)
    flat = torch.zeros(b.num_tokens, 3, 2)  # [N, C, H]: value encodes (caller row, t)
    offsets = b.token_offsets()
    for j, row in enumerate(b.order):
        for k in range(b.counts[j]):
            flat[offsets[j] + k] = 10 * row + k + 1
    out = unpack_tokens(flat, b)  # [B, T, C, H]
    assert out.shape == (3, 3, 3, 2)
    for row, toks in enumerate(tokens):
        for k in range(3):
            assert torch.all(out[row, k] == ((10 * row + k + 1) if k < len(toks) else 0))
    logits_all = flat[:, 0, :]  # [N, V=2]
    assert torch.equal(unpack_logits(logits_all, b, "all"), out[:, :, 0, :])
    last = unpack_logits(logits_all, b, "last")
    assert last.shape == (3, 1, 2)
    assert [int(last[r, 0, 0]) for r in range(3)] == [10 * r + len(tokens[r]) for r in range(3)]
    per_request = torch.stack([logits_all[offsets[j + 1] - 1] for j in range(3)])  # [B, V] packed order
    assert torch.equal(unpack_logits(per_request, b, "last"), last)
    with pytest.raises(TideError, match="gather_context_logits"):
        unpack_logits(per_request, b, "all")


# --- manifest ------------------------------------------------------------------------------------------
def test_manifest_checks(monkeypatch, tmp_path):
    cfg = EngineConfig(backend="trtllm", device="cuda", max_batch_size=8, max_seq_len=512)
    good = make_manifest("fp1", [2, 15, 27], cfg.dtype, 8, 1024, 1024, 32, "/x.so", "plugin")
    check_engine_manifest(good, "fp1", cfg, (2, 15, 27))
    bad = dict(good, model_fingerprint="other", capture_layers=[1, 2, 3], max_batch_size=4)
    with pytest.raises(TideError) as err:
        check_engine_manifest(bad, "fp1", cfg, (2, 15, 27))
    assert (
        "fingerprint" in str(err.value)
        and "capture layers" in str(err.value)
        and "max_batch_size" in str(err.value)
    )
    assert engine_dir_for("fp1", cfg, str(tmp_path)) == tmp_path / "trtllm" / "fp1-bfloat16-b8-s512"
    monkeypatch.setenv("TIDE_TRTLLM_ENGINE_DIR", "/elsewhere")
    assert engine_dir_for("fp1", cfg, str(tmp_path)) == Path("/elsewhere")


# --- the layout against TensorRT-LLM's own rules (expected values written out by hand) -------------------
# Rules, from TensorRT-LLM's C++ batch manager (RuntimeBuffers::setFromInputs) and KV cache manager
# (WindowBlockManager::setOffsets), read in its sources; the numbers below are worked out by hand from them:
#   context request (a prompt, or a chunk of n tokens over p cached ones):
#     context_lengths = n, sequence_length = p + n, host_past_key_value_lengths = p + n, positions p..p+n-1,
#     logits ids += n (one gathered row per token with gather_context_logits);
#   generation request (1 token at p cached ones, prompt length P):
#     context_lengths = P, sequence_length = p + 1, host_past_key_value_lengths = p, position p;
#   all context requests precede all generation requests; last_token_ids = inclusive scan of the per-request
#   token counts; kv_cache_block_offsets [pools, batch, 2, max_blocks] holds, for block b and field f (0 = K,
#   1 = V), flat_index3(b, layer 0, f, num_layers, kv_factor 2) = (b * num_layers + 0) * 2 + f.
def _worked_example_table() -> tuple[PagedSlotTable, dict[str, int]]:
    """4 slots x 20 tokens, 8 tokens per block (M = 3 blocks per slot: slot s owns blocks 3s, 3s+1, 3s+2)."""
    t = PagedSlotTable(max_slots=4, max_seq_len=20, tokens_per_block=8)
    slots = {name: t.allocate() for name in ("new", "verify", "decode_a", "decode_b")}  # 0, 1, 2, 3
    t.advance(slots["verify"], 5)  # prompt of 5 ...
    t.advance(slots["verify"], 4)  # ... then 4 accepted tokens: 9 cached
    t.advance(slots["decode_a"], 6)  # prompt of 6 cached
    t.advance(slots["decode_b"], 4)  # prompt of 4 cached
    return t, slots


# caller order: decode_a (1 token), new prompt (3), verification block (4 over 9 cached), decode_b (1 token)
WORKED_CALLER = [("decode_a", [41]), ("new", [11, 12, 13]), ("verify", [21, 22, 23, 24]), ("decode_b", [31])]
WORKED_EXPECTED = {  # packed order: new, verify (context), then decode_a, decode_b (generation)
    "order": [1, 2, 0, 3],
    "input_ids": [11, 12, 13, 21, 22, 23, 24, 41, 31],
    "position_ids": [0, 1, 2, 9, 10, 11, 12, 6, 4],
    "host_request_types": [0, 0, 1, 1],
    "context_lengths": [3, 4, 6, 4],
    "sequence_length": [3, 13, 7, 5],
    "host_past_key_value_lengths": [3, 13, 6, 4],
    "last_token_ids": [3, 7, 8, 9],
    # num_layers = 2: offset of (block b, field f) = 4 b + f; rows: slot 0, 1, 2, 3 (packed order)
    "kv_cache_block_offsets": [
        [[[0, 4, 8], [1, 5, 9]], [[12, 16, 20], [13, 17, 21]], [[24, 28, 32], [25, 29, 33]],
         [[36, 40, 44], [37, 41, 45]]]
    ],
}


def test_packed_layout_matches_tensorrt_llm_rules_worked_example():
    t, slots = _worked_example_table()
    b = pack_batch([slots[n] for n, _ in WORKED_CALLER], [tok for _, tok in WORKED_CALLER], t)
    feeds = engine_inputs(b, t, num_layers=2, pool_pointer=0)
    assert list(b.order) == WORKED_EXPECTED["order"]
    for name, want in WORKED_EXPECTED.items():
        if name != "order":
            assert feeds[name].tolist() == want, name
    assert feeds["kv_cache_block_offsets"].shape == (1, 4, 2, 3)  # [pools, B, K/V, M]
    assert feeds["host_kv_cache_block_offsets"].tolist() == WORKED_EXPECTED["kv_cache_block_offsets"]
    assert {k: v.dtype for k, v in feeds.items() if k in WORKED_EXPECTED} == dict.fromkeys(
        [k for k in WORKED_EXPECTED if k != "order"], torch.int32
    )
    # rollback of 2 rejected drafts is a length change: the next token of the verified row is a generation
    # request at position 9 + 2 = 11 over 11 cached tokens, in the same blocks
    for s, n in zip(b.slots, b.counts, strict=True):
        t.advance(s, n)
    t.truncate(slots["verify"], 11)
    nxt = engine_inputs(pack_batch([slots["verify"]], [[7]], t), t, num_layers=2, pool_pointer=0)
    assert nxt["position_ids"].tolist() == [11] and nxt["host_request_types"].tolist() == [1]
    assert nxt["sequence_length"].tolist() == [12] and nxt["host_past_key_value_lengths"].tolist() == [11]
    assert nxt["kv_cache_block_offsets"].tolist() == [[[[12, 16, 20], [13, 17, 21]]]]


def test_engine_inputs_shapes_per_gpt_attention_plugin():
    t = PagedSlotTable(max_slots=2, max_seq_len=16, tokens_per_block=4)
    s = t.allocate()
    feeds = engine_inputs(pack_batch([s], [[1, 2, 3]], t), t, num_layers=5, pool_pointer=1234, pool_mapping_rank=2)
    assert feeds["host_kv_cache_pool_pointers"].tolist() == [[1234, 0]]  # [pools, (primary, secondary)]
    assert feeds["host_kv_cache_pool_mapping"].tolist() == [[0, i] for i in range(5)]  # [L, (pool, layer)]
    assert feeds["cache_indirection"].shape == (1, 1, 16)  # [B, beam, max attention window]
    assert feeds["host_max_attention_window_sizes"].tolist() == [16] * 5
    assert feeds["kv_cache_block_offsets"].tolist() == [[[[0, 10, 20, 30], [1, 11, 21, 31]]]]  # L = 5: 10 b + f
    assert all(v.device.type == "cpu" for v in feeds.values())


def test_forward_step_feeds_the_engine_and_returns_rows_in_caller_order(tiny_checkpoint, tmp_path):
    """TrtllmTargetEngine.forward_step end to end over the TensorRT seam: the feeds it hands the engine are the
    worked example's, and each output row comes back to the row that owns it (by the runtime's row labels)."""
    from tests.trtllm_runtime import make_trtllm_engine
    from tide_trt.engine.step_batch import StepBatch, StepRow

    eng, runtime = make_trtllm_engine(tiny_checkpoint, tmp_path, max_batch_size=4, max_seq_len=20,
                                      tokens_per_block=8)
    slots = {name: eng.allocate_slot() for name in ("new", "verify", "decode_a", "decode_b")}
    for name, n in (("verify", 5), ("verify", 4), ("decode_a", 6), ("decode_b", 4)):  # as the worked example
        eng.slots.advance(slots[name], n)
    rows = [StepRow(slots[n], eng.seq_len(slots[n]), tuple(tok)) for n, tok in WORKED_CALLER]
    rows[1] = StepRow(slots["new"], 0, (11, 12, 13), is_prompt=True, num_logits=1)
    out = eng.forward_step(StepBatch.build(rows))
    (feeds,) = runtime.calls
    for name, want in WORKED_EXPECTED.items():
        if name not in ("order", "kv_cache_block_offsets"):
            assert feeds[name].tolist() == want, name
    # the tiny model has 6 layers: offset of (block b, field f) = 12 b + f
    assert feeds["kv_cache_block_offsets"].tolist() == [
        [[[0, 12, 24], [1, 13, 25]], [[36, 48, 60], [37, 49, 61]], [[72, 84, 96], [73, 85, 97]],
         [[108, 120, 132], [109, 121, 133]]]
    ]
    # packed row j carries input_ids[j] + j/1000; caller order = decode_a, new x3, verify x4, decode_b
    want_hidden = [41.007, 11.0, 12.001, 13.002, 21.003, 22.004, 23.005, 24.006, 31.008]
    torch.testing.assert_close(out.hidden[:, 0, 0], torch.tensor(want_hidden))  # [N]
    assert out.hidden.shape == (9, 3, tiny_checkpoint.arch.hidden_size)
    # logits: all of decode_a (1), the last of the prompt (1), all of verify (4), all of decode_b (1)
    assert out.logits.argmax(-1).tolist() == [42, 14, 22, 23, 24, 25, 32]
    assert [eng.seq_len(slots[n]) for n in ("decode_a", "new", "verify", "decode_b")] == [7, 3, 13, 5]


# --- refit validation ----------------------------------------------------------------------------------
def _specs():
    return {
        "w_a": trt_refit.WeightSpec("a.weight", "transpose", (4, 3), "float32"),
        "n": trt_refit.WeightSpec("norm", "identity", (4,), "float32"),
    }


def test_refit_validation_and_name_map(tmp_path):
    state = {"a.weight": torch.randn(3, 4), "norm": torch.ones(4), "d2t": torch.arange(5)}
    out = trt_refit.prepare_refit_weights(state, _specs())
    assert torch.equal(out["w_a"], state["a.weight"].t()) and out["w_a"].is_contiguous()
    cases = {
        "missing weights \\['norm'\\]": {"a.weight": state["a.weight"]},
        "shape \\(4, 2\\)": {**state, "a.weight": torch.randn(2, 4)},
        "dtype bfloat16": {**state, "norm": torch.ones(4, dtype=torch.bfloat16)},
        "no engine counterpart \\['extra'\\]": {**state, "extra": torch.ones(1)},
        "NaN": {**state, "norm": torch.full((4,), float("nan"))},
    }
    for message, bad in cases.items():
        with pytest.raises(trt_refit.RefitError, match=message):
            trt_refit.prepare_refit_weights(bad, _specs())
    trt_refit.check_engine_weight_names(["w_a", "n"], _specs())
    with pytest.raises(trt_refit.RefitError, match="cannot refit \\['n'\\]"):
        trt_refit.check_engine_weight_names(["w_a"], _specs())
    with pytest.raises(trt_refit.RefitError, match="no map entry \\['w_b'\\]"):
        trt_refit.check_engine_weight_names(["w_a", "n", "w_b"], _specs())
    trt_refit.save_name_map(tmp_path / "m.json", _specs(), {"note": 1})
    assert trt_refit.load_name_map(tmp_path / "m.json") == _specs()
    if not _has("tensorrt"):  # validation runs before TensorRT is needed
        with pytest.raises(trt_refit.RefitError):
            trt_refit.refit_draft_engine("x.engine", {"a.weight": state["a.weight"]}, _specs())
        with pytest.raises(TideError, match="needs TensorRT"):
            trt_refit.refit_draft_engine("x.engine", state, _specs())


# --- builders ------------------------------------------------------------------------------------------
def test_target_builder_help_dry_run_and_missing_trtllm(tiny_model_dir, capsys):
    done = subprocess.run(
        [sys.executable, str(ROOT / "builders/build_target_engine.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "--max-batch-size" in done.stdout and "(default: 32)" in done.stdout
    bte = _load("build_target_engine", ROOT / "builders/build_target_engine.py")
    assert bte.main(["--dry-run", "--model", str(tiny_model_dir), "--max-batch-size", "4"]) == 0
    plan = capsys.readouterr().out
    assert '"capture_layers": [\n    2,\n    3,\n    3\n  ]' in plan and '"max_batch_size": 4' in plan
    # what goes to TensorRT-LLM 1.2.1's PluginConfig(...) / BuildConfig(...): the options the backend depends on
    shown = json.loads(plan)
    assert shown["plugin_config"] == {
        "gpt_attention_plugin": "bfloat16", "remove_input_padding": True, "context_fmha": True,
        "use_paged_context_fmha": True, "tokens_per_block": 32, "reduce_fusion": False,
    }
    assert shown["build_config"] == {
        "max_batch_size": 4, "max_input_len": 1024, "max_seq_len": 1024, "max_num_tokens": 512, "max_beam_width": 1,
        "gather_context_logits": True, "strongly_typed": True, "kv_cache_type": "paged",
    }
    if not _has("tensorrt_llm"):
        assert bte.main(["--model", str(tiny_model_dir)]) == 2
        assert "needs TensorRT-LLM on an NVIDIA GPU" in capsys.readouterr().err


@pytest.fixture(scope="module")
def draft_builder():
    return _load("build_draft_engine", ROOT / "builders/build_draft_engine.py")


@pytest.fixture()
def tiny_head(tiny_checkpoint):
    from tide_trt.training.offline import new_head

    head = new_head(make_engine(tiny_checkpoint), torch.arange(40))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return head


def test_draft_graph_matches_eagle3_step_with_explicit_kv(draft_builder, tiny_head):
    from tide_trt.engine.kv_cache import KVCache

    head, c = tiny_head, tiny_head.cfg
    graph = draft_builder.DraftStepGraph(head).eval()
    gen = torch.Generator().manual_seed(2)
    counts, width = [3, 1], 3
    captured = torch.randn(2, width, 3, c.hidden_size, generator=gen)  # [B, T, C, H]
    tokens = torch.randint(0, c.target_vocab_size, (2, width), generator=gen)
    cache = KVCache(1, 2, c.num_kv_heads, 32, c.head_dim, torch.float32, "cpu")
    slots, last = torch.tensor([0, 1]), torch.tensor([n - 1 for n in counts])
    with torch.no_grad():
        h_ref, l_ref = head.step(cache, slots, head.fuse(captured), tokens, torch.tensor([0, 0]), last)
        empty = torch.zeros(2, c.num_kv_heads, 0, c.head_dim)
        logits, hid, pk, pv = graph(
            captured,
            torch.zeros(2, width, c.hidden_size),
            torch.ones(2, width, 1),
            head.embed[tokens],
            torch.arange(width).repeat(2, 1),
            empty,
            empty,
            draft_builder.attention_mask([0, 0], 0, width),
            last,
        )
        torch.testing.assert_close(hid, h_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits, l_ref, atol=1e-5, rtol=1e-5)
        ids = head.d2t[logits.argmax(-1)]  # chained step: own hidden back in, at each row's next position
        pos = torch.tensor(counts)
        h2_ref, l2_ref = head.step(
            cache, slots, h_ref[:, None], ids[:, None], pos, torch.zeros(2, dtype=torch.long)
        )
        logits2, hid2, pk2, _ = graph(
            torch.zeros(2, 1, 3, c.hidden_size),
            hid[:, None],
            torch.zeros(2, 1, 1),
            head.embed[ids][:, None],
            pos[:, None],
            pk,
            pv,
            draft_builder.attention_mask(counts, width, 1),
            torch.zeros(2, dtype=torch.long),
        )
    torch.testing.assert_close(hid2, h2_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits2, l2_ref, atol=1e-5, rtol=1e-5)
    assert pk2.shape == (2, c.num_kv_heads, width + 1, c.head_dim)


def test_draft_weight_map_round_trips_through_refit_validation(draft_builder, tiny_head):
    graph = draft_builder.DraftStepGraph(tiny_head, torch.bfloat16)
    specs = draft_builder.weight_specs(tiny_head, torch.bfloat16)
    params = dict(graph.named_parameters())
    assert set(params) == set(specs) and {s.source for s in specs.values()} == set(tiny_head.state_dict()) - {
        "d2t"
    }
    state = {
        k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tiny_head.state_dict().items()
    }
    weights = trt_refit.prepare_refit_weights(state, specs)
    for name, w in weights.items():
        assert torch.equal(w, params[name].data), name
    with pytest.raises(trt_refit.RefitError, match="dtype float32"):
        trt_refit.prepare_refit_weights(tiny_head.state_dict(), specs)  # a float32 draft into a bf16 engine


def test_draft_graph_traces_with_dynamic_batch_tokens_and_cache(draft_builder, tiny_head):
    """torch.export (the front end of torch.onnx's dynamo exporter) with symbolic B, T, P."""
    graph = draft_builder.DraftStepGraph(tiny_head).eval()
    shapes = draft_builder.dynamic_shapes(max_batch=64, max_tokens=1024)
    program = torch.export.export(graph, draft_builder.example_inputs(graph), dynamic_shapes=shapes)
    args = draft_builder.example_inputs(graph, batch=3, new=1, past=7)
    for got, want in zip(program.module()(*args), graph(*args), strict=True):
        torch.testing.assert_close(got, want)


# ONNX Runtime vs PyTorch, float32 graph on CPU: the same ops in another kernel library (MatMul blocking, fused
# softmax) round differently; measured max |diff| is ~2e-6 here, so 2e-5 absolute + 1e-4 relative leaves margin
# while a wrong op (a missed RoPE half, a mask off by one, a swapped weight) moves outputs by >1e-2.
ORT_ATOL, ORT_RTOL = 2e-5, 1e-4


def test_draft_onnx_only_export_matches_pytorch_under_onnxruntime(draft_builder, tiny_head, tmp_path, capsys):
    """`--onnx-only` writes a graph whose initializers carry every refittable weight name, and onnxruntime
    runs it at shapes other than the export example (symbolic B, T, P) with PyTorch's outputs."""
    import onnx
    import onnxruntime as ort

    with pytest.raises(SystemExit) as done:
        draft_builder.parse_args(["--help"])
    assert done.value.code == 0 and "--onnx-only" in capsys.readouterr().out
    from tide_trt.draft.checkpoint import save_draft

    ckpt = save_draft(tiny_head, tmp_path / "draft", {"version": 1})
    out = tmp_path / "out"
    argv = ["--draft", str(ckpt), "--out-dir", str(out), "--onnx-only", "--dtype", "float32"]
    assert draft_builder.main(argv) == 0
    model = onnx.load(str(out / "draft.onnx"))
    onnx.checker.check_model(model)
    names = {i.name for i in model.graph.initializer}
    assert set(trt_refit.load_name_map(out / "weight_map.json")) <= names
    assert [i.name for i in model.graph.input] == draft_builder.INPUTS
    assert [o.name for o in model.graph.output] == draft_builder.OUTPUTS

    graph = draft_builder.DraftStepGraph(tiny_head).eval()
    session = ort.InferenceSession(str(out / "draft.onnx"), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch, new, past in [(2, 3, 4), (3, 1, 7), (1, 5, 0), (4, 2, 9)]:
        torch.manual_seed(batch * 100 + new * 10 + past)
        args = draft_builder.example_inputs(graph, batch=batch, new=new, past=past)
        with torch.no_grad():
            want = graph(*args)
        feed = {name: a.numpy() for name, a in zip(draft_builder.INPUTS, args, strict=True)}
        got = session.run(draft_builder.OUTPUTS, feed)
        for name, g, w in zip(draft_builder.OUTPUTS, got, want, strict=True):
            assert g.shape == tuple(w.shape), (name, batch, new, past)
            torch.testing.assert_close(torch.from_numpy(g), w, atol=ORT_ATOL, rtol=ORT_RTOL, msg=name)
            worst = max(worst, (torch.from_numpy(g) - w).abs().max().item())
    print(f"onnxruntime {ort.__version__} vs PyTorch: max |diff| {worst:.2e} (atol {ORT_ATOL}, rtol {ORT_RTOL})")


def test_draft_onnx_export_without_onnx_fails_clearly(draft_builder, tiny_head, tmp_path, capsys, monkeypatch):
    from tide_trt.draft.checkpoint import save_draft

    ckpt = save_draft(tiny_head, tmp_path / "draft", {"version": 1})
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError, as on a machine without it
    argv = ["--draft", str(ckpt), "--out-dir", str(tmp_path / "out"), "--onnx-only", "--dtype", "float32"]
    assert draft_builder.main(argv) == 2
    assert "needs the onnx package" in capsys.readouterr().err


# --- capture plugin ------------------------------------------------------------------------------------
def test_capture_plan_and_chain_contract():
    net = _load("capture_network", ROOT / "plugins/hidden_capture/network.py")
    plan = net.plan_capture([5, 2, 5], num_layers=5)  # unsorted, duplicate, and the final output (5 == L)
    assert [(p.layer, p.slot, p.has_accumulator, p.after_last_layer) for p in plan] == [
        (2, 1, False, False),
        (5, 0, True, True),
        (5, 2, True, True),
    ]
    with pytest.raises(ValueError):
        net.plan_capture([0, 6, 1], num_layers=5)
    states = {i: torch.randn(4, 8) for i in range(6)}  # residual stream entering layer i, [N, H]
    acc = None
    for p in net.plan_capture([1, 3, 4], num_layers=5):
        acc = net.capture_reference(states[p.layer], acc if p.has_accumulator else None, p.slot, 3)
    assert torch.equal(acc, torch.stack([states[1], states[3], states[4]], dim=1))  # [N, 3, H]


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to compile the kernel's index math")
def test_capture_kernel_index_math_compiled_on_host(tmp_path):
    src = tmp_path / "t.cpp"
    src.write_text("""
#include "tideHiddenCaptureKernel.h"
#include <cstdio>
int main() {
    const int N = 3, S = 3, H = 5, slot = 1;
    float hidden[N * H], acc[N * S * H], out[N * S * H];
    for (int i = 0; i < N * H; ++i) hidden[i] = 1000 + i;
    for (int i = 0; i < N * S * H; ++i) acc[i] = -1 - i;
    for (int use = 0; use < 2; ++use) {
        for (long i = 0; i < N * S * H; ++i) {
            tide::CaptureIndex c = tide::captureSource(i, H, S, slot, use == 1);
            out[i] = c.source == tide::CaptureSource::kHidden ? hidden[c.offset]
                   : c.source == tide::CaptureSource::kAccumulator ? acc[c.offset] : 0.0f;
        }
        for (int i = 0; i < N * S * H; ++i) std::printf("%g ", out[i]);
        std::printf("\\n");
    }
}
""")
    exe = tmp_path / "t"
    subprocess.run(
        [
            "g++",
            "-std=c++17",
            "-DTIDE_CAPTURE_HOST_ONLY",
            f"-I{ROOT / 'plugins/hidden_capture'}",
            str(src),
            "-o",
            str(exe),
        ],
        check=True,
        timeout=120,
    )
    lines = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines()
    net = _load("capture_network", ROOT / "plugins/hidden_capture/network.py")
    hidden = torch.arange(15, dtype=torch.float32).reshape(3, 5) + 1000
    acc = -1 - torch.arange(45, dtype=torch.float32).reshape(3, 3, 5)
    for line, a in zip(lines, (None, acc), strict=True):
        got = torch.tensor([float(x) for x in line.split()]).reshape(3, 3, 5)
        assert torch.equal(got, net.capture_reference(hidden, a, 1, 3))
