"""On-disk stores shared by the serving process and the trainer process (plain directories; they work on a
shared file system across machines).

Signal store (`signals.store_dir`):
    shard-<unix_ns:020d>-<pid>-<n:06d>.safetensors   one shard (format: tide_trt/online/signals.py)
    .tmp-*                                            a shard being written (renamed into place when complete)

Draft store (`trainer.drafts_dir`):
    v0000/ v0001/ ...        published versions (save_draft layout: model.safetensors + config.json)
    manifest.jsonl           one JSON line per published version; a version exists once its line is written
    rounds.jsonl             one JSON line per training round (deployed or not, shards consumed, decision)
    CURRENT                  optional pin: the version serving must use (`tide drafts use N`); absent = latest
    .trainer.lock            flock held by the running trainer (one trainer per store)

Every write is atomic (temporary file/dir + rename, or one O_APPEND line), so a reader never sees a partial
shard or version, and killing a writer at any point leaves the stores consistent.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import safe_open

from tide_trt.errors import TideError

log = logging.getLogger(__name__)

SHARD_GLOB = "shard-*.safetensors"
_VERSION_RE = re.compile(r"^v(\d{4,})$")
MANIFEST = "manifest.jsonl"
ROUNDS = "rounds.jsonl"
PIN = "CURRENT"
LOCK = ".trainer.lock"


def dir_bytes(path: Path) -> int:
    """Total size of the files under `path` (0 if it vanished meanwhile)."""
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file():
                total += p.stat().st_size
    return total


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All well-formed JSON object lines (a torn last line of a killed writer is skipped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s: skipping a malformed line", path)
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


def append_jsonl(path: Path, doc: dict[str, Any]) -> None:
    """Append one line with a single O_APPEND write + fsync (atomic for concurrent readers)."""
    data = (json.dumps(doc, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn line of a killed writer: end it first
            data = b"\n" + data
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class SignalStore:
    """Directory of safetensors signal shards."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def ensure(self) -> SignalStore:
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    def shard_paths(self) -> list[Path]:
        """Complete shards, oldest first (names sort by creation time)."""
        if not self.root.is_dir():
            return []
        return sorted(self.root.glob(SHARD_GLOB))

    def new_shard_path(self, counter: int) -> Path:
        return self.root / f"shard-{time.time_ns():020d}-{os.getpid()}-{counter:06d}.safetensors"

    @staticmethod
    def header(path: Path) -> dict[str, str]:
        """Shard metadata without reading tensors (cheap: listing, token counts)."""
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})

    def remove_stale_tmp(self, older_than_s: float = 3600.0) -> int:
        """Delete temporary files left by a killed writer (only old ones: a live writer may own a new one)."""
        n = 0
        now = time.time()
        for p in self.root.glob(".tmp-*") if self.root.is_dir() else []:
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime > older_than_s:
                    p.unlink()
                    n += 1
        return n

    def prune(self, keep: int, protect: set[str]) -> list[Path]:
        """Delete the oldest shards beyond the newest `keep`, except those named in `protect`."""
        paths = self.shard_paths()
        doomed = [p for p in paths[: max(0, len(paths) - keep)] if p.name not in protect]
        for p in doomed:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        if doomed:
            log.info("signal store: pruned %d old shard(s)", len(doomed))
        return doomed


class DraftStore:
    """Versioned draft checkpoints + manifest + rounds log + pin (see module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def ensure(self) -> DraftStore:
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @property
    def rounds_path(self) -> Path:
        return self.root / ROUNDS

    @property
    def pin_path(self) -> Path:
        return self.root / PIN

    def version_dir(self, version: int) -> Path:
        return self.root / f"v{version:04d}"

    # ---- reading -------------------------------------------------------------------------------------------
    def manifest(self) -> list[dict[str, Any]]:
        """Manifest entries whose version directory exists (latest line wins per version), by version."""
        entries: dict[int, dict[str, Any]] = {}
        for doc in read_jsonl(self.manifest_path):
            v = doc.get("version")
            if isinstance(v, int) and self.version_dir(v).is_dir():
                entries[v] = doc
        return [entries[v] for v in sorted(entries)]

    def versions(self) -> list[int]:
        return [int(e["version"]) for e in self.manifest()]

    def latest(self) -> int | None:
        vs = self.versions()
        return vs[-1] if vs else None

    def pinned(self) -> int | None:
        if not self.pin_path.is_file():
            return None
        text = self.pin_path.read_text().strip()
        try:
            return int(text)
        except ValueError:
            log.warning("%s holds %r, not a version number; ignoring the pin", self.pin_path, text)
            return None

    def current(self) -> int | None:
        """The version serving should use: the pin if set, else the latest published version."""
        pin = self.pinned()
        return pin if pin is not None else self.latest()

    def rounds(self) -> list[dict[str, Any]]:
        return read_jsonl(self.rounds_path)

    def dir_versions(self) -> list[int]:
        """Version numbers of all vNNNN directories (published or orphaned)."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = _VERSION_RE.match(p.name)
            if m and p.is_dir():
                out.append(int(m.group(1)))
        return sorted(out)

    def next_version(self) -> int:
        known = self.dir_versions() + self.versions()
        return max(known) + 1 if known else 0

    # ---- writing -------------------------------------------------------------------------------------------
    def append_manifest(self, entry: dict[str, Any]) -> None:
        self.ensure()
        append_jsonl(self.manifest_path, {"time": time.time(), **entry})

    def append_round(self, entry: dict[str, Any]) -> None:
        self.ensure()
        append_jsonl(self.rounds_path, {"time": time.time(), **entry})

    def pin(self, version: int) -> None:
        if version not in self.versions():
            raise TideError(
                f"version {version} is not published in {self.root} (published: {self.versions()})"
            )
        atomic_write_text(self.pin_path, f"{version}\n")

    def unpin(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.pin_path.unlink()

    def remove_orphans(self) -> list[Path]:
        """Version dirs without a manifest line and save_draft temp dirs: leftovers of a killed trainer.
        Only the trainer calls this, under its lock."""
        published = set(self.versions())
        doomed = [self.version_dir(v) for v in self.dir_versions() if v not in published]
        doomed += [p for p in self.root.glob(".v*.tmp-*")] if self.root.is_dir() else []
        for p in doomed:
            shutil.rmtree(p, ignore_errors=True)
        if doomed:
            log.info(
                "draft store: removed %d unfinished version dir(s): %s", len(doomed), [p.name for p in doomed]
            )
        return doomed

    def prune(self, keep: int) -> list[int]:
        """Delete published versions beyond the newest `keep`, never the current (pinned) one, the latest, or
        the base version (the lowest, kept as the rollback target)."""
        vs = self.versions()
        if not vs:
            return []
        protect = {vs[0], vs[-1]}
        cur = self.current()
        if cur is not None:
            protect.add(cur)
        doomed = [v for v in vs[: max(0, len(vs) - keep)] if v not in protect]
        for v in doomed:
            shutil.rmtree(self.version_dir(v), ignore_errors=True)
        if doomed:
            log.info("draft store: pruned version(s) %s", doomed)
        return doomed

    @contextlib.contextmanager
    def trainer_lock(self) -> Iterator[None]:
        """Exclusive lock for the one trainer of this store (released by the OS if the process dies)."""
        self.ensure()
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise TideError(f"another trainer is running on {self.root}") from exc
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            yield
        finally:
            os.close(fd)
