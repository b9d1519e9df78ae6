"""Serving without Triton: request validation, stop words, stats/metrics, and the continuous-batching
scheduler over a tiny random Llama (character tokenizer) — same code path the Triton model uses."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from tests.oracle_draft import SCHEDULER_PROMPTS, char_ids
from tide_trt.config import EngineConfig, config_from_dict
from tide_trt.engine.generator import SequenceState, SpeculativeGenerator, StepEvent
from tide_trt.engine.hooks import PassiveStepPlugin, StaticGamma
from tide_trt.errors import RequestError
from tide_trt.serving.metrics import TritonMetrics
from tide_trt.serving.requests import (
    ParsedRequest,
    RequestLimits,
    StopWordFilter,
    check_prompt_length,
    parse_request,
)
from tide_trt.serving.scheduler import ServerBusy
from tide_trt.serving.service import CollectingSink, TideService
from tide_trt.serving.stats import ServingStats, metric_name
from tide_trt.spec.sampling import SamplingParams

LIMITS = RequestLimits(max_tokens_limit=64, vocab_size=96, max_seq_len=128)


def b(text: str) -> np.ndarray:
    return np.array([text.encode()], dtype=np.object_)


def i32(v: int) -> np.ndarray:
    return np.array([v], dtype=np.int32)


def f32(v: float) -> np.ndarray:
    return np.array([v], dtype=np.float32)


BASE = {"text_input": b("hello"), "max_tokens": i32(8)}


# ---- request validation ------------------------------------------------------------------------
def test_parse_defaults_and_fields() -> None:
    p = parse_request(BASE, LIMITS)
    assert p == ParsedRequest(text="hello", max_tokens=8)
    p = parse_request({**BASE, "stream": np.array([True]), "temperature": f32(0.7), "top_p": f32(0.9),
                       "top_k": i32(5), "seed": np.array([2**63 + 5], dtype=np.uint64),
                       "stop_words": np.array([b"\n\n", b"", b"END"], dtype=np.object_), "end_id": i32(7),
                       "return_perf_metrics": np.array([True]), "apply_chat_template": np.array([False])},
                      LIMITS)  # fmt: skip
    assert p.stream and p.return_perf_metrics and not p.apply_chat_template
    assert p.sampling == SamplingParams(
        temperature=pytest.approx(0.7), top_p=pytest.approx(0.9), top_k=5, seed=2**63 + 5
    )
    assert p.stop_words == ("\n\n", "END") and p.end_id == 7
    assert parse_request({**BASE, "seed": np.array([3], dtype=np.int64)}, LIMITS).sampling.seed == 3


BAD = [
    ({"text_input": None}, "text_input is required"),
    ({"text_input": b("   ")}, "text_input is empty"),
    ({"text_input": np.array([b"ab\xff\xfe"], dtype=np.object_)}, "text_input is not valid UTF-8"),
    ({"text_input": np.array([b"a", b"b"], dtype=np.object_)}, r"text_input must hold exactly one value"),
    ({"text_input": np.array([1], dtype=np.int32)}, "text_input must be BYTES"),
    ({"max_tokens": None}, "max_tokens is required"),
    ({"max_tokens": i32(0)}, r"max_tokens must be in \[1, 64\]"),
    ({"max_tokens": i32(-3)}, r"max_tokens must be in \[1, 64\]"),
    ({"max_tokens": i32(65)}, r"max_tokens must be in \[1, 64\]"),
    ({"max_tokens": f32(8)}, "max_tokens must be INT32, got float32"),
    ({"max_tokens": np.array([8, 8], dtype=np.int32)}, r"max_tokens must hold exactly one value .* \[2\]"),
    ({"temperature": f32(-0.5)}, "temperature must be >= 0"),
    ({"temperature": f32(float("nan"))}, "temperature must be a finite number"),
    ({"temperature": i32(1)}, "temperature must be FP32"),
    ({"top_p": f32(0.0)}, r"top_p must be in \(0, 1\]"),
    ({"top_p": f32(1.5)}, r"top_p must be in \(0, 1\]"),
    ({"top_k": i32(-1)}, "top_k must be >= 0"),
    ({"seed": np.array([-1], dtype=np.int64)}, "seed must be in"),
    ({"seed": f32(1)}, "seed must be UINT64"),
    ({"end_id": i32(96)}, r"end_id must be a token id in \[0, 96\)"),
    ({"stream": i32(1)}, "stream must be BOOL"),
    ({"stop_words": i32(1)}, "stop_words must be BYTES"),
    ({"stop_words": np.array([b"\xff"], dtype=np.object_)}, "stop_words is not valid UTF-8"),
    ({"bogus": i32(1)}, r"unknown input\(s\) \['bogus'\]"),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[m for _, m in BAD])
def test_parse_errors_name_the_field(change: dict, message: str) -> None:
    inputs = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    with pytest.raises(RequestError, match=message):
        parse_request(inputs, LIMITS)


def test_prompt_length_limit() -> None:
    check_prompt_length(127, LIMITS)
    with pytest.raises(RequestError, match="text_input is too long: 128 prompt tokens"):
        check_prompt_length(128, LIMITS)


# ---- stop words --------------------------------------------------------------------------------
def test_stop_word_cut_across_deltas_and_holdback() -> None:
    f = StopWordFilter(["STOP", "\n\n"])
    assert f.feed("Hello S", False) == ("Hello ", False)  # "S" could start "STOP": held back
    assert f.feed("T", False) == ("", False)
    assert f.feed("Ox", False) == ("STOx", False)  # not a stop word after all: released
    assert f.feed(" ok\n", False) == (" ok", False)
    assert f.feed("\nrest", False) == ("", True)
    assert f.feed("more", True) == ("", True)


def test_stop_word_inside_one_delta_and_final_flush() -> None:
    f = StopWordFilter(["END"])
    assert f.feed("abc END def", False) == ("abc ", True)
    g = StopWordFilter(["END"])
    assert g.feed("abc EN", False) == ("abc ", False)
    assert g.feed("", True) == ("EN", False)  # end of generation: held text is released
    assert StopWordFilter([]).feed("x", False) == ("x", False)


# ---- stats and metrics -------------------------------------------------------------------------
def test_stats_snapshot_window_and_plugin_names() -> None:
    s = ServingStats(window_steps=2)
    s.record_step(3, 0.1, 2, draft=6, accepted=3, output=5, seq_steps=2)
    s.record_step(3, 0.1, 2, draft=6, accepted=6, output=8, seq_steps=2)
    s.record_step(3, 0.1, 2, draft=6, accepted=0, output=2, seq_steps=2)  # window keeps the last two
    snap = s.snapshot({"signals.captured": 7, "gamma": 5})
    assert snap["tide_accepted_per_drafted"] == pytest.approx(6 / 12)
    assert snap["tide_mean_accepted_len"] == pytest.approx(10 / 4)
    assert snap["tide_draft_tokens_total"] == 18 and snap["tide_engine_steps_total"] == 3
    assert snap["tide_signals_captured"] == 7 and snap["tide_plugin_gamma"] == 5 and snap["tide_gamma"] == 3
    assert metric_name("refits accepted") == "tide_refits_accepted" == metric_name("tide_refits_accepted")


class _FakeMetric:
    def __init__(self) -> None:
        self.value = 0.0

    def increment(self, v: float) -> None:
        self.value += v

    def set(self, v: float) -> None:
        self.value = v


class _FakeFamily:
    COUNTER, GAUGE = "counter", "gauge"
    made: dict[str, tuple[str, _FakeMetric]] = {}

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name, self.kind = name, kind

    def Metric(self, labels: dict) -> _FakeMetric:  # noqa: N802 (pb_utils API)
        m = _FakeMetric()
        _FakeFamily.made[self.name] = (self.kind, m)
        return m


class _FakePb:
    MetricFamily = _FakeFamily


def test_triton_metrics_counters_and_gauges() -> None:
    pub = TritonMetrics(_FakePb(), {"model": "tide"})
    pub({"tide_output_tokens_total": 5, "tide_gamma": 3, "tide_refits_total": 2})
    pub({"tide_output_tokens_total": 12, "tide_gamma": 0, "tide_refits_total": 1})  # counter never goes down
    made = _FakeFamily.made
    assert made["tide_output_tokens_total"][0] == "counter" and made["tide_output_tokens_total"][1].value == 12
    assert made["tide_gamma"] == ("gauge", made["tide_gamma"][1]) and made["tide_gamma"][1].value == 0
    assert made["tide_refits_total"][1].value == 2


# ---- the scheduler over a tiny engine ----------------------------------------------------------
class CharTokenizer:
    """ids 3..95 <-> characters chr(32..124); 0..2 are specials (2 = EOS of the tiny model)."""

    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return char_ids(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(32 + i - 3) if i >= 3 else ("" if skip_special_tokens else f"<{i}>") for i in ids)


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir: Path) -> Path:
    """The session's tiny random Llama (seed 0): the target the oracle draft (`tiny_oracle`) memorised."""
    return tiny_model_dir


def make_generator(tiny_dir: Path, slots: int, draft: Path | None = None) -> SpeculativeGenerator:
    """The tiny engine (character tokenizer); `draft`: a draft checkpoint, loaded as the server loads one."""
    from tide_trt.engine.torch_engine import TorchTargetEngine
    from tide_trt.models.loader import load_checkpoint
    from tide_trt.runtime import build_drafter

    cfg = EngineConfig(dtype="float32", max_batch_size=slots, max_seq_len=128, num_threads=1)
    engine = TorchTargetEngine(load_checkpoint(str(tiny_dir), ""), cfg, tokenizer=CharTokenizer())
    drafter = build_drafter(engine, draft) if draft is not None else None
    return SpeculativeGenerator(engine, drafter)


def make_service(tiny_dir: Path, slots: int = 2, max_queue: int = 8, draft: Path | None = None,
                 plugins: Sequence = (), gamma: int = 0) -> TideService:  # fmt: skip
    cfg = config_from_dict({"serving": {"max_queue": max_queue, "max_tokens_limit": 64, "metrics_interval_s": 0.01}})
    gen = make_generator(tiny_dir, slots, draft)
    return TideService(cfg, gen, StaticGamma(gamma), list(plugins)).start()


def reference(tiny_dir: Path, prompt: str, max_tokens: int) -> tuple[str, list[int]]:
    """Plain greedy decoding, the engine run directly (SpeculativeGenerator without a draft, one request alone)."""
    from tide_trt.runtime import make_request, run_to_completion

    gen = make_generator(tiny_dir, 1)
    tok = CharTokenizer()
    req = make_request("ref", tok.encode(prompt), max_tokens, SamplingParams(), gen.engine.info.eos_token_ids)
    seq = run_to_completion(gen, [req], 0).sequences[0]
    ids = [t for t in seq.output_ids if t not in gen.engine.info.eos_token_ids]
    return tok.decode(ids), seq.output_ids


def run_all(service: TideService, requests: list[ParsedRequest], timeout: float = 60) -> list[CollectingSink]:
    sinks = [CollectingSink() for _ in requests]
    for r, s in zip(requests, sinks, strict=True):
        service.submit(r, s)
    for s in sinks:
        assert s.done.wait(timeout), "request did not finish"
    return sinks


def wait_idle(service: TideService, timeout: float = 10) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap = service.snapshot()
        if snap["tide_active_sequences"] == 0 and snap["tide_free_slots"] == snap["tide_max_slots"]:
            return snap
        time.sleep(0.02)
    raise AssertionError(f"not idle: {service.snapshot()}")


PROMPTS = SCHEDULER_PROMPTS  # the oracle draft (`tiny_oracle`) memorised their greedy continuations


def test_continuous_batching_matches_engine(tiny_dir: Path) -> None:
    svc = make_service(tiny_dir, slots=2)
    try:
        reqs = [ParsedRequest(p, 6 + i, stream=i % 2 == 0) for i, p in enumerate(PROMPTS)]
        sinks = run_all(svc, reqs)
        for r, s in zip(reqs, sinks, strict=True):
            assert s.error is None and s.text == reference(tiny_dir, r.text, r.max_tokens)[0]
            assert s.chunks[-1][1].final and sum(c.final for _, c in s.chunks) == 1
        assert len(sinks[0].chunks) > 1 and len(sinks[1].chunks) == 1  # streaming vs one response
        snap = wait_idle(svc)
        assert snap["tide_requests_completed_total"] == len(PROMPTS) and snap["tide_queue_depth"] == 0
    finally:
        svc.stop()


class AcceptanceRecorder(PassiveStepPlugin):
    """Step plugin: what verification reported per request (StepEvent.num_draft / num_accepted, decode rows)."""

    def __init__(self) -> None:
        self.draft: dict[str, int] = defaultdict(int)
        self.accepted: dict[str, int] = defaultdict(int)
        self.new_tokens: dict[str, int] = defaultdict(int)  # tokens committed by verification steps
        self.steps: dict[str, int] = defaultdict(int)  # verification steps

    def after_step(self, generator: SpeculativeGenerator, gamma: int, events: Sequence[StepEvent],
                   seconds: float) -> None:  # fmt: skip
        for ev in events:
            if not ev.is_prefill:
                self.draft[ev.request_id] += ev.num_draft
                self.accepted[ev.request_id] += ev.num_accepted
                self.new_tokens[ev.request_id] += len(ev.new_token_ids)
                self.steps[ev.request_id] += 1


def test_speculative_path_is_lossless_and_reports_perf(tiny_dir: Path, tiny_oracle) -> None:
    """The oracle draft (the target's own greedy continuations of PROMPTS) through the scheduler: two slots,
    six requests joining mid-flight, γ = 3. Drafts must really be accepted (multi-token commits on every
    serving path: streamed deltas, perf metrics, server stats) and the text must equal plain decoding."""
    recorder = AcceptanceRecorder()
    svc = make_service(tiny_dir, slots=2, draft=tiny_oracle.path, gamma=3, plugins=[recorder])
    try:
        reqs = [ParsedRequest(p, 10, stream=i % 2 == 0, return_perf_metrics=True) for i, p in enumerate(PROMPTS)]
        sinks = run_all(svc, reqs)
        for r, s in zip(reqs, sinks, strict=True):
            text, ids = reference(tiny_dir, r.text, r.max_tokens)
            assert s.error is None and s.text == text  # greedy speculative == plain decoding
            perf = s.chunks[-1][1].perf
            assert perf is not None and perf.num_output_tokens == len(ids) and perf.num_input_tokens == len(r.text)
            assert perf.mean_accepted_len > 1.5 and perf.total_accepted_draft_tokens > 0, (r.text, perf)
            assert 0.5 < perf.acceptance_rate <= 1.0
            if r.stream:  # several tokens arrived in one streamed delta: fewer chunks than tokens
                assert 1 < len(s.chunks) < len(ids), (r.text, len(s.chunks), len(ids))
        perfs = [s.chunks[-1][1].perf for s in sinks]
        # what the step plugin saw (StepEvent) is what the requests reported
        assert sum(p.total_accepted_draft_tokens for p in perfs) == sum(recorder.accepted.values())
        assert sum(p.total_draft_tokens for p in perfs) == sum(recorder.draft.values())
        assert sum(p.num_output_tokens - 1 for p in perfs) == sum(recorder.new_tokens.values())
        assert sum(recorder.new_tokens.values()) / sum(recorder.steps.values()) > 1.5  # τ from the events
        snap = wait_idle(svc)
        assert snap["tide_draft_tokens_total"] > 0 and snap["tide_gamma"] == 3
        assert snap["tide_accepted_draft_tokens_total"] == sum(recorder.accepted.values()) > 0
        assert snap["tide_mean_accepted_len"] > 1.5 and snap["tide_accepted_per_drafted"] > 0.5, snap
    finally:
        svc.stop()


def test_stop_word_and_end_id(tiny_dir: Path) -> None:
    text, ids = reference(tiny_dir, "hello world", 12)
    svc = make_service(tiny_dir)
    try:
        stop = text[4:6]
        end_id = ids[5]
        reqs = [ParsedRequest("hello world", 12, stream=True, stop_words=(stop,)),
                ParsedRequest("hello world", 12, end_id=end_id, return_perf_metrics=True)]  # fmt: skip
        s_stop, s_end = run_all(svc, reqs)
        assert s_stop.text == text[: text.find(stop)] and s_stop.chunks[-1][1].finish_reason == "stop"
        first = ids.index(end_id)
        assert s_end.text == CharTokenizer().decode(ids[:first])
        assert s_end.chunks[-1][1].perf.num_output_tokens == first + 1
        wait_idle(svc)
    finally:
        svc.stop()


def test_cancel_frees_slot_and_queue_limit(tiny_dir: Path) -> None:
    svc = make_service(tiny_dir, slots=1, max_queue=1)
    try:
        long = ParsedRequest("cancel me", 64, stream=True)
        first, queued = CollectingSink(), CollectingSink()
        svc.submit(long, first)
        svc.submit(long, queued)  # waits for the single slot
        with pytest.raises(ServerBusy, match=r"server busy: .*serving.max_queue=1"):
            svc.submit(long, CollectingSink())
        while not first.chunks:
            time.sleep(0.005)
        first.cancelled = True
        queued.cancelled = True
        assert first.done.wait(10) and first.closed and queued.done.wait(10) and queued.closed
        snap = wait_idle(svc)
        assert snap["tide_requests_cancelled_total"] == 2 and snap["tide_requests_busy_total"] == 1
        (after,) = run_all(svc, [ParsedRequest("abc", 5)])
        assert after.text == reference(tiny_dir, "abc", 5)[0]
    finally:
        svc.stop()


class BrokenSink(CollectingSink):
    def send(self, chunk) -> None:
        raise RuntimeError("client vanished")


class RecordingPlugin:
    def __init__(self) -> None:
        self.before = self.after = 0
        self.finished: list[str] = []

    def before_step(self, generator: SpeculativeGenerator) -> None:
        self.before += 1

    def after_step(self, generator: SpeculativeGenerator, gamma: int, events: Sequence[StepEvent],
                   seconds: float) -> None:  # fmt: skip
        self.after += 1

    def on_finish(self, seq: SequenceState) -> None:
        self.finished.append(seq.finish_reason or "")

    def metrics(self) -> dict[str, float]:
        return {"signals_captured": float(self.after), "refits_accepted": 1.0}


def test_failures_stay_local_and_plugins_see_everything(tiny_dir: Path) -> None:
    plugin = RecordingPlugin()
    svc = make_service(tiny_dir, slots=2, plugins=[plugin])
    try:
        broken, ok = BrokenSink(), CollectingSink()
        svc.submit(ParsedRequest("abc", 6, stream=True), broken)
        svc.submit(ParsedRequest("hello world", 6), ok)
        assert ok.done.wait(30) and ok.text == reference(tiny_dir, "hello world", 6)[0]
        real_step = svc.generator.step
        calls = {"n": 0}

        def flaky_step(drafting):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("simulated engine fault")
            return real_step(drafting)

        svc.generator.step = flaky_step  # type: ignore[method-assign]
        (failed,) = run_all(svc, [ParsedRequest("zz", 4)])
        assert failed.error is not None and "simulated engine fault" in failed.error
        (again,) = run_all(svc, [ParsedRequest("zz", 4)])
        assert again.error is None and again.text == reference(tiny_dir, "zz", 4)[0]
        snap = wait_idle(svc)
        assert snap["tide_signals_captured"] > 0 and snap["tide_refits_accepted"] == 1.0
        assert snap["tide_requests_failed_total"] == 1 and snap["tide_requests_cancelled_total"] == 1
        assert plugin.before >= plugin.after > 0 and sorted(set(plugin.finished)) == [
            "cancelled",
            "error",
            "length",
        ]
    finally:
        svc.stop()


def test_submit_validates_prompt_and_stop_aborts(tiny_dir: Path) -> None:
    svc = make_service(tiny_dir, slots=1)
    try:
        with pytest.raises(RequestError, match="text_input is too long"):
            svc.submit(ParsedRequest("x" * 200, 4), CollectingSink())
        assert svc.snapshot()["tide_requests_rejected_total"] == 1
        sinks = [CollectingSink() for _ in range(3)]
        for s in sinks:
            svc.submit(ParsedRequest("long one", 64, stream=True), s)
    finally:
        t = threading.Thread(target=svc.stop)
        t.start()
        t.join(30)
    assert not t.is_alive()
    assert all(s.done.is_set() for s in sinks) and any(s.error == "server is shutting down" for s in sinks)


def test_triton_model_config_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tide_trt.serving.triton_model import resolve_config

    model_config = {"parameters": {"tide_config": {"string_value": "cfg.yaml"}}}
    monkeypatch.delenv("TIDE_CONFIG", raising=False)
    assert resolve_config(model_config, str(tmp_path)) == tmp_path / "cfg.yaml"  # relative to the model dir
    monkeypatch.setenv("TIDE_CONFIG", "/etc/tide.yaml")  # `tide serve` sets it: wins over the parameter
    assert resolve_config(model_config, str(tmp_path)) == Path("/etc/tide.yaml")
    monkeypatch.delenv("TIDE_CONFIG")
    assert resolve_config({}, str(tmp_path)) is None  # built-in defaults
