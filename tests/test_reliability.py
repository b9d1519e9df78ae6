"""Reliability of a real `tide serve` on loopback (tritonserver + the Python backend + `tide train`), abused.

The target is a tiny random Llama (4 layers, hidden 64) with the default model's tokenizer and chat template, and
an untrained draft for it (γ = 2), so hundreds of requests take seconds on 2 cores; every layer between the socket
and the engine is the production one. Tests run in file order against one server (module fixture):

1. the greedy answer to a fixed prompt is recorded;
2. >= 200 malformed requests of >= 15 kinds over HTTP and gRPC: each gets a 4xx (HTTP) / an error (gRPC) with a
   message. Who answers: Triton's own front end for what never reaches the model (a body that is not JSON, not an
   object, a JSON value of the wrong type for a declared input, an unknown input name, an unknown model, the
   non-streaming `generate` endpoint of this decoupled model, a wrong declared dtype over gRPC); TIDE's request
   validation (`tide_trt/serving/validation`) for everything else — see `KINDS` (`front`/`tide` per kind). What is
   counted is what was observed: per kind and transport the HTTP status / gRPC outcome of every request, and who
   answered (TIDE's `tide_requests_rejected_total` moves by one, or Triton answered without reaching the model),
   which must match the table;
3. 64 concurrent gRPC streams: all complete with the text each prompt gets when served alone;
4. 50 streams cancelled mid-stream (after their first token);
5. then: every slot free, the queue empty, the same greedy answer as in 1, metrics still served;
6. the trainer process SIGKILLed mid-round: serving unaffected, `tide serve` notices, and `tide train` restarted
   on the same stores completes the round;
7. `tide serve` stopped with SIGTERM while a client's HTTP stream and a client's gRPC stream are broken (client
   killed / socket reset mid-stream): every process of the tree gone within `serving.stop_grace_s`.
Figures are printed (run with `-s`).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import yaml

from tests.server_helpers import grpc_inputs_with, tide_metrics, wait_for_metrics
from tide_trt.commands.client import build_inputs, generate
from tide_trt.serving.tritonserver import free_ports

pytestmark = pytest.mark.triton
TIDE = [sys.executable, "-m", "tide_trt.cli"]
SLOTS = 8
STOP_GRACE_S = 10.0
PROMPT = "Tell me about lighthouses."
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
           "Explain what a CPU does in one sentence."]  # fmt: skip


@dataclass
class Served:
    proc: subprocess.Popen
    http: str  # host:port
    grpc: str
    metrics_url: str
    err: Path
    config: Path
    tmp: Path
    lines: list[str] = field(default_factory=list)
    greedy: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.err.read_text(errors="replace")


def _tiny_model(out: Path) -> Path:
    """A tiny random Llama with the default model's vocabulary, tokenizer and chat template."""
    from tide_trt.models.loader import resolve_model_dir
    from tide_trt.models.tiny import write_tiny_llama

    write_tiny_llama(out, seed=0, vocab_size=49152, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2)
    default = resolve_model_dir("default")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (default / name).is_file():
            shutil.copy(default / name, out / name)
    return out


def _tiny_draft(model_dir: Path, out: Path) -> Path:
    import torch

    from tide_trt.config import EngineConfig
    from tide_trt.draft.checkpoint import save_draft
    from tide_trt.engine.torch_engine import TorchTargetEngine
    from tide_trt.models.loader import load_checkpoint
    from tide_trt.training.offline import new_head

    engine = TorchTargetEngine(load_checkpoint(str(model_dir)), EngineConfig(dtype="float32", max_batch_size=1,
                                                                              max_seq_len=64))  # fmt: skip
    torch.manual_seed(0)
    return save_draft(new_head(engine, torch.arange(2048)), out, {"version": 1})


def _config(tmp: Path) -> Path:
    model = _tiny_model(tmp / "model")
    cfg = {
        "model": {"path": str(model)},
        "engine": {"dtype": "float32", "max_batch_size": SLOTS, "max_seq_len": 256, "num_threads": 1},
        "draft": {"path": str(_tiny_draft(model, tmp / "draft")), "gamma": 2},
        "controller": {"mode": "static"},
        "serving": {"max_queue": 64, "max_tokens_limit": 128, "metrics_interval_s": 0.2, "ready_timeout_s": 300,
                    "stop_grace_s": STOP_GRACE_S},  # fmt: skip
        "signals": {"enabled": True, "store_dir": str(tmp / "signals")},
        # rounds start early (64 new label tokens) and are long (many steps): the trainer is killed inside one
        "trainer": {"enabled": True, "drafts_dir": str(tmp / "drafts"), "min_new_tokens": 64,
                    "steps_per_round": 100000, "poll_seconds": 0.5, "batch_size": 2, "chunk_len": 32,
                    "epochs_per_round": 1000.0},  # fmt: skip
    }
    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("reliability")
    config = _config(tmp)
    ports = free_ports(3)
    args = ["serve", "--config", str(config), "--http-port", str(ports[0]), "--grpc-port", str(ports[1]),
            "--metrics-port", str(ports[2])]  # fmt: skip
    err = tmp / "serve.err"
    with err.open("w") as log:
        proc = subprocess.Popen([*TIDE, *args], stdout=subprocess.PIPE, stderr=log, text=True, cwd=tmp)
    s = Served(proc, f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}", f"http://127.0.0.1:{ports[2]}/metrics",
               err, config, tmp)  # fmt: skip
    threading.Thread(target=lambda: s.lines.extend(proc.stdout), daemon=True).start()  # type: ignore[arg-type]
    try:
        deadline = time.monotonic() + 300
        while not any("ready" in ln for ln in s.lines):
            assert proc.poll() is None, s.log()[-3000:]
            assert time.monotonic() < deadline, "tide serve not ready in time"
            time.sleep(0.2)
        yield s
    finally:
        if proc.poll() is None:
            members = _tree(proc.pid)
            proc.kill()
            for p in members:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()


# ---- helpers -----------------------------------------------------------------------------------------
def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def metrics(s: Served) -> dict[str, float]:
    return tide_metrics(s.metrics_url)


def wait_metrics(s: Served, check, timeout: float = 60.0) -> dict[str, float]:
    return wait_for_metrics(lambda: metrics(s), check, timeout)


def http_raw(s: Served, path: str, body: bytes) -> tuple[int, str]:
    req = urllib.request.Request(f"http://{s.http}/v2/models/{path}", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _idle(m: dict[str, float]) -> bool:
    return m["tide_active_sequences"] == 0 and m["tide_free_slots"] == SLOTS and m["tide_queue_depth"] == 0


# ---- 1. the greedy reference ------------------------------------------------------------------------
def _record_greedy(served: Served) -> None:
    for prompt in [PROMPT, *PROMPTS]:
        if prompt not in served.greedy:
            served.greedy[prompt] = generate(served.grpc, prompt, 16, stream=True, timeout_s=120).text


def test_greedy_answers_alone(served: Served) -> None:
    _record_greedy(served)
    assert all(served.greedy.values()), served.greedy
    code, body = http_raw(served, "tide/generate_stream",
                          json.dumps({"text_input": PROMPT, "max_tokens": 16, "stream": True}).encode())
    events = [json.loads(line[5:]) for line in body.splitlines() if line.startswith("data:")]
    assert code == 200 and "".join(e["text_output"] for e in events) == served.greedy[PROMPT]
    print(f"\n[reliability] greedy reference ({len(served.greedy)} prompts, 16 tokens) recorded")


# ---- 2. malformed requests ---------------------------------------------------------------------------
def _grpc_inputs(changes: dict[str, Any]) -> list:
    return grpc_inputs_with(changes, stream=True)


def _b(*texts: bytes) -> tuple[str, np.ndarray]:
    return "BYTES", np.array(list(texts), dtype=np.object_)


def _i32(*v: int) -> tuple[str, np.ndarray]:
    return "INT32", np.array(v, np.int32)


def _f32(*v: float) -> tuple[str, np.ndarray]:
    return "FP32", np.array(v, np.float32)


LONG = ("word " * 700).encode()
GOOD = {"text_input": "hello", "max_tokens": 4, "stream": True}
STREAM = "tide/generate_stream"
J = json.dumps


def _http(path: str, body: dict | bytes, status: int = 400) -> tuple[str, bytes, int]:
    return path, body if isinstance(body, bytes) else J(body).encode(), status


# kind -> (who answers, HTTP (path, body, status) or None, gRPC input changes or None, expected message part).
# Triton 2.51's HTTP front end answers JSON-level errors itself, and not always with a 4xx: a body that is not JSON
# or not an object, or a value of the wrong JSON type, gets 500; the non-streaming `generate` endpoint of this
# decoupled model gets 200 with an error body; an unknown model 404. Those statuses are asserted as they are
# (a change in Triton shows up here). Unknown JSON keys are not errors for Triton's generate extension (they
# become request parameters, ignored), so "unknown input" is a gRPC-only kind. TIDE's own errors are HTTP 400.
KINDS: dict[str, tuple[str, tuple[str, bytes, int] | None, dict | None, str]] = {
    "body not JSON": ("front", _http(STREAM, b"{not json", 500), None, "failed to parse the request JSON"),
    "body a JSON array": ("front", _http(STREAM, b"[1, 2]", 500), None, "non-object"),
    "max_tokens a JSON string": ("front", _http(STREAM, {**GOOD, "max_tokens": "x"}, 500), None, "signed-integer"),
    "unknown model": ("front", _http("nosuchmodel/generate_stream", GOOD, 404), None, "nosuchmodel"),
    "non-streaming endpoint": ("front", _http("tide/generate", GOOD, 200), None, "exactly 1 response"),
    "max_tokens declared FP32": ("front", None, {"max_tokens": _f32(4.0)}, "expects 'INT32'"),
    "max_tokens two values": ("front", None, {"max_tokens": _i32(4, 4)}, "unexpected shape"),
    "unknown input": ("front", None, {"bogus": _i32(1)}, "bogus"),
    "missing text_input": ("tide", _http(STREAM, {"max_tokens": 4, "stream": True}), {"text_input": None},
                           "text_input is required"),
    "missing max_tokens": ("tide", _http(STREAM, {"text_input": "hi", "stream": True}), {"max_tokens": None},
                           "max_tokens is required"),
    "blank text": ("tide", _http(STREAM, {**GOOD, "text_input": "   "}), {"text_input": _b(b"   ")},
                   "text_input is empty"),
    "invalid UTF-8": ("tide", None, {"text_input": _b(b"\xff\xfe")}, "not valid UTF-8"),
    "max_tokens 0": ("tide", _http(STREAM, {**GOOD, "max_tokens": 0}), {"max_tokens": _i32(0)},
                     "max_tokens must be in"),
    "max_tokens negative": ("tide", _http(STREAM, {**GOOD, "max_tokens": -5}), {"max_tokens": _i32(-5)},
                            "max_tokens must be in"),
    "max_tokens over limit": ("tide", _http(STREAM, {**GOOD, "max_tokens": 100000}), {"max_tokens": _i32(100000)},
                              "max_tokens must be in"),
    "negative temperature": ("tide", _http(STREAM, {**GOOD, "temperature": -1.0}), {"temperature": _f32(-1.0)},
                             "temperature must be >= 0"),
    "top_p 0": ("tide", _http(STREAM, {**GOOD, "top_p": 0.0}), {"top_p": _f32(0.0)}, "top_p must be in (0, 1]"),
    "top_p 1.5": ("tide", _http(STREAM, {**GOOD, "top_p": 1.5}), {"top_p": _f32(1.5)}, "top_p must be in (0, 1]"),
    "top_k negative": ("tide", _http(STREAM, {**GOOD, "top_k": -1}), {"top_k": _i32(-1)}, "top_k must be >= 0"),
    "prompt too long": ("tide", _http(STREAM, {**GOOD, "text_input": LONG.decode()}), {"text_input": _b(LONG)},
                        "text_input is too long"),
    "17 stop words": ("tide", _http(STREAM, {**GOOD, "stop_words": [f"w{i}" for i in range(17)]}),
                      {"stop_words": _b(*[f"w{i}".encode() for i in range(17)])}, "at most 16"),
}
ROUNDS = 7  # each kind, each transport it applies to, ROUNDS times


def _grpc_error(client, events: queue.Queue, changes: dict, rid: str) -> tuple[str | None, str]:
    """The error message of one malformed request over an open gRPC stream (None: no error came back) and the
    observed code: the error's gRPC status, "client" when the client library refused to send it."""
    from tritonclient.utils import InferenceServerException

    try:
        client.async_stream_infer("tide", _grpc_inputs(changes), request_id=rid, enable_empty_final_response=True)
    except InferenceServerException as exc:  # rejected by the client library before sending: still an error
        return exc.message(), "client"
    while True:
        result, error = events.get(timeout=60)
        if error is not None:
            return error.message(), str(error.status() or "stream error")  # Triton sets no status on a stream
        if result.get_response().parameters.get("triton_final_response").bool_param:
            return None, "ok"


def _http_error(text: str) -> str:
    """The error message of an HTTP answer: a JSON object, or one server-sent event, with an "error" field."""
    body = text.strip()
    if body.startswith("data:"):
        lines = [ln for ln in body.splitlines() if ln.startswith("data:")]
        assert len(lines) == 1, body  # an error is the only event: nothing was generated first
        body = lines[0][5:]
    return str(json.loads(body).get("error", ""))


def _answered_by(served: Served, before: float) -> str:
    """Who answered the request just sent, observed: TIDE's validation counts each request it refuses
    (`tide_requests_rejected_total`), Triton's front end refuses without reaching the model. Waits up to 1.5 s
    (the metrics refresh every 0.2 s) for the count to move."""
    after = wait_metrics(served, lambda m: m["tide_requests_rejected_total"] > before, timeout=1.5)
    delta = after["tide_requests_rejected_total"] - before
    return {0.0: "front", 1.0: "tide"}.get(delta, f"{delta:+g} rejections")


def test_malformed_requests_get_errors_with_messages(served: Served) -> None:
    import tritonclient.grpc as grpcclient

    observed: dict[str, Counter] = {kind: Counter() for kind in KINDS}  # kind -> (transport, observed code) counts
    who: dict[tuple[str, str], str] = {}  # (kind, transport) -> who answered, observed in the first round
    client = grpcclient.InferenceServerClient(served.grpc)
    events: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    try:
        for r in range(ROUNDS):
            for kind, (_, http, changes, expected) in KINDS.items():
                if http is not None:
                    path, body, status = http
                    before = metrics(served)["tide_requests_rejected_total"] if r == 0 else 0.0
                    code, text = http_raw(served, path, body)
                    if r == 0:
                        who[kind, "http"] = _answered_by(served, before)
                    message = _http_error(text)
                    assert code == status and message and expected in message, (kind, code, text)
                    observed[kind]["http", code] += 1
                if changes is not None:
                    before = metrics(served)["tide_requests_rejected_total"] if r == 0 else 0.0
                    message, status_code = _grpc_error(client, events, changes, f"bad{r}-{kind}")
                    if r == 0:
                        who[kind, "grpc"] = _answered_by(served, before)
                    assert message and expected in message, (kind, message)
                    observed[kind]["grpc", status_code] += 1
    finally:
        client.stop_stream()
        client.close()
    total = sum(sum(c.values()) for c in observed.values())
    print(f"\n[reliability] malformed: {total} requests of {len(KINDS)} kinds; per kind: who answered (observed), "
          "(transport, code) counts:")
    for kind, counts in observed.items():
        answered = {t: w for (k, t), w in who.items() if k == kind}
        print(f"  {kind}: {answered} {dict(counts)}")
    assert total >= 200 and len(KINDS) >= 15
    for kind, (label, http, changes, _) in KINDS.items():
        for transport, sent in (("http", http), ("grpc", changes)):
            if sent is not None:
                assert who[kind, transport] == label, (kind, transport, who[kind, transport])
        if http is not None:  # every round got the same status
            assert observed[kind]["http", http[2]] == ROUNDS, (kind, observed[kind])
        if changes is not None:
            assert sum(n for (t, _), n in observed[kind].items() if t == "grpc") == ROUNDS, (kind, observed[kind])
            assert ("grpc", "ok") not in observed[kind], (kind, observed[kind])
    assert generate(served.grpc, PROMPT, 16, stream=True).text == served.greedy[PROMPT]


# ---- 3. 64 concurrent streams ------------------------------------------------------------------------
def test_sixty_four_concurrent_streams(served: Served) -> None:
    n = 64
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    results: list = [None] * n

    def one(i: int) -> None:
        try:
            results[i] = generate(served.grpc, prompts[i], 16, stream=True, timeout_s=300)
        except Exception as exc:  # recorded, asserted below  # noqa: BLE001
            results[i] = exc

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    peak = 0.0
    while any(t.is_alive() for t in threads):
        peak = max(peak, metrics(served)["tide_queue_depth"])
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    errors = [r for r in results if not hasattr(r, "text")]
    assert not errors, errors[:3]
    wrong = [i for i, r in enumerate(results) if r.text != served.greedy[prompts[i]]]
    assert not wrong, [(prompts[i], results[i].text, served.greedy[prompts[i]]) for i in wrong[:3]]
    print(f"\n[reliability] {n} concurrent streams: all complete with the greedy text in {seconds:.1f} s, "
          f"queue depth peak {peak:.0f} ({SLOTS} slots)")
    assert peak > 0  # the streams really overlapped: some waited for a slot


# ---- 4. 50 mid-stream cancellations ------------------------------------------------------------------
def test_fifty_mid_stream_cancellations(served: Served) -> None:
    """Streams of 128 tokens cancelled (the client's gRPC stream cancelled) after their first token: each is counted
    as cancelled by the server, and frees its slot. Batches of 5 (< SLOTS): none waits in the queue, so all are
    mid-stream when cancelled (a request has not finished at the client when its stream is cancelled)."""
    import tritonclient.grpc as grpcclient

    before = metrics(served)
    mid_stream = 0
    batch = 0
    while mid_stream < 50:
        client = grpcclient.InferenceServerClient(served.grpc)
        events: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error, q=events: q.put((result, error)))
        ids = {f"c{batch}-{i}" for i in range(5)}
        for i, rid in enumerate(sorted(ids)):
            client.async_stream_infer("tide", build_inputs(PROMPTS[i % 4], 128, stream=True), request_id=rid,
                                      enable_empty_final_response=True)  # fmt: skip
        started: set[str] = set()
        finished: set[str] = set()
        while started != ids:
            result, error = events.get(timeout=120)
            assert error is None, error
            response = result.get_response()
            started.add(response.id)
            if response.parameters.get("triton_final_response").bool_param:
                finished.add(response.id)
        client.stop_stream(cancel_requests=True)
        client.close()
        mid_stream += len(ids - finished)
        batch += 1
    m = wait_metrics(served, lambda m: _idle(m) and
                     m["tide_requests_cancelled_total"] >= before["tide_requests_cancelled_total"] + mid_stream)
    counted = m["tide_requests_cancelled_total"] - before["tide_requests_cancelled_total"]
    completed = m["tide_requests_completed_total"] - before["tide_requests_completed_total"]
    print(f"\n[reliability] {mid_stream} streams cancelled mid-stream ({batch} batches of 5); server counted "
          f"{counted:.0f} cancellations, {completed:.0f} completions; slots free {m['tide_free_slots']:.0f}/{SLOTS}")
    assert counted >= mid_stream and _idle(m), m


# ---- 5. after the abuse ------------------------------------------------------------------------------
def test_after_abuse_slots_free_same_answer_metrics_served(served: Served) -> None:
    m = wait_metrics(served, _idle)
    assert _idle(m) and m["tide_max_slots"] == SLOTS, m
    assert generate(served.grpc, PROMPT, 16, stream=True).text == served.greedy[PROMPT]
    m = metrics(served)
    for name in ("tide_requests_completed_total", "tide_requests_cancelled_total", "tide_output_tokens_total"):
        assert m[name] > 0, name
    print(f"\n[reliability] after abuse: free slots {m['tide_free_slots']:.0f}/{SLOTS}, completed "
          f"{m['tide_requests_completed_total']:.0f}, cancelled {m['tide_requests_cancelled_total']:.0f}, "
          f"same greedy answer")


# ---- 6. the trainer killed mid-round -----------------------------------------------------------------
def _trainer(served: Served) -> psutil.Process:
    found = [p for p in _alive(_tree(served.proc.pid)) if " train " in f" {' '.join(p.cmdline())} "]
    assert len(found) == 1, [p.cmdline() for p in _tree(served.proc.pid)]
    return found[0]


def test_trainer_killed_mid_round_serving_unaffected_trainer_restartable(served: Served) -> None:
    trainer = _trainer(served)
    deadline = time.monotonic() + 240
    while "round: training version" not in served.log():  # traffic above gave it signals: wait for a round
        assert trainer.is_running() and time.monotonic() < deadline, served.log()[-3000:]
        generate(served.grpc, PROMPTS[0], 32, stream=True)
    time.sleep(1.0)
    assert "published draft version" not in served.log()  # still inside the round
    os.killpg(trainer.pid, signal.SIGKILL)  # the trainer leads its own process group
    trainer.wait(30)
    assert generate(served.grpc, PROMPT, 16, stream=True).text == served.greedy[PROMPT]
    deadline = time.monotonic() + 30
    while "trainer exited with code -9" not in served.log():
        assert time.monotonic() < deadline, served.log()[-3000:]
        time.sleep(0.2)
    assert served.proc.poll() is None and metrics(served)["tide_free_slots"] == SLOTS
    # restartable: the same stores, one round, a bounded one
    t0 = time.perf_counter()
    again = subprocess.run([*TIDE, "train", "--config", str(served.config), "--once", "--steps-per-round", "4"],
                           capture_output=True, text=True, timeout=600, cwd=served.tmp)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "round: training version" in again.stderr, again.stderr[-3000:]
    assert "training round 1: gain" in again.stderr and "Traceback" not in again.stderr  # trained, gated
    print(f"\n[reliability] trainer SIGKILLed mid-round; serving unaffected; `tide train --once` restarted on the "
          f"same stores and finished a round in {time.perf_counter() - t0:.1f} s")


# ---- 7. SIGTERM with broken client streams -----------------------------------------------------------
_GRPC_CLIENT = """
import sys, time
import tritonclient.grpc as g
from tide_trt.commands.client import build_inputs
c = g.InferenceServerClient(sys.argv[1])
c.start_stream(callback=lambda result, error: print("event", flush=True))
c.async_stream_infer("tide", build_inputs(sys.argv[2], 128, stream=True), request_id="broken")
time.sleep(600)
"""


def test_sigterm_with_broken_client_streams_stops_everything_in_grace(served: Served) -> None:
    _record_greedy(served)  # the reference, also when this test runs alone
    # an HTTP stream reset mid-stream (RST, no FIN) ...
    host, port = served.http.split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    body = json.dumps({"text_input": PROMPTS[1], "max_tokens": 128, "stream": True}).encode()
    sock.sendall(b"POST /v2/models/tide/generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
    got = b""
    while b"data:" not in got:  # headers, then the first event: the stream is running
        chunk = sock.recv(4096)
        assert chunk, got
        got += chunk
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    # the server goes on serving after the reset stream
    assert generate(served.grpc, PROMPT, 16, stream=True, timeout_s=60).text == served.greedy[PROMPT]
    # ... and a gRPC client killed mid-stream
    client = subprocess.Popen([sys.executable, "-c", _GRPC_CLIENT, served.grpc, PROMPTS[2]],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert client.stdout is not None and client.stderr is not None
    ready, _, _ = select.select([client.stdout], [], [], 60)  # bounded: never hang the suite
    if not ready:
        client.kill()
        raise AssertionError(f"the gRPC client got no response in 60 s: {client.stderr.read()[-2000:]}")
    assert client.stdout.readline().startswith("event")
    client.kill()
    client.wait(10)
    members = _tree(served.proc.pid)
    assert any("tritonserver" in " ".join(p.cmdline()) for p in members)
    t0 = time.monotonic()
    served.proc.send_signal(signal.SIGTERM)
    while _alive(members) and time.monotonic() - t0 < 3 * STOP_GRACE_S + 30:
        time.sleep(0.1)
    seconds = time.monotonic() - t0
    left = _alive(members)
    print(f"\n[reliability] SIGTERM with a reset HTTP stream and a killed gRPC client: {len(members)} processes "
          f"gone in {seconds:.1f} s (stop_grace_s {STOP_GRACE_S:.0f}), exit code {served.proc.poll()}")
    assert not left, [p.cmdline() for p in left]
    assert seconds <= STOP_GRACE_S, seconds
    assert served.proc.wait(5) == 0 and "TIDE server stopped" in "".join(served.lines)
