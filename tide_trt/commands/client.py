"""`tide client`: send one prompt to a running TIDE server over tritonclient gRPC (streaming by default).

The helpers here (`build_inputs`, `read_response`) are shared with `benchmarks/loadgen.py` and the tests.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tide_trt.errors import TideError

PERF_FIELDS = ("acceptance_rate", "mean_accepted_len", "total_accepted_draft_tokens", "total_draft_tokens",
               "num_input_tokens", "num_output_tokens")  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="send one prompt to a running TIDE server (gRPC)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--url", default="127.0.0.1:8001", help="gRPC endpoint host:port")
    p.add_argument("--model-name", default="tide")
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="print text as it is generated (--no-stream: one response)",
    )
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop word (repeatable)")
    p.add_argument("--end-id", type=int, default=None)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the whole response")
    p.add_argument("--json", action="store_true", help="print one JSON object (text, timings, perf metrics)")
    p.set_defaults(func=run)


def build_inputs(prompt: str, max_tokens: int, stream: bool = True, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                 stop_words: list[str] | None = None, end_id: int | None = None, perf_metrics: bool = True,
                 chat: bool = True) -> list[Any]:  # fmt: skip
    """tritonclient.grpc InferInputs for the `tide` model (optional inputs only when set)."""
    import tritonclient.grpc as grpcclient

    def tensor(name: str, dtype: str, value: np.ndarray) -> Any:
        t = grpcclient.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        return t

    inputs = [
        tensor("text_input", "BYTES", np.array([prompt.encode("utf-8")], dtype=np.object_)),
        tensor("max_tokens", "INT32", np.array([max_tokens], dtype=np.int32)),
        tensor("stream", "BOOL", np.array([stream], dtype=bool)),
        tensor("return_perf_metrics", "BOOL", np.array([perf_metrics], dtype=bool)),
    ]
    if not chat:
        inputs.append(tensor("apply_chat_template", "BOOL", np.array([False], dtype=bool)))
    optional = (("temperature", "FP32", np.float32, temperature), ("top_p", "FP32", np.float32, top_p),
                ("top_k", "INT32", np.int32, top_k), ("seed", "UINT64", np.uint64, seed),
                ("end_id", "INT32", np.int32, end_id))  # fmt: skip
    for name, wire, dtype, value in optional:
        if value is not None:
            inputs.append(tensor(name, wire, np.array([value], dtype=dtype)))
    if stop_words:
        inputs.append(tensor("stop_words", "BYTES", np.array([w.encode() for w in stop_words], dtype=np.object_)))
    return inputs


def read_response(result: Any) -> tuple[str, bool, dict[str, Any]]:
    """(text delta or whole text, is final, perf metrics + finish_reason present in this response)."""
    response = result.get_response()
    final = bool(response.parameters["triton_final_response"].bool_param) if response.parameters else False
    text_arr = result.as_numpy("text_output")
    text = text_arr.reshape(-1)[0].decode("utf-8") if text_arr is not None else ""
    perf: dict[str, Any] = {}
    for name in PERF_FIELDS:
        arr = result.as_numpy(name)
        if arr is not None:
            perf[name] = arr.reshape(-1)[0].item()
    reason = result.as_numpy("finish_reason")
    if reason is not None:
        perf["finish_reason"] = reason.reshape(-1)[0].decode()
    return text, final, perf


@dataclass
class ClientResult:
    text: str = ""
    ttft_s: float | None = None
    seconds: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each non-empty text response
    perf: dict[str, Any] = field(default_factory=dict)


def generate(url: str, prompt: str, max_tokens: int, model: str = "tide", timeout_s: float = 600.0,
             on_text: Any = None, **options: Any) -> ClientResult:  # fmt: skip
    """One request over a gRPC stream; `on_text(delta)` is called as text arrives. TideError on failure."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    events: queue.Queue = queue.Queue()
    try:
        client = grpcclient.InferenceServerClient(url)
        client.start_stream(callback=lambda result, error: events.put((time.perf_counter(), result, error)))
    except InferenceServerException as exc:
        raise TideError(f"cannot connect to {url}: {exc.message()}") from None
    out = ClientResult()
    t0 = time.perf_counter()
    complete = False
    try:
        try:
            client.async_stream_infer(
                model,
                build_inputs(prompt, max_tokens, **options),
                request_id=uuid.uuid4().hex[:12],
                enable_empty_final_response=True,
            )
        except InferenceServerException as exc:
            detail = events.get(timeout=5)[2] if not events.empty() else exc
            raise TideError(f"cannot send to {url}: {_message(detail)}") from None
        while True:
            try:
                t, result, error = events.get(timeout=max(0.0, t0 + timeout_s - time.perf_counter()))
            except queue.Empty:
                raise TideError(f"no complete response within {timeout_s:.0f} s") from None
            if error is not None:
                raise TideError(f"server error: {_message(error)}")
            text, final, perf = read_response(result)
            out.perf.update(perf)
            if text:
                out.ttft_s = t - t0 if out.ttft_s is None else out.ttft_s
                out.chunk_times.append(t - t0)
                out.text += text
                if on_text is not None:
                    on_text(text)
            if final:
                out.seconds = t - t0
                complete = True
                return out
    finally:
        # cancel only an unfinished request (Ctrl-C, timeout, error): cancelling a stream whose request
        # has completed can leave tritonserver 2.51 unable to unload the model at shutdown
        client.stop_stream(cancel_requests=not complete)
        client.close()


def _message(error: Any) -> str:
    return error.message() if hasattr(error, "message") else str(error)


def run(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        raise TideError("--max-tokens must be >= 1")
    options = dict(
        stream=args.stream,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop_words=args.stop,
        end_id=args.end_id,
        chat=not args.raw,
    )

    def echo(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    on_text = echo if args.stream and not args.json else None
    result = generate(args.url, args.prompt, args.max_tokens, args.model_name, args.timeout, on_text, **options)
    if args.json:
        n_out = result.perf.get("num_output_tokens", 0)
        print(json.dumps({
            "text": result.text, "ttft_s": result.ttft_s, "seconds": result.seconds,
            "tokens_per_s": n_out / result.seconds if result.seconds else 0.0, **result.perf,
        }))  # fmt: skip
    elif args.stream:
        sys.stdout.write("\n")
    else:
        print(result.text)
    return 0
