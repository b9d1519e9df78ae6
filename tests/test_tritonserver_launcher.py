"""Starts a real tritonserver with a tiny decoupled Python-backend model and streams from it."""

from __future__ import annotations

import json
import logging
import queue
import socket
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest

from tide_trt.errors import TideError
from tide_trt.serving.tritonserver import (
    TritonServer,
    check_port_free,
    find_tritonserver,
    free_ports,
    group_members,
)

pytestmark = pytest.mark.triton
logger = logging.getLogger(__name__)
MODEL = "echo_stream"

CONFIG = """
name: "echo_stream"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [
  { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "repeat" data_type: TYPE_INT32 dims: [ 1 ] }
]
output [
  { name: "text_output" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "index" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "info" data_type: TYPE_STRING dims: [ 1 ] }
]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

MODEL_PY = """
import json, os, sys, time
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        import tide_trt.errors  # the repo's package is importable in the stub (venv first on PATH)

        info = json.dumps({"marker": os.environ.get("TIDE_TEST_MARKER", ""), "prefix": sys.prefix})
        for request in requests:
            sender = request.get_response_sender()
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0]
            n = int(pb_utils.get_input_tensor_by_name(request, "repeat").as_numpy().reshape(-1)[0])
            if text == b"__hang__":
                time.sleep(3600)  # a stuck request: the server then ignores SIGTERM for a long time
            for i in range(n):
                sender.send(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("text_output", np.array([text], dtype=np.object_)),
                    pb_utils.Tensor("index", np.array([i], dtype=np.int32)),
                    pb_utils.Tensor("info", np.array([info.encode()], dtype=np.object_)),
                ]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""


def _write_repo(root: Path) -> Path:
    (root / MODEL / "1").mkdir(parents=True)
    (root / MODEL / "config.pbtxt").write_text(textwrap.dedent(CONFIG))
    (root / MODEL / "1" / "model.py").write_text(textwrap.dedent(MODEL_PY))
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    repo = _write_repo(tmp_path_factory.mktemp("model_repo"))
    http, grpc, metrics = free_ports(3)
    srv = TritonServer(
        repo, find_tritonserver(), http_port=http, grpc_port=grpc, metrics_port=metrics,
        env={"TIDE_TEST_MARKER": "hello-from-test"},
    )  # fmt: skip
    srv.start(timeout_s=180)
    logger.warning("tritonserver start took %.1f s", srv.start_seconds)
    try:
        yield srv
    finally:
        srv.stop()


def test_grpc_stream(server: TritonServer) -> None:
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.urls.grpc)
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array(["héllo 😀".encode()], dtype=np.object_))
    repeat = grpcclient.InferInput("repeat", [1], "INT32")
    repeat.set_data_from_numpy(np.array([4], dtype=np.int32))
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(MODEL, [text, repeat], request_id="r1", enable_empty_final_response=True)
        outputs, info = [], None
        while True:
            result, error = results.get(timeout=30)
            assert error is None, error
            final = result.get_response().parameters["triton_final_response"].bool_param
            if result.as_numpy("text_output") is not None:
                outputs.append((int(result.as_numpy("index")[0]), result.as_numpy("text_output")[0]))
                info = json.loads(result.as_numpy("info")[0])
            if final:
                break
    finally:
        client.stop_stream()
        client.close()
    assert outputs == [(i, "héllo 😀".encode()) for i in range(4)]
    assert info["marker"] == "hello-from-test"  # extra env reaches the Python backend
    assert Path(info["prefix"]).resolve() == Path(sys.prefix).resolve()  # the venv's Python


def test_http_generate_stream(server: TritonServer) -> None:
    body = json.dumps({"text_input": "abc", "repeat": 3}).encode()
    req = urllib.request.Request(
        f"{server.urls.http}/v2/models/{MODEL}/generate_stream", data=body, method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as resp:
        events = [
            json.loads(line[5:]) for line in resp.read().decode().splitlines() if line.startswith("data:")
        ]
    assert [e["text_output"] for e in events] == ["abc"] * 3
    assert [e["index"] for e in events] == [0, 1, 2]


def test_metrics_endpoint(server: TritonServer) -> None:
    with urllib.request.urlopen(server.urls.metrics, timeout=10) as resp:
        assert b"nv_inference_request_success" in resp.read()


def test_busy_port_refused(server: TritonServer, tmp_path: Path) -> None:
    other = TritonServer(
        tmp_path, server.install, http_port=free_ports(1)[0], grpc_port=server.ports["grpc"],
        metrics_port=free_ports(1)[0],
    )  # fmt: skip
    with pytest.raises(TideError, match=rf"port {server.ports['grpc']} on 127.0.0.1 is already in use"):
        other.start(timeout_s=10)
    assert not other.is_running()


def test_check_port_free_on_listener() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(TideError, match="already in use"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", port)


def test_stop_leaves_no_process(tmp_path: Path) -> None:
    repo = _write_repo(tmp_path / "repo")
    http, grpc, metrics = free_ports(3)
    with TritonServer(repo, find_tritonserver(), http_port=http, grpc_port=grpc, metrics_port=metrics) as srv:
        pgid = srv.pid
        assert pgid is not None
        members = group_members(pgid)
        assert len(members) >= 2  # tritonserver + its Python backend stub
    time.sleep(0.2)
    assert not group_members(pgid)
    assert not any(psutil.pid_exists(p.pid) and p.is_running() for p in members)
    check_port_free("127.0.0.1", http)


def test_stop_kills_stuck_server(tmp_path: Path) -> None:
    import tritonclient.grpc as grpcclient

    repo = _write_repo(tmp_path / "repo")
    http, grpc, metrics = free_ports(3)
    srv = TritonServer(repo, find_tritonserver(), http_port=http, grpc_port=grpc, metrics_port=metrics)
    srv.start(timeout_s=120)
    pgid = srv.pid
    assert pgid is not None
    client = grpcclient.InferenceServerClient(srv.urls.grpc)
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"__hang__"], dtype=np.object_))
    repeat = grpcclient.InferInput("repeat", [1], "INT32")
    repeat.set_data_from_numpy(np.array([1], dtype=np.int32))
    client.start_stream(callback=lambda result, error: None)
    try:
        client.async_stream_infer(MODEL, [text, repeat])
        time.sleep(0.5)  # let the request reach the stub
        t0 = time.monotonic()
        srv.stop(grace_s=2.0)
        assert time.monotonic() - t0 < 15
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    assert not group_members(pgid)
    assert not list(Path("/dev/shm").glob(f"{srv.shm_prefix}*"))  # SIGKILL leaves regions: removed


def test_model_load_failure_reports_log(tmp_path: Path) -> None:
    repo = _write_repo(tmp_path / "repo")
    (repo / MODEL / "1" / "model.py").write_text("raise RuntimeError('broken model for the test')\n")
    http, grpc, metrics = free_ports(3)
    log = tmp_path / "server.log"
    srv = TritonServer(
        repo, find_tritonserver(), http_port=http, grpc_port=grpc, metrics_port=metrics, log_file=log
    )
    with pytest.raises(TideError, match="broken model for the test"):
        srv.start(timeout_s=120)
    assert not srv.is_running() and "broken model for the test" in log.read_text()


def test_find_explicit_missing() -> None:
    with pytest.raises(TideError, match="does not exist"):
        find_tritonserver("/nonexistent/tritonserver")


def test_wheel_install_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDE_CACHE_DIR", str(tmp_path))
    install = find_tritonserver()
    if install.origin != "pytriton-wheel":
        pytest.skip("a system tritonserver is installed")
    python_dir = install.backend_dir / "python"
    assert install.backend_dir.parent == tmp_path / "triton_backends"
    assert {p.name for p in python_dir.iterdir()} >= {"libtriton_python.so", "triton_python_backend_stub"}
    assert (python_dir / "triton_python_backend_stub").stat().st_mode & 0o111
    assert install.env["LD_LIBRARY_PATH"].split(":")[0].endswith("nvidia_pytriton.libs")
    assert install.env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert find_tritonserver().backend_dir == install.backend_dir  # built once, then reused
    assert find_tritonserver(str(install.binary)).origin == "pytriton-wheel"


def test_command_flags(tmp_path: Path) -> None:
    install = find_tritonserver()
    srv = TritonServer(
        tmp_path, install, http_port=1, grpc_port=2, metrics_port=3, extra_args=["--log-info=false"]
    )
    cmd = srv.command()
    for flag in (
        f"--model-repository={tmp_path}",
        f"--backend-directory={install.backend_dir}",
        "--http-address=127.0.0.1",
        "--grpc-port=2",
        "--metrics-port=3",
        "--strict-readiness=true",
        f"--backend-config=python,shm-region-prefix-name={srv.shm_prefix}",
    ):
        assert flag in cmd
    assert cmd[-1] == "--log-info=false"
