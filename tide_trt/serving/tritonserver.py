"""Find and launch a real ``tritonserver`` (NVIDIA container install or the nvidia-pytriton wheel's copy).

The wheel's server runs on CPU: its Python backend needs the stub built for the running Python version
copied next to ``libtriton_python.so``, ``LD_LIBRARY_PATH`` pointing at the wheel's bundled libraries and
the Python's libdir, and the venv's ``bin`` first on ``PATH`` so the stub imports the venv's packages.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tide_trt.config import default_cache_dir
from tide_trt.errors import TideError

logger = logging.getLogger(__name__)

SYSTEM_BACKENDS = Path("/opt/tritonserver/backends")
_LIVE_SERVERS: weakref.WeakSet[TritonServer] = weakref.WeakSet()


@dataclass(frozen=True)
class TritonInstall:
    """Where a usable ``tritonserver`` lives and what its process needs."""

    binary: Path
    backend_dir: Path
    env: dict[str, str] = field(default_factory=dict)  # additions to os.environ for the server process
    origin: str = "system"  # "system" | "pytriton-wheel"
    cache_dir: Path | None = None  # --cache-directory (response cache libraries), if any


@dataclass(frozen=True)
class TritonUrls:
    """Endpoints of a running server: ``http``/``metrics`` are URLs, ``grpc`` is ``host:port``."""

    http: str
    grpc: str
    metrics: str

    @property
    def http_endpoint(self) -> str:
        """``host:port`` form of the HTTP endpoint, as ``tritonclient.http`` wants it."""
        return self.http.removeprefix("http://")


def find_tritonserver(explicit: str = "") -> TritonInstall:
    """Explicit path, else ``tritonserver`` on PATH (NVIDIA containers), else the nvidia-pytriton wheel."""
    wheel_dir = _pytriton_dir()
    if explicit:
        path = Path(explicit).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise TideError(f"tritonserver binary {path} does not exist or is not executable")
        if wheel_dir is not None and path.resolve() == _wheel_binary(wheel_dir).resolve():
            return _wheel_install(wheel_dir)
        return _system_install(path)
    on_path = shutil.which("tritonserver")
    if on_path and (
        SYSTEM_BACKENDS.is_dir() or (Path(on_path).resolve().parent.parent / "backends").is_dir()
    ):
        return _system_install(Path(on_path))
    if wheel_dir is not None and _wheel_binary(wheel_dir).is_file():
        return _wheel_install(wheel_dir)
    raise TideError(
        "no tritonserver found: not on PATH (with /opt/tritonserver/backends) and the nvidia-pytriton "
        "wheel is not installed; `pip install nvidia-pytriton` or set serving.tritonserver to the binary"
    )


def _pytriton_dir() -> Path | None:
    spec = importlib.util.find_spec("pytriton")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _wheel_binary(wheel_dir: Path) -> Path:
    return wheel_dir / "tritonserver" / "bin" / "tritonserver"


def _system_install(binary: Path) -> TritonInstall:
    local = binary.resolve().parent.parent / "backends"
    backend_dir = SYSTEM_BACKENDS if SYSTEM_BACKENDS.is_dir() or not local.is_dir() else local
    return TritonInstall(binary=binary, backend_dir=backend_dir, origin="system")


def _wheel_install(wheel_dir: Path) -> TritonInstall:
    server_dir = wheel_dir / "tritonserver"
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server_dir / "python_backend_stubs" / pyver / "triton_python_backend_stub"
    if not stub.is_file():
        raise TideError(f"the nvidia-pytriton wheel has no Python backend stub for Python {pyver} ({stub})")
    backend_dir = _prepare_backends(server_dir / "backends" / "python", stub)
    libs = [str(wheel_dir.parent / "nvidia_pytriton.libs"), str(sysconfig.get_config_var("LIBDIR") or "")]
    env = {
        "LD_LIBRARY_PATH": _join_paths(libs + [os.environ.get("LD_LIBRARY_PATH", "")]),
        "PATH": _join_paths([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    caches = server_dir / "caches"
    return TritonInstall(
        binary=server_dir / "bin" / "tritonserver",
        backend_dir=backend_dir,
        env=env,
        origin="pytriton-wheel",
        cache_dir=caches if caches.is_dir() else None,
    )


def _join_paths(parts: Sequence[str]) -> str:
    return os.pathsep.join(p for p in parts if p)


def _prepare_backends(python_backend: Path, stub: Path) -> Path:
    """Build (once, atomically) ``<cache>/triton_backends/<key>/python`` = wheel backend + the stub."""
    sources = sorted(p for p in python_backend.iterdir() if p.is_file()) + [stub]
    key = hashlib.sha256(
        "|".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sources).encode()
    ).hexdigest()[:16]
    root = default_cache_dir() / "triton_backends"
    target = root / key
    if (target / "python" / "triton_python_backend_stub").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        staging.chmod(0o755)  # mkdtemp makes it 0700
        (staging / "python").mkdir()
        for src in sources:
            shutil.copy2(src, staging / "python" / src.name)
        (staging / "python" / stub.name).chmod(0o755)
        try:
            staging.rename(target)
            logger.info("prepared Triton backends directory %s", target)
        except OSError:  # another process built it first
            if not (target / "python" / "triton_python_backend_stub").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def check_port_free(host: str, port: int) -> None:
    """Raise TideError if ``host:port`` cannot be bound (something already listens there)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers do not count
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise TideError(f"cannot bind {host}:{port}: {exc.strerror}") from None
            raise TideError(
                f"port {port} on {host} is already in use; stop the other server or choose another port "
                "(serving.http_port / grpc_port / metrics_port)"
            ) from None


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for tests)."""
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports that were free a moment ago (sockets held together so they differ)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class TritonServer:
    """A ``tritonserver`` child process in its own session; use as a context manager."""

    def __init__(
        self,
        model_repository: Path,
        install: TritonInstall,
        host: str = "127.0.0.1",
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        log_verbose: int = 0,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_file: Path | None = None,
    ) -> None:
        self.model_repository = Path(model_repository)
        self.install = install
        self.host = host
        self.ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.log_verbose = log_verbose
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self._own_log = log_file is None
        self.log_file = Path(log_file) if log_file else None
        self.start_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pgid: int | None = None
        # unique shared-memory names: two servers with the same model name would otherwise collide
        self.shm_prefix = f"tide_{os.getpid()}_{uuid.uuid4().hex[:8]}_"

    @property
    def urls(self) -> TritonUrls:
        p = self.ports
        return TritonUrls(
            http=f"http://{self.host}:{p['http']}",
            grpc=f"{self.host}:{p['grpc']}",
            metrics=f"http://{self.host}:{p['metrics']}/metrics",
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def command(self) -> list[str]:
        """The full command line (CPU-safe defaults first; ``extra_args`` last so they win)."""
        args = [
            str(self.install.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self.install.backend_dir}",
        ]
        for service, port in self.ports.items():
            args += [f"--{service}-address={self.host}", f"--{service}-port={port}"]
        args += ["--allow-metrics=true", "--strict-readiness=true", "--exit-on-error=true"]
        args += ["--exit-timeout-secs=5", f"--log-verbose={self.log_verbose}"]
        args.append(f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}")
        if self.install.cache_dir is not None:
            args.append(f"--cache-directory={self.install.cache_dir}")
        if not _has_nvidia_gpu():
            args += ["--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0"]
        return args + self.extra_args

    def start(self, timeout_s: float = 120.0) -> TritonServer:
        """Launch and wait until ``/v2/health/ready`` (all models loaded); TideError with the log tail."""
        if self._proc is not None and self._proc.poll() is None:
            raise TideError(f"tritonserver already running (pid {self._proc.pid})")
        for port in self.ports.values():
            check_port_free(self.host, port)
        if self._own_log:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_file = Path(name)
        assert self.log_file is not None
        env = {**os.environ, **self.install.env, **self.extra_env}
        t0 = time.monotonic()
        with open(self.log_file, "ab") as log:
            self._proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, start_new_session=True,
            )  # fmt: skip
        self._pgid = self._proc.pid  # new session: the server leads its own process group
        _LIVE_SERVERS.add(self)
        logger.info(
            "started tritonserver pid %d (%s), log %s", self._proc.pid, self.install.origin, self.log_file
        )
        try:
            self._wait_ready(t0 + timeout_s)
        except BaseException:
            self.stop(grace_s=5.0, keep_log=True)
            raise
        self.start_seconds = time.monotonic() - t0
        logger.info("tritonserver ready in %.1f s at %s", self.start_seconds, self.urls.http)
        return self

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None
        url = f"{self.urls.http}/v2/health/ready"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise TideError(
                    f"tritonserver exited with code {code} while starting (log {self.log_file}):\n"
                    + self.log_tail()
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TideError(
                    f"tritonserver not ready at {url} in time (log {self.log_file}):\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def log_tail(self, n: int = 40) -> str:
        """Last ``n`` lines of the server's combined stdout/stderr."""
        if self.log_file is None or not self.log_file.exists():
            return "(no log)"
        with open(self.log_file, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, grace_s: float = 10.0, keep_log: bool = False) -> None:
        """SIGTERM the process group, wait ``grace_s``, then SIGKILL it; reap. Idempotent."""
        if self._proc is None or self._pgid is None:
            return
        pgid = self._pgid
        _signal_group(pgid, signal.SIGTERM)
        if not _wait_group_gone(self._proc, pgid, time.monotonic() + grace_s):
            logger.warning("tritonserver group %d still alive after %.0f s: SIGKILL", pgid, grace_s)
            _signal_group(pgid, signal.SIGKILL)
            if not _wait_group_gone(self._proc, pgid, time.monotonic() + 10.0):
                logger.error("tritonserver group %d survived SIGKILL", pgid)
        logger.info("tritonserver pid %d stopped (exit code %s)", self._proc.pid, self._proc.returncode)
        self._proc = None
        self._pgid = None
        _LIVE_SERVERS.discard(self)
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):  # left behind after SIGKILL
            region.unlink(missing_ok=True)
        if self._own_log and not keep_log and self.log_file is not None:
            self.log_file.unlink(missing_ok=True)

    def __enter__(self) -> TritonServer:
        return self if self.is_running() else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def group_members(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _wait_group_gone(proc: subprocess.Popen[bytes], pgid: int, deadline: float) -> bool:
    while True:
        proc.poll()  # reap the leader as soon as it exits
        if proc.returncode is not None and not group_members(pgid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _has_nvidia_gpu() -> bool:
    return Path("/dev/nvidiactl").exists() or Path("/dev/nvidia0").exists()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE_SERVERS):
        server.stop(grace_s=5.0)
