"""TIDE behind a real tritonserver (model_repo/tide, Python backend) with the real default model on CPU.

The served draft is an ORACLE (tests/oracle_draft.py): a real EAGLE-3 checkpoint overfitted on the default
model's own greedy continuations of PROMPTS, loaded by the server from its path like any draft. On these prompts
it proposes what the target will emit, so verification accepts drafts (τ close to γ + 1) and the multi-token
commit paths of serving are exercised; the tests assert that (τ > 1.5) and that the text equals plain decoding.

Rule for text equality: the reference is plain greedy decoding in-process (float32, the same engine config).
Greedy speculative decoding is lossless, so served text must equal it unless two top logits tie within
float32 rounding of differently shaped steps (~1e-7 relative) — not the case for these prompts, and a mismatch
here is treated as a failure, not tolerated.
"""

from __future__ import annotations

import json
import queue
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.server_helpers import grpc_inputs_with, tide_metrics, wait_for_metrics
from tide_trt.commands.client import build_inputs, generate, read_response
from tide_trt.config import config_from_dict, config_to_dict, load_config
from tide_trt.errors import TideError
from tide_trt.serving.tritonserver import TritonServer, find_tritonserver, free_ports

pytestmark = pytest.mark.triton
ROOT = Path(__file__).resolve().parents[1]
REPO = ROOT / "model_repo"
CONFIG = ROOT / "configs" / "test_serving.yaml"
GAMMA = 2
ORACLE_MAX_NEW = 10  # the oracle memorises this many greedy tokens per prompt (requests here ask for <= 8)
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
           "Explain what a CPU does in one sentence."]  # fmt: skip


class Reference:
    """Plain greedy decoding in-process (SpeculativeGenerator without a draft), one request at a time."""

    def __init__(self, cfg) -> None:
        from tide_trt.engine.generator import SpeculativeGenerator
        from tide_trt.runtime import build_engine

        self.engine = build_engine(cfg)
        self.gen = SpeculativeGenerator(self.engine)
        self._cache: dict[tuple[str, int], str] = {}

    def prompt_ids(self, prompt: str) -> list[int]:
        from tide_trt.runtime import encode_prompt

        return encode_prompt(self.engine.tokenizer, prompt)

    def decode(self, ids: list[int]) -> str:
        eos = self.engine.info.eos_token_ids
        return self.engine.tokenizer.decode([t for t in ids if t not in eos], skip_special_tokens=True)

    def remember(self, prompt: str, greedy_ids: list[int]) -> None:
        """Plain greedy output ids already computed for `prompt` (greedy decoding is prefix-consistent: the
        first n ids are the answer for max_tokens=n, up to the first end token)."""
        eos = self.engine.info.eos_token_ids
        for n in range(1, len(greedy_ids) + 1):
            self._cache.setdefault((prompt, n), self.decode(greedy_ids[:n]))
            if greedy_ids[n - 1] in eos:
                break

    def text(self, prompt: str, max_tokens: int) -> str:
        from tide_trt.runtime import make_request, run_to_completion
        from tide_trt.spec.sampling import SamplingParams

        key = (prompt, max_tokens)
        if key not in self._cache:
            eos = self.engine.info.eos_token_ids
            req = make_request("ref", self.prompt_ids(prompt), max_tokens, SamplingParams(), eos)
            self._cache[key] = self.decode(run_to_completion(self.gen, [req], 0).sequences[0].output_ids)
        return self._cache[key]


@dataclass
class Stack:
    server: TritonServer
    ref: Reference


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    from tests.oracle_draft import build_oracle_draft

    tmp = tmp_path_factory.mktemp("tide_triton")
    doc = config_to_dict(load_config(CONFIG))
    doc["serving"]["max_queue"] = 16
    doc["draft"].update(gamma=GAMMA, lookup_ngram=0)
    # the suffix index on 8-token matches only and empty at start: new prompts draft from the head, prompts served
    # before draft from the global index (finished requests join it) — test_prometheus_metrics watches both
    doc["draft"]["suffix"].update(enabled=True, preload="", orders=[8], request_orders=[8])
    ref = Reference(config_from_dict(doc))
    oracle = build_oracle_draft(ref.engine, [ref.prompt_ids(p) for p in PROMPTS], ORACLE_MAX_NEW, tmp / "draft",
                                gamma=GAMMA, version=3, prompt_context=16)
    print(f"oracle draft: {oracle}")
    for prompt, ids in zip(PROMPTS, oracle.continuations, strict=True):
        ref.remember(prompt, ids)  # the oracle's training run was plain greedy decoding: reuse it as the reference
    doc["draft"]["path"] = str(oracle.path)
    (tmp / "tide.yaml").write_text(yaml.safe_dump(config_to_dict(config_from_dict(doc))))
    http, grpc, metrics_port = free_ports(3)
    server = TritonServer(
        REPO,
        find_tritonserver(),
        http_port=http,
        grpc_port=grpc,
        metrics_port=metrics_port,
        env={"TIDE_CONFIG": str(tmp / "tide.yaml")},
        log_file=tmp / "server.log",
    )
    server.start(timeout_s=300)
    try:
        yield Stack(server, ref)
    finally:
        server.stop()
    log = (tmp / "server.log").read_text()
    assert "scheduler stopped" in log and "failed to stop server" not in log, log[-3000:]  # graceful unload


def metrics(stack: Stack) -> dict[str, float]:
    return tide_metrics(stack.server.urls.metrics)


def wait_metrics(stack: Stack, check, timeout: float = 30.0) -> dict[str, float]:
    return wait_for_metrics(lambda: metrics(stack), check, timeout)


def settled_metrics(stack: Stack, check) -> dict[str, float]:
    """A scrape after `check` holds and one more publication interval (0.2 s) has passed: values are published one
    by one, so counters compared across scrapes must come from a quiet server."""
    import time

    wait_metrics(stack, check)
    time.sleep(0.5)
    return metrics(stack)


def http_post(stack: Stack, path: str, body: dict) -> tuple[int, str]:
    req = urllib.request.Request(
        f"{stack.server.urls.http}/v2/models/tide/{path}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# ---- tests -------------------------------------------------------------------------------------
def test_grpc_stream_and_single_response_match_engine(stack: Stack) -> None:
    url = stack.server.urls.grpc
    streamed = generate(url, PROMPTS[0], 8, stream=True)
    assert len(streamed.chunk_times) > 1 and streamed.text == stack.ref.text(PROMPTS[0], 8)
    single = generate(url, PROMPTS[1], 8, stream=False)
    assert len(single.chunk_times) == 1 and single.text == stack.ref.text(PROMPTS[1], 8)
    perf = single.perf
    assert perf["num_output_tokens"] <= 8 and perf["total_draft_tokens"] > 0
    assert perf["num_input_tokens"] > 10 and perf["finish_reason"] in ("length", "stop")
    # the oracle's drafts were really accepted: several tokens per verification step
    assert perf["total_accepted_draft_tokens"] > 0 and perf["mean_accepted_len"] > 1.5, perf
    assert 0.0 < perf["acceptance_rate"] <= 1.0


def test_http_generate_and_generate_stream(stack: Stack) -> None:
    code, body = http_post(stack, "generate", {"text_input": PROMPTS[2], "max_tokens": 8})
    assert code == 200 and json.loads(body)["text_output"] == stack.ref.text(PROMPTS[2], 8)
    code, body = http_post(
        stack,
        "generate_stream",
        {"text_input": PROMPTS[2], "max_tokens": 8, "stream": True, "return_perf_metrics": True},
    )
    events = [json.loads(line[5:]) for line in body.splitlines() if line.startswith("data:")]
    assert code == 200 and len(events) > 1
    assert "".join(e["text_output"] for e in events) == stack.ref.text(PROMPTS[2], 8)
    assert events[-1]["num_output_tokens"] <= 8 and "finish_reason" in events[-1]
    assert events[-1]["total_accepted_draft_tokens"] > 0 and events[-1]["mean_accepted_len"] > 1.5, events[-1]


def served_tau(before: dict[str, float], after: dict[str, float]) -> float:
    """τ served between two scrapes: output tokens per verification step = 1 + accepted drafts per step."""
    steps = after["tide_verify_steps_total"] - before["tide_verify_steps_total"]
    assert steps > 0, "no verification step between the scrapes"
    return 1.0 + (after["tide_accepted_draft_tokens_total"] - before["tide_accepted_draft_tokens_total"]) / steps


def test_sixteen_concurrent_streams(stack: Stack) -> None:
    url = stack.server.urls.grpc
    before = settled_metrics(stack, lambda m: m["tide_active_sequences"] == 0)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
    results: list = [None] * 16

    def one(i: int) -> None:
        try:
            results[i] = generate(url, prompts[i], 8, stream=True, timeout_s=300)
        except Exception as exc:  # recorded, asserted below
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(320)
    for prompt, res in zip(prompts, results, strict=True):
        assert not isinstance(res, Exception) and res is not None, res
        assert res.text == stack.ref.text(prompt, 8)
    m = settled_metrics(stack, lambda m: m["tide_active_sequences"] == 0 and m["tide_free_slots"] == 4
                        and m["tide_requests_completed_total"] >= before["tide_requests_completed_total"] + 16)
    assert m["tide_active_sequences"] == 0 and m["tide_free_slots"] == m["tide_max_slots"] == 4
    # batched speculative steps accepted the oracle's drafts: counters over this test, and the windowed gauge
    # (its last 128 steps are this test's and the two before, all on memorised prompts)
    assert served_tau(before, m) > 1.5 and m["tide_mean_accepted_len"] > 1.5, m


def _stream_client(url: str):
    import tritonclient.grpc as grpcclient

    events: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    return client, events


def test_cancelled_streams_free_their_slots(stack: Stack) -> None:
    url = stack.server.urls.grpc
    before = metrics(stack)["tide_requests_cancelled_total"]
    client, events = _stream_client(url)
    for i, topic in enumerate(("rivers", "bridges", "clocks", "maps")):  # fill every KV slot with long generations
        # (prompts not served before: the global suffix index would draft a served answer fast enough to end it)
        client.async_stream_infer("tide", build_inputs(f"Write a long essay about the history of {topic}.", 250,
                                                       stream=True), request_id=f"long{i}")
    got = set()
    while len(got) < 4:  # all four are running
        result, error = events.get(timeout=120)
        assert error is None, error
        got.add(result.get_response().id)
    waiting = {}
    t = threading.Thread(target=lambda: waiting.update(res=generate(url, PROMPTS[0], 8, stream=True, timeout_s=120)))
    t.start()  # queued behind the four long ones
    client.stop_stream(cancel_requests=True)
    client.close()
    t.join(150)
    assert waiting["res"].text == stack.ref.text(PROMPTS[0], 8)
    # gauges are published one by one, so a scrape can land between two of them: wait for the whole final state
    m = wait_metrics(
        stack,
        lambda m: m["tide_active_sequences"] == 0
        and m["tide_free_slots"] == 4
        and m["tide_queue_depth"] == 0
        and m["tide_requests_cancelled_total"] >= before + 4,
    )
    assert m["tide_requests_cancelled_total"] >= before + 4
    assert m["tide_active_sequences"] == 0 and m["tide_free_slots"] == 4 and m["tide_queue_depth"] == 0


def _bad(**changes):
    return grpc_inputs_with(changes, stream=False)


BAD = [
    ("missing text_input", dict(text_input=None), "text_input"),
    ("empty text", dict(text_input=("BYTES", np.array([b"  "], dtype=np.object_))), "text_input is empty"),
    (
        "invalid utf-8",
        dict(text_input=("BYTES", np.array([b"\xff\xfe"], dtype=np.object_))),
        "not valid UTF-8",
    ),
    ("max_tokens 0", dict(max_tokens=("INT32", np.array([0], np.int32))), "max_tokens must be in"),
    (
        "max_tokens over limit",
        dict(max_tokens=("INT32", np.array([100000], np.int32))),
        "max_tokens must be in",
    ),
    ("max_tokens dtype", dict(max_tokens=("FP32", np.array([4], np.float32))), "max_tokens"),
    ("max_tokens shape", dict(max_tokens=("INT32", np.array([4, 4], np.int32))), "max_tokens"),
    (
        "negative temperature",
        dict(temperature=("FP32", np.array([-1], np.float32))),
        "temperature must be >= 0",
    ),
    ("top_p 0", dict(top_p=("FP32", np.array([0], np.float32))), "top_p must be in (0, 1]"),
    ("top_p 1.5", dict(top_p=("FP32", np.array([1.5], np.float32))), "top_p must be in (0, 1]"),
    ("top_k -1", dict(top_k=("INT32", np.array([-1], np.int32))), "top_k must be >= 0"),
    (
        "prompt too long",
        dict(text_input=("BYTES", np.array([("word " * 700).encode()], np.object_))),
        "text_input is too long",
    ),
]


def test_bad_requests_get_clear_errors_and_server_keeps_serving(stack: Stack) -> None:
    client, events = _stream_client(stack.server.urls.grpc)
    try:
        for name, changes, expected in BAD:
            client.async_stream_infer("tide", _bad(**changes), request_id=name)
            result, error = events.get(timeout=60)
            assert error is not None, f"{name}: no error"
            assert expected in error.message(), f"{name}: {error.message()}"
    finally:
        client.stop_stream()
        client.close()
    assert generate(stack.server.urls.grpc, PROMPTS[3], 8).text == stack.ref.text(PROMPTS[3], 8)


def test_flood_past_queue_gets_server_busy(stack: Stack) -> None:
    client, events = _stream_client(stack.server.urls.grpc)
    n = 26  # 4 slots + 16 queue places
    try:
        for i in range(n):
            client.async_stream_infer("tide", build_inputs(PROMPTS[i % 4], 3, stream=False), request_id=f"f{i}")
        ok, busy = 0, []
        for _ in range(n):
            result, error = events.get(timeout=300)
            if error is None:
                assert read_response(result)[1]
                ok += 1
            else:
                busy.append(error.message())
    finally:
        client.stop_stream()
        client.close()
    assert busy and all("server busy" in m and "serving.max_queue=16" in m for m in busy), busy[:3]
    assert ok >= 20 and ok + len(busy) == n
    assert generate(stack.server.urls.grpc, PROMPTS[1], 8).text == stack.ref.text(PROMPTS[1], 8)


def test_prometheus_metrics(stack: Stack) -> None:
    before = settled_metrics(stack, lambda m: m["tide_active_sequences"] == 0)
    assert generate(stack.server.urls.grpc, PROMPTS[2], 8).text == stack.ref.text(PROMPTS[2], 8)
    m = settled_metrics(stack, lambda m: m["tide_requests_completed_total"] > before["tide_requests_completed_total"])
    for name in ("tide_output_tokens_total", "tide_accepted_per_drafted", "tide_mean_accepted_len", "tide_gamma",
                 "tide_draft_version", "tide_queue_depth", "tide_active_sequences", "tide_free_slots",
                 "tide_draft_tokens_total", "tide_requests_rejected_total"):  # fmt: skip
        assert name in m, name
    assert m["tide_draft_version"] == 3 and m["tide_gamma"] == GAMMA and m["tide_output_tokens_total"] > 0
    assert m["tide_draft_tokens_total"] > 0 and m["tide_accepted_draft_tokens_total"] > 0
    assert served_tau(before, m) > 1.5  # the request above, from the Prometheus counters
    assert m["tide_mean_accepted_len"] > 1.0 and m["tide_accepted_per_drafted"] > 0.0  # accepted drafts in the window
    assert m["tide_draft_rows_head_total"] > 0 and m["tide_accepted_draft_tokens_head_total"] > 0
    assert m["tide_suffix_index_sequences"] >= 1 and m["tide_suffix_index_tokens"] > 0


def test_a_repeated_prompt_drafts_from_the_global_suffix_index(stack: Stack) -> None:
    """A prompt served before: its answer is in the global index (finished requests join it), so the index
    drafts for it (long, accepted drafts); the text stays the engine's own."""
    url = stack.server.urls.grpc
    assert generate(url, PROMPTS[3], 24).text == stack.ref.text(PROMPTS[3], 24)
    before = settled_metrics(stack, lambda m: m["tide_active_sequences"] == 0)
    assert generate(url, PROMPTS[3], 24).text == stack.ref.text(PROMPTS[3], 24)
    m = settled_metrics(stack, lambda m: m["tide_requests_completed_total"] > before["tide_requests_completed_total"])
    index_rows = m["tide_draft_rows_index_total"] - before["tide_draft_rows_index_total"]
    accepted = m["tide_accepted_draft_tokens_index_total"] - before["tide_accepted_draft_tokens_index_total"]
    assert index_rows > 0 and accepted >= 0.8 * (m["tide_draft_tokens_index_total"]
                                                 - before["tide_draft_tokens_index_total"]), m
    assert served_tau(before, m) > 3.0 and 0 < m["tide_draft_rows_index_share"] < 1


def test_client_reports_unreachable_server() -> None:
    with pytest.raises(TideError):
        generate(f"127.0.0.1:{free_ports(1)[0]}", "hi", 4, timeout_s=10)
