"""Closed-loop load generator: replay a workload at a fixed concurrency, streaming, and report
throughput (output tokens/s), TTFT, inter-token latency, τ and acceptance (from the perf metrics).

Two transports share the same request list and report format:
  * gRPC streaming against a running TIDE Triton server (`run_grpc`), one bidirectional stream;
  * in-process through the same scheduler (`run_inprocess` on a TideService), for overhead comparisons.

    python benchmarks/loadgen.py --url 127.0.0.1:8001 --workload sharegpt --num-requests 32 \
        --concurrency 8 --max-tokens 64 --out runs/loadgen.json
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("loadgen")


@dataclass
class Record:
    """One request as the client saw it (times in seconds since the run started)."""

    index: int
    submitted: float = 0.0
    chunks: list[float] = field(default_factory=list)  # arrival of each non-empty text response
    finished: float = 0.0
    text: str = ""
    perf: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def load_prompts(workload: str, n: int, seed: int = 0) -> list[str]:
    from tide_trt import workloads

    if workload == "sharegpt":
        return workloads.sharegpt_prompts(n, seed=seed)
    if workload == "humaneval":
        prompts = workloads.humaneval_prompts()
        return [prompts[i % len(prompts)] for i in range(n)]
    raise SystemExit(f"unknown workload {workload!r} (sharegpt | humaneval)")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(records: list[Record], wall_s: float) -> dict[str, Any]:
    ok = [r for r in records if r.error is None]
    out_tokens = sum(int(r.perf.get("num_output_tokens", 0)) for r in ok)
    ttft = [r.chunks[0] - r.submitted for r in ok if r.chunks]
    itl = [
        (r.finished - r.chunks[0]) / (int(r.perf["num_output_tokens"]) - 1)
        for r in ok
        if r.chunks and int(r.perf.get("num_output_tokens", 0)) > 1
    ]
    gaps = [b - a for r in ok for a, b in zip(r.chunks, r.chunks[1:], strict=False)]
    draft = sum(int(r.perf.get("total_draft_tokens", 0)) for r in ok)
    accepted = sum(int(r.perf.get("total_accepted_draft_tokens", 0)) for r in ok)
    steps = sum(
        (int(r.perf["num_output_tokens"]) - 1) / r.perf["mean_accepted_len"]
        for r in ok
        if r.perf.get("mean_accepted_len") and int(r.perf.get("num_output_tokens", 0)) > 1
    )
    decode_tokens = sum(max(0, int(r.perf.get("num_output_tokens", 0)) - 1) for r in ok)
    return {
        "requests": len(records), "errors": len(records) - len(ok), "wall_s": wall_s,
        "output_tokens": out_tokens, "throughput_tok_s": out_tokens / wall_s if wall_s else 0.0,
        "requests_per_s": len(ok) / wall_s if wall_s else 0.0,
        "ttft_mean_s": statistics.fmean(ttft) if ttft else 0.0, "ttft_p50_s": _pct(ttft, 0.5),
        "ttft_p90_s": _pct(ttft, 0.9), "itl_mean_s": statistics.fmean(itl) if itl else 0.0,
        "itl_p50_s": _pct(itl, 0.5), "chunk_gap_p90_s": _pct(gaps, 0.9),
        "tau": decode_tokens / steps if steps else 1.0,
        "acceptance_rate": accepted / draft if draft else 0.0,
        "first_errors": [r.error for r in records if r.error][:3],
    }  # fmt: skip


def run_grpc(url: str, prompts: list[str], concurrency: int, max_tokens: int, model: str = "tide",
             timeout_s: float = 1800.0, **options: Any) -> tuple[list[Record], float]:  # fmt: skip
    """Closed loop over one gRPC bidirectional stream: `concurrency` requests in flight at any time."""
    import tritonclient.grpc as grpcclient

    from tide_trt.commands.client import build_inputs, read_response

    events: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: events.put((time.perf_counter(), result, error)))
    records = [Record(i) for i in range(len(prompts))]
    t0 = time.perf_counter()
    sent = done = 0

    def send() -> None:
        nonlocal sent
        rec = records[sent]
        rec.submitted = time.perf_counter() - t0
        inputs = build_inputs(prompts[sent], max_tokens, stream=True, perf_metrics=True, **options)
        client.async_stream_infer(model, inputs, request_id=str(sent), enable_empty_final_response=True)
        sent += 1

    try:
        while sent < min(concurrency, len(prompts)):
            send()
        while done < len(prompts):
            t, result, error = events.get(timeout=timeout_s)
            if error is not None:  # errors carry no request id on the stream: charge the oldest open one
                rec = next(r for r in records[:sent] if not r.finished and r.error is None)
                rec.error, rec.finished = str(error), t - t0
            else:
                rec = records[int(result.get_response().id)]
                text, final, perf = read_response(result)
                rec.perf.update(perf)
                if text:
                    rec.chunks.append(t - t0)
                    rec.text += text
                if not final:
                    continue
                rec.finished = t - t0
            done += 1
            if sent < len(prompts):
                send()
    finally:
        client.stop_stream()
        client.close()
    return records, time.perf_counter() - t0


class _TimedSink:
    """In-process sink recording arrival times like the gRPC client does."""

    def __init__(self, rec: Record, t0: float, done: queue.Queue) -> None:
        self.rec, self.t0, self.done = rec, t0, done

    def send(self, chunk: Any) -> None:
        t = time.perf_counter() - self.t0
        if chunk.text:
            self.rec.chunks.append(t)
            self.rec.text += chunk.text
        if chunk.perf is not None:
            self.rec.perf.update(asdict(chunk.perf), finish_reason=chunk.finish_reason)
        if chunk.final:
            self.rec.finished = t
            self.done.put(self.rec.index)

    def fail(self, message: str) -> None:
        self.rec.error, self.rec.finished = message, time.perf_counter() - self.t0
        self.done.put(self.rec.index)

    def close(self) -> None:
        self.fail("closed")

    def is_cancelled(self) -> bool:
        return False


def run_inprocess(service: Any, prompts: list[str], concurrency: int, max_tokens: int,
                  **options: Any) -> tuple[list[Record], float]:  # fmt: skip
    """The same closed loop through `TideService.submit` (the scheduler Triton uses), no server."""
    from tide_trt.serving.requests import ParsedRequest
    from tide_trt.spec.sampling import SamplingParams

    sampling = SamplingParams(temperature=options.get("temperature") or 0.0)
    done: queue.Queue = queue.Queue()
    records = [Record(i) for i in range(len(prompts))]
    t0 = time.perf_counter()
    sent = finished = 0

    def send() -> None:
        nonlocal sent
        rec = records[sent]
        rec.submitted = time.perf_counter() - t0
        req = ParsedRequest(prompts[sent], max_tokens, stream=True, sampling=sampling, return_perf_metrics=True)
        service.submit(req, _TimedSink(rec, t0, done))
        sent += 1

    while sent < min(concurrency, len(prompts)):
        send()
    while finished < len(prompts):
        done.get(timeout=1800)
        finished += 1
        if sent < len(prompts):
            send()
    return records, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="127.0.0.1:8001", help="gRPC endpoint of a running `tide serve`")
    p.add_argument("--model-name", default="tide")
    p.add_argument("--workload", choices=["sharegpt", "humaneval"], default="sharegpt")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="workload sample seed")
    p.add_argument("--out", help="write the JSON report here (also printed)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prompts = load_prompts(args.workload, args.num_requests, args.seed)
    records, wall = run_grpc(args.url, prompts, args.concurrency, args.max_tokens, args.model_name,
                             temperature=args.temperature)  # fmt: skip
    report = {"workload": args.workload, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
              "url": args.url, **summarize(records, wall)}  # fmt: skip
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
