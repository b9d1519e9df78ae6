"""Request parsing and validation for the `tide` Triton model (pure: numpy in, dataclass out, no Triton).

Inputs follow Triton's TensorRT-LLM backend ensemble (names, dtypes, shapes with ``max_batch_size: 0``):

| input                 | dtype  | shape | default | meaning                                               |
|-----------------------|--------|-------|---------|-------------------------------------------------------|
| `text_input`          | BYTES  | [1]   | —       | prompt, UTF-8 (required, not blank)                   |
| `max_tokens`          | INT32  | [1]   | —       | output tokens, 1..serving.max_tokens_limit (required) |
| `stream`              | BOOL   | [1]   | false   | true: a response per text delta; false: one response  |
| `temperature`         | FP32   | [1]   | 0.0     | >= 0, 0 = greedy                                      |
| `top_p`               | FP32   | [1]   | 1.0     | (0, 1]                                                |
| `top_k`               | INT32  | [1]   | 0       | >= 0, 0 = disabled                                    |
| `seed`                | UINT64 | [1]   | random  | per-request seed (INT64 accepted in-process)          |
| `stop_words`          | BYTES  | [-1]  | none    | stop when the text contains one (text cut there)      |
| `end_id`              | INT32  | [1]   | EOS     | token id that ends generation, replaces the EOS       |
| `return_perf_metrics` | BOOL   | [1]   | false   | add per-request speculation counters to responses     |
| `apply_chat_template` | BOOL   | [1]   | true    | wrap the prompt as one user turn of the chat template |

Every problem raises `RequestError` with a message that names the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np

from tide_trt.errors import RequestError
from tide_trt.spec.sampling import SamplingParams

MAX_STOP_WORDS = 16
MAX_STOP_WORD_CHARS = 256
MAX_PROMPT_BYTES = 1 << 20
_MAX_SEED = 2**64 - 1

INPUT_NAMES = (
    "text_input", "max_tokens", "stream", "temperature", "top_p", "top_k", "seed", "stop_words", "end_id",
    "return_perf_metrics", "apply_chat_template",
)  # fmt: skip


@dataclass(frozen=True)
class RequestLimits:
    max_tokens_limit: int
    vocab_size: int
    max_seq_len: int


@dataclass(frozen=True)
class ParsedRequest:
    """A validated generation request (no tensors)."""

    text: str
    max_tokens: int
    stream: bool = False
    sampling: SamplingParams = SamplingParams()
    stop_words: tuple[str, ...] = ()
    end_id: int | None = None
    return_perf_metrics: bool = False
    apply_chat_template: bool = True


def parse_request(inputs: Mapping[str, np.ndarray | None], limits: RequestLimits) -> ParsedRequest:
    """Validate raw input arrays (as Triton hands them over) into a ParsedRequest."""
    unknown = sorted(k for k, v in inputs.items() if v is not None and k not in INPUT_NAMES)
    if unknown:
        raise RequestError(f"unknown input(s) {unknown}; known: {list(INPUT_NAMES)}")
    text = _text_input(inputs.get("text_input"))
    max_tokens = _int(inputs, "max_tokens", None, "INT32", signed=True)
    if max_tokens is None:
        raise RequestError("max_tokens is required (INT32 [1])")
    if not 1 <= max_tokens <= limits.max_tokens_limit:
        raise RequestError(
            f"max_tokens must be in [1, {limits.max_tokens_limit}] (serving.max_tokens_limit), got {max_tokens}"
        )
    temperature = _float(inputs, "temperature", 0.0)
    if temperature < 0:
        raise RequestError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    top_p = _float(inputs, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {top_p}")
    top_k = _int(inputs, "top_k", 0, "INT32", signed=True)
    if top_k < 0:
        raise RequestError(f"top_k must be >= 0 (0 = disabled), got {top_k}")
    seed = _int(inputs, "seed", None, "UINT64", signed=None)
    if seed is not None and not 0 <= seed <= _MAX_SEED:
        raise RequestError(f"seed must be in [0, 2**64 - 1], got {seed}")
    end_id = _int(inputs, "end_id", None, "INT32", signed=True)
    if end_id is not None and not 0 <= end_id < limits.vocab_size:
        raise RequestError(f"end_id must be a token id in [0, {limits.vocab_size}), got {end_id}")
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    sampling.validate()
    return ParsedRequest(
        text=text, max_tokens=max_tokens, stream=_bool(inputs, "stream", False), sampling=sampling,
        stop_words=_stop_words(inputs.get("stop_words")), end_id=end_id,
        return_perf_metrics=_bool(inputs, "return_perf_metrics", False),
        apply_chat_template=_bool(inputs, "apply_chat_template", True),
    )  # fmt: skip


def check_prompt_length(num_prompt_tokens: int, limits: RequestLimits) -> None:
    """The prompt must leave room for at least one generated token in the context."""
    if num_prompt_tokens + 1 > limits.max_seq_len:
        raise RequestError(
            f"text_input is too long: {num_prompt_tokens} prompt tokens (chat template included) but the "
            f"context holds {limits.max_seq_len} (engine.max_seq_len), leaving no room to generate"
        )


# ---- field helpers -----------------------------------------------------------------------------
def _one(arr: np.ndarray, name: str) -> Any:
    if not isinstance(arr, np.ndarray):
        raise RequestError(f"{name} must be a tensor, got {type(arr).__name__}")
    if arr.size != 1:
        raise RequestError(f"{name} must hold exactly one value (shape [1]), got shape {list(arr.shape)}")
    return arr.reshape(-1)[0]


def _decode(value: object, name: str) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        if len(value) > MAX_PROMPT_BYTES:
            raise RequestError(f"{name} is longer than {MAX_PROMPT_BYTES} bytes")
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(f"{name} is not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
    if isinstance(value, (str, np.str_)):
        return str(value)
    raise RequestError(f"{name} must be BYTES (UTF-8 text), got {type(value).__name__}")


def _text_input(arr: np.ndarray | None) -> str:
    if arr is None:
        raise RequestError("text_input is required (BYTES [1], the prompt)")
    if arr.dtype.kind not in "OSU":
        raise RequestError(f"text_input must be BYTES (UTF-8 text), got {arr.dtype}")
    text = _decode(_one(arr, "text_input"), "text_input")
    if not text.strip():
        raise RequestError("text_input is empty")
    return text


@overload
def _int(inputs: Mapping[str, np.ndarray | None], name: str, default: int, wire: str,
         signed: bool | None) -> int: ...  # fmt: skip
@overload
def _int(inputs: Mapping[str, np.ndarray | None], name: str, default: None, wire: str,
         signed: bool | None) -> int | None: ...  # fmt: skip
def _int(inputs: Mapping[str, np.ndarray | None], name: str, default: int | None, wire: str,
         signed: bool | None) -> int | None:  # fmt: skip
    """An integer scalar; ``signed`` True: int dtypes only, None: signed or unsigned."""
    arr = inputs.get(name)
    if arr is None:
        return default
    kinds = "i" if signed else "iu"
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in kinds:
        got = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
        raise RequestError(f"{name} must be {wire}, got {got}")
    return int(_one(arr, name))


def _float(inputs: Mapping[str, np.ndarray | None], name: str, default: float) -> float:
    arr = inputs.get(name)
    if arr is None:
        return default
    if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
        got = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
        raise RequestError(f"{name} must be FP32, got {got}")
    value = float(_one(arr, name))
    if not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number, got {value}")
    return value


def _bool(inputs: Mapping[str, np.ndarray | None], name: str, default: bool) -> bool:
    arr = inputs.get(name)
    if arr is None:
        return default
    if not isinstance(arr, np.ndarray) or arr.dtype.kind != "b":
        got = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
        raise RequestError(f"{name} must be BOOL, got {got}")
    return bool(_one(arr, name))


def _stop_words(arr: np.ndarray | None) -> tuple[str, ...]:
    if arr is None:
        return ()
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "OSU":
        raise RequestError(f"stop_words must be BYTES [-1] (a list of UTF-8 strings), got {arr.dtype}")
    if arr.ndim > 2 or (arr.ndim == 2 and arr.shape[0] != 1):
        raise RequestError(f"stop_words must have shape [N], got {list(arr.shape)}")
    words = tuple(w for w in (_decode(v, "stop_words") for v in arr.reshape(-1)) if w)
    if len(words) > MAX_STOP_WORDS:
        raise RequestError(f"stop_words has {len(words)} entries; at most {MAX_STOP_WORDS} are allowed")
    if any(len(w) > MAX_STOP_WORD_CHARS for w in words):
        raise RequestError(f"stop_words entries must be at most {MAX_STOP_WORD_CHARS} characters")
    return words


# ---- output-side rule: stop words --------------------------------------------------------------
class StopWordFilter:
    """Cuts generated text at the first stop word; while streaming, holds back a possible stop-word prefix.

    ``feed(delta, final)`` takes newly decoded text and returns ``(text to emit now, stopped)``. Emitted
    text never contains a stop word or a prefix of one that could still complete; after ``stopped`` the
    request is done (the stop word and everything after it are dropped).
    """

    def __init__(self, stop_words: Sequence[str]):
        self.stop_words = tuple(w for w in stop_words if w)
        self._longest = max((len(w) for w in self.stop_words), default=0)
        self._text = ""
        self._emitted = 0
        self.stopped = False

    def feed(self, delta: str, final: bool) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        start = max(0, len(self._text) - self._longest + 1)
        self._text += delta
        if self.stop_words:
            hits = [i for i in (self._text.find(w, start) for w in self.stop_words) if i >= 0]
            if hits:
                cut = min(hits)
                out = self._text[self._emitted : cut] if cut > self._emitted else ""
                self._text = self._text[:cut]
                self._emitted = len(self._text)
                self.stopped = True
                return out, True
        end = len(self._text) if final else len(self._text) - self._held_back()
        out = self._text[self._emitted : end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return out, False

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop word."""
        text = self._text
        for n in range(min(self._longest - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(w.startswith(tail) for w in self.stop_words):
                return n
        return 0
