"""`tide serve` / `tide client` as subprocesses: serve, stop on SIGTERM without orphans, clear errors."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import yaml

from tide_trt.commands.serve import instance_group, prepare_repository, trainer_command
from tide_trt.config import config_from_dict, load_config
from tide_trt.errors import ConfigError
from tide_trt.serving.tritonserver import check_port_free, free_ports

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "test_serving.yaml"
TIDE = [sys.executable, "-m", "tide_trt.cli"]


def test_instance_group_from_config() -> None:
    assert "KIND_CPU" in instance_group(config_from_dict({}))
    gpu = instance_group(config_from_dict({"engine": {"device": "cuda:1"}}))
    assert "KIND_GPU" in gpu and "gpus: [ 1 ]" in gpu
    assert "KIND_GPU" in instance_group(config_from_dict({"serving": {"instance_kind": "gpu"}}))
    with pytest.raises(ConfigError, match="serving.instance_kind"):
        instance_group(config_from_dict({"serving": {"instance_kind": "tpu"}}))


def test_prepare_repository_injects_kind_and_config(tmp_path: Path) -> None:
    cfg = load_config(CONFIG)
    cfg = replace(cfg, engine=replace(cfg.engine, device="cuda"))
    repo, config_path = prepare_repository(ROOT / "model_repo", tmp_path, cfg)
    text = (repo / "tide" / "config.pbtxt").read_text()
    assert "KIND_GPU" in text and "KIND_CPU count" not in text and "decoupled: true" in text
    assert (repo / "tide" / "1" / "model.py").is_file()
    assert yaml.safe_load(config_path.read_text())["engine"]["max_seq_len"] == 512
    # `tide train` ships with this package: the command is always there, and runs this interpreter on that config
    assert trainer_command(config_path) == [sys.executable, "-m", "tide_trt.cli", "train", "--config",
                                            str(config_path)]


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("tide: error:")]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_busy_port_is_refused_with_one_line() -> None:
    http, grpc = free_ports(2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        args = ["serve", "--config", str(CONFIG), "--http-port", str(http), "--grpc-port", str(grpc)]
        proc = subprocess.run([*TIDE, *args, "--metrics-port", str(busy)], capture_output=True, text=True,
                              timeout=120)  # fmt: skip
    assert f"port {busy} on 127.0.0.1 is already in use" in _one_line_error(proc)


def test_missing_tritonserver_binary_is_reported(tmp_path: Path) -> None:
    http, grpc, metrics = (str(p) for p in free_ports(3))
    proc = subprocess.run(
        [*TIDE, "serve", "--config", str(CONFIG), "--http-port", http, "--grpc-port", grpc, "--metrics-port",
         metrics, "--tritonserver", str(tmp_path / "nope" / "tritonserver")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "does not exist or is not executable" in _one_line_error(proc)


def test_missing_draft_is_reported_before_starting(tmp_path: Path) -> None:
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["draft"] = {"path": str(tmp_path / "no-draft")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [*TIDE, "serve", "--config", str(tmp_path / "c.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert "draft checkpoint not found" in _one_line_error(proc)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _serve(tmp_path: Path, trainer: bool) -> tuple[subprocess.Popen, list[int], Path]:
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["trainer"] = {"enabled": trainer, "drafts_dir": str(tmp_path / "drafts")}
    cfg["signals"] = {"store_dir": str(tmp_path / "signals")}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ports = free_ports(3)
    args = ["serve", "--config", str(path), "--http-port", str(ports[0]), "--grpc-port", str(ports[1]),
            "--metrics-port", str(ports[2])]  # fmt: skip
    log = (tmp_path / "serve.err").open("w")
    proc = subprocess.Popen([*TIDE, *args], stdout=subprocess.PIPE, stderr=log, text=True, cwd=tmp_path)
    return proc, ports, tmp_path / "serve.err"


def _stop(proc: subprocess.Popen, err: Path) -> tuple[int, list[psutil.Process]]:
    before = _descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        for p in [psutil.Process(proc.pid), *_descendants(proc.pid)]:
            p.kill()
        raise AssertionError(f"tide serve ignored SIGTERM:\n{err.read_text()[-3000:]}") from None
    time.sleep(0.3)
    return code, _alive(before)


@pytest.mark.triton
def test_serve_serves_then_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    proc, ports, err = _serve(tmp_path, trainer=True)
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
        reader.start()
        deadline = time.monotonic() + 300
        while not any("ready" in ln for ln in lines):
            assert proc.poll() is None, err.read_text()[-3000:]
            assert time.monotonic() < deadline, "tide serve not ready in time"
            time.sleep(0.2)
        assert f"gRPC 127.0.0.1:{ports[1]}" in lines[0] and f":{ports[2]}/metrics" in lines[0]
        client = subprocess.run(
            [
                *TIDE,
                "client",
                "--url",
                f"127.0.0.1:{ports[1]}",
                "--prompt",
                "Say hi",
                "--max-tokens",
                "4",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        out = json.loads(client.stdout)
        assert client.returncode == 0 and out["text"] and 1 <= out["num_output_tokens"] <= 4
        members = _descendants(proc.pid)
        assert any("tritonserver" in " ".join(p.cmdline()) for p in members)
        code, left = _stop(proc, err)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, err.read_text()[-3000:]
    assert not left, [p.cmdline() for p in left]
    reader.join(5)
    assert "TIDE server stopped" in "".join(lines)
    stderr = err.read_text()
    assert "SIGTERM received" in stderr and "started trainer pid" in stderr and "not available" not in stderr
    for port in ports:
        check_port_free("127.0.0.1", port)


@pytest.mark.triton
def test_sigterm_during_startup_leaves_nothing(tmp_path: Path) -> None:
    proc, ports, err = _serve(tmp_path, trainer=False)
    try:
        deadline = time.monotonic() + 120
        while not any("tritonserver" in " ".join(p.cmdline()) for p in _alive(_descendants(proc.pid))):
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()[-3000:]
            time.sleep(0.1)
        code, left = _stop(proc, err)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0 and not left, (code, [p.cmdline() for p in left], err.read_text()[-2000:])
    assert "SIGTERM received" in err.read_text()
    for port in ports:
        check_port_free("127.0.0.1", port)
