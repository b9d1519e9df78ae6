"""The Triton Python-backend model behind `model_repo/tide` (decoupled: 0..n responses per request).

`model_repo/tide/1/model.py` only binds `triton_python_backend_utils` to `TideTritonModel.pb`; everything
else lives here and in the Triton-free modules (`requests`, `scheduler`, `service`, `stats`).

Configuration: the TIDE YAML path comes from the environment variable `TIDE_CONFIG` (set by
`tide serve`), else from the model parameter `tide_config` in `config.pbtxt` (relative to the model
directory); neither -> built-in defaults. With `instance_group { kind: KIND_GPU }` and
`engine.device: cuda`, the engine runs on the instance's GPU (`cuda:<device_id>`). Use one instance
(`count: 1`): each instance owns a full engine and its own scheduler.

Outputs (`text_output` always; the rest only with `return_perf_metrics: true`, values so far):
`text_output` BYTES [1]; `acceptance_rate` FP32 [1]; `total_accepted_draft_tokens`, `total_draft_tokens`,
`num_input_tokens`, `num_output_tokens` INT32 [1]; additions beyond the TensorRT-LLM ensemble:
`mean_accepted_len` FP32 [1] (τ) and, in the final response, `finish_reason` BYTES [1]
("length" | "stop" | "context").
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from tide_trt.config import TideConfig, load_config
from tide_trt.errors import RequestError
from tide_trt.serving.metrics import TritonMetrics
from tide_trt.serving.requests import INPUT_NAMES, parse_request
from tide_trt.serving.scheduler import ResponseChunk, ServerBusy
from tide_trt.serving.service import TideService

log = logging.getLogger("tide_trt.serving.triton")

CONFIG_ENV = "TIDE_CONFIG"
CONFIG_PARAMETER = "tide_config"


def resolve_config(model_config: dict[str, Any], model_dir: str) -> Path | None:
    """`TIDE_CONFIG` env, else the `tide_config` parameter (relative to the model dir), else None."""
    path = os.environ.get(CONFIG_ENV, "").strip()
    if not path:
        param = model_config.get("parameters", {}).get(CONFIG_PARAMETER, {})
        path = str(param.get("string_value", "")).strip()
        if path and not Path(path).is_absolute():
            path = str(Path(model_dir) / path)
    return Path(path) if path else None


def _apply_instance(cfg: TideConfig, kind: str, device_id: str) -> TideConfig:
    """cfg with engine.device set to this Triton GPU instance's device (a new config; cfg is not changed)."""
    if kind != "GPU":
        return cfg
    if cfg.engine.device.startswith("cuda"):
        return replace(cfg, engine=replace(cfg.engine, device=f"cuda:{device_id}"))
    log.warning("instance kind GPU but engine.device=%s: the engine stays on %s", cfg.engine.device,
                cfg.engine.device)
    return cfg


def _setup_logging() -> None:
    """The stub's stderr ends up in the tritonserver log; give our loggers a handler there.

    `kill -USR1 <stub pid>` dumps every thread's stack to that log (diagnosing a stuck model).
    """
    with contextlib.suppress(ValueError, OSError, AttributeError):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=os.environ.get("TIDE_LOG_LEVEL", "INFO").upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )


class TritonSink:
    """Sends scheduler responses through a decoupled request's response sender."""

    def __init__(self, pb: Any, sender: Any):
        self.pb = pb
        self.sender = sender

    def send(self, chunk: ResponseChunk) -> None:
        pb = self.pb
        tensors = [pb.Tensor("text_output", np.array([chunk.text.encode("utf-8")], dtype=np.object_))]
        if chunk.perf is not None:
            p = chunk.perf
            tensors += [
                pb.Tensor("acceptance_rate", np.array([p.acceptance_rate], dtype=np.float32)),
                pb.Tensor("mean_accepted_len", np.array([p.mean_accepted_len], dtype=np.float32)),
                pb.Tensor("total_accepted_draft_tokens", np.array([p.total_accepted_draft_tokens], np.int32)),
                pb.Tensor("total_draft_tokens", np.array([p.total_draft_tokens], dtype=np.int32)),
                pb.Tensor("num_input_tokens", np.array([p.num_input_tokens], dtype=np.int32)),
                pb.Tensor("num_output_tokens", np.array([p.num_output_tokens], dtype=np.int32)),
            ]
            if chunk.final and chunk.finish_reason:
                tensors.append(pb.Tensor("finish_reason", np.array([chunk.finish_reason.encode()], np.object_)))
        flags = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if chunk.final else 0
        self.sender.send(pb.InferenceResponse(output_tensors=tensors), flags=flags)

    def fail(self, message: str) -> None:
        send_error(self.pb, self.sender, message, "INTERNAL")

    def close(self) -> None:
        self.sender.send(flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def is_cancelled(self) -> bool:
        return bool(self.sender.is_cancelled())


def send_error(pb: Any, sender: Any, message: str, code: str) -> None:
    """Final error response; `code` names a `pb_utils.TritonError` code (older stubs: message only)."""
    code_value = getattr(pb.TritonError, code, None)
    error = pb.TritonError(message, code_value) if code_value is not None else pb.TritonError(message)
    sender.send(pb.InferenceResponse(error=error), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


class TideTritonModel:
    """`TritonPythonModel` implementation; `pb` must be set to `triton_python_backend_utils`."""

    pb: Any = None

    def initialize(self, args: dict[str, str]) -> None:
        pb = self.pb
        _setup_logging()
        model_config = json.loads(args["model_config"])
        if not pb.using_decoupled_model_transaction_policy(model_config):
            raise pb.TritonModelException("model_repo/tide needs model_transaction_policy { decoupled: true }")
        path = resolve_config(model_config, args.get("model_repository", "."))
        cfg = _apply_instance(load_config(path), args.get("model_instance_kind", "CPU"),
                              args.get("model_instance_device_id", "0"))
        log.info("TIDE model %s: config %s", args.get("model_instance_name", "?"), path or "(defaults)")
        self.metrics = TritonMetrics(pb, {"model": args.get("model_name", "tide")})
        self.service = TideService.from_config(cfg, metrics_hook=self.metrics).start()

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            self._handle(request)
        return None  # decoupled: responses go through each request's response sender

    def _handle(self, request: Any) -> None:
        pb = self.pb
        sender = request.get_response_sender()
        try:
            inputs = {}
            for name in INPUT_NAMES:
                tensor = pb.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    inputs[name] = tensor.as_numpy()
            try:
                parsed = parse_request(inputs, self.service.limits)
            except RequestError:
                self.service.count_rejected()
                raise
            self.service.submit(parsed, TritonSink(pb, sender))
        except ServerBusy as exc:
            send_error(pb, sender, str(exc), "UNAVAILABLE")
        except RequestError as exc:
            log.info("invalid request %r: %s", request.request_id(), exc)
            send_error(pb, sender, str(exc), "INVALID_ARG")
        except Exception as exc:
            log.exception("request %r failed", request.request_id())
            send_error(pb, sender, f"internal error: {exc}", "INTERNAL")

    def finalize(self) -> None:
        """Stop the scheduler well inside tritonserver's exit timeout (`--exit-timeout-secs`, 5 s)."""
        service = getattr(self, "service", None)
        if service is not None:
            log.info("finalize: stopping the scheduler")
            service.stop(timeout_s=3.0)
