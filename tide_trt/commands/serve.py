"""`tide serve`: run TIDE inside a real Triton Inference Server (and the draft trainer next to it).

Finds `tritonserver` (system install or the nvidia-pytriton wheel), checks the ports, copies the model
repository into a temporary directory with the effective config written next to it (`TIDE_CONFIG`) and
the instance kind injected, starts the server, waits until the model is ready, prints the endpoints and
serves until Ctrl-C / SIGTERM. Then the trainer and the server are stopped: SIGTERM to each process
group, a grace period (`serving.stop_grace_s`), then SIGKILL — no orphans.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import FrameType

import yaml

from tide_trt.commands.common import add_config_args, config_from_args
from tide_trt.config import TideConfig, config_to_dict
from tide_trt.errors import TideError

log = logging.getLogger(__name__)

MODEL_NAME = "tide"
DEFAULT_REPO = Path(__file__).resolve().parents[2] / "model_repo"
_INSTANCE_RE = re.compile(r"^instance_group\s*\[.*?\]\s*$", re.MULTILINE | re.DOTALL)


class ShutdownRequested(BaseException):
    """Raised from the SIGINT/SIGTERM handler (BaseException: `except Exception` does not swallow it)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve TIDE from a Triton Inference Server (+ the draft trainer)")
    add_config_args(p)
    p.add_argument("--host", help="address to bind (default serving.host, 127.0.0.1)")
    p.add_argument("--http-port", type=int, help="HTTP port (default serving.http_port, 8000)")
    p.add_argument("--grpc-port", type=int, help="gRPC port (default serving.grpc_port, 8001)")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (default serving.metrics_port, 8002)")
    p.add_argument("--model-repo", help=f"model repository to copy (default {DEFAULT_REPO})")
    p.add_argument("--no-trainer", action="store_true", help="do not start `tide train` alongside")
    p.add_argument("--tritonserver", help="tritonserver binary (default: PATH, then the nvidia-pytriton wheel)")
    p.add_argument("--server-log", help="write the tritonserver log here (default: a temporary file)")
    p.set_defaults(func=run)


def _apply_args(cfg: TideConfig, args: argparse.Namespace) -> TideConfig:
    """cfg with the command-line serving options applied (ports etc. validated by the config)."""
    changes = {attr: getattr(args, attr) for attr in ("host", "http_port", "grpc_port", "metrics_port", "tritonserver")
               if getattr(args, attr, None) is not None}
    return replace(cfg, serving=replace(cfg.serving, **changes))


def instance_group(cfg: TideConfig) -> str:
    """The `instance_group` line for config.pbtxt from serving.instance_kind / engine.device."""
    kind = cfg.serving.instance_kind
    device = cfg.engine.device
    if kind == "gpu" or (kind == "auto" and device.startswith("cuda")):
        index = device.split(":", 1)[1] if ":" in device else "0"
        return f"instance_group [ {{ kind: KIND_GPU count: 1 gpus: [ {index} ] }} ]"
    return "instance_group [ { kind: KIND_CPU count: 1 } ]"


def prepare_repository(source: Path, workdir: Path, cfg: TideConfig) -> tuple[Path, Path]:
    """Copy the repository, inject the instance group, write the effective config. Returns (repo, yaml)."""
    model_cfg = source / MODEL_NAME / "config.pbtxt"
    if not model_cfg.is_file():
        raise TideError(f"model repository {source} has no {MODEL_NAME}/config.pbtxt (pass --model-repo DIR)")
    repo = workdir / "model_repo"
    shutil.copytree(source, repo, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    text = (repo / MODEL_NAME / "config.pbtxt").read_text()
    text, n = _INSTANCE_RE.subn(instance_group(cfg), text)
    if n == 0:
        text += "\n" + instance_group(cfg) + "\n"
    (repo / MODEL_NAME / "config.pbtxt").write_text(text)
    config_path = workdir / "tide.yaml"
    config_path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return repo, config_path


def trainer_command(config_path: Path) -> list[str] | None:
    """`tide train --config <yaml>` if that subcommand is installed, else None."""
    if importlib.util.find_spec("tide_trt.commands.train") is None:
        return None
    return [sys.executable, "-m", "tide_trt.cli", "train", "--config", str(config_path)]


def _start_trainer(cfg: TideConfig, args: argparse.Namespace, config_path: Path) -> subprocess.Popen | None:
    if args.no_trainer or not cfg.trainer.enabled:
        log.info("trainer not started (%s)", "--no-trainer" if args.no_trainer else "trainer.enabled: false")
        return None
    cmd = trainer_command(config_path)
    if cmd is None:
        log.warning("`tide train` is not available in this installation; serving without the trainer")
        return None
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
    log.info("started trainer pid %d: %s", proc.pid, " ".join(cmd))
    return proc


def stop_process_group(proc: subprocess.Popen, grace_s: float, what: str) -> None:
    """SIGTERM the process group led by `proc`, wait `grace_s`, then SIGKILL it; reap."""
    from tide_trt.serving.tritonserver import group_members

    pgid = proc.pid
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if proc.poll() is not None and not group_members(pgid):
                log.info("%s (pid %d) stopped, exit code %s", what, proc.pid, proc.returncode)
                return
            time.sleep(0.1)
        log.warning("%s group %d still alive after %s; escalating", what, pgid, sig.name)
    log.error("%s group %d survived SIGKILL", what, pgid)


def _preflight(cfg: TideConfig) -> None:
    """Fail fast, in one line, on problems the model would otherwise hit deep inside tritonserver."""
    from tide_trt.draft.checkpoint import read_draft_config
    from tide_trt.runtime import resolve_draft_path

    draft = resolve_draft_path(cfg.draft.path)
    if draft is not None:
        read_draft_config(draft)
    instance_group(cfg)


def _handle_signal(signum: int, frame: FrameType | None) -> None:
    raise ShutdownRequested(signal.Signals(signum).name)


def _late_signal(signum: int, frame: FrameType | None) -> None:
    log.warning("%s received while shutting down; still stopping", signal.Signals(signum).name)


def run(args: argparse.Namespace) -> int:
    from tide_trt.serving.tritonserver import TritonServer, check_port_free, find_tritonserver

    cfg = _apply_args(config_from_args(args), args)
    _preflight(cfg)
    s = cfg.serving
    for port in (s.http_port, s.grpc_port, s.metrics_port):
        check_port_free(s.host, port)
    install = find_tritonserver(s.tritonserver)
    source = Path(args.model_repo) if args.model_repo else DEFAULT_REPO
    previous = {sig: signal.signal(sig, _handle_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    trainer: subprocess.Popen | None = None
    server: TritonServer | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="tide-serve-") as tmp:
            repo, config_path = prepare_repository(source, Path(tmp), cfg)
            server = TritonServer(
                repo, install, host=s.host, http_port=s.http_port, grpc_port=s.grpc_port,
                metrics_port=s.metrics_port, env={"TIDE_CONFIG": str(config_path)},
                log_file=Path(args.server_log) if args.server_log else None,
            )  # fmt: skip
            try:
                server.start(timeout_s=s.ready_timeout_s)
                urls = server.urls
                endpoints = f"HTTP {urls.http}  gRPC {urls.grpc}  metrics {urls.metrics}"
                print(f"TIDE model '{MODEL_NAME}' ready: {endpoints}", flush=True)
                print(f"server log: {server.log_file}", flush=True)
                trainer = _start_trainer(cfg, args, config_path)
                _serve_until_signal(server, trainer)
            except ShutdownRequested as exc:
                log.info("%s received: shutting down", exc)
            finally:
                for sig in previous:
                    signal.signal(sig, _late_signal)
                if trainer is not None:
                    stop_process_group(trainer, s.stop_grace_s, "trainer")
                server.stop(grace_s=s.stop_grace_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("TIDE server stopped", flush=True)
    return 0


def _serve_until_signal(server, trainer: subprocess.Popen | None) -> None:
    trainer_reported = False
    while True:
        time.sleep(0.5)
        if not server.is_running():
            raise TideError(f"tritonserver exited unexpectedly (log {server.log_file}):\n{server.log_tail(20)}")
        if trainer is not None and not trainer_reported and trainer.poll() is not None:
            log.warning("trainer exited with code %s; serving continues without it", trainer.returncode)
            trainer_reported = True
