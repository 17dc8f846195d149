"""Durable file primitives: atomic replace, fsync'd appends, tolerant JSONL reading, crash points."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import uuid
from pathlib import Path
from typing import Any

CRASH_ENV = "MEMFIT_CRASH_AT"


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL when MEMFIT_CRASH_AT names this point (crash-safety tests)."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: str | Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, crash_name: str | None = None) -> None:
    """Write temp file, fsync, rename over `path`, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if crash_name:
        crash_point(crash_name)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any, crash_name: str | None = None) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode(), crash_name)


def append_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Append records as JSON lines in one O_APPEND write, then fsync.

    A line left without its newline by a crash mid-append is closed first, so the new records start
    on a fresh line (readers skip the broken one).
    """
    if not records:
        return
    data = "".join(json.dumps(r, default=str, separators=(",", ":")) + "\n" for r in records).encode()
    fd = os.open(str(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size > 0:
            rfd = os.open(str(path), os.O_RDONLY)
            try:
                last = os.pread(rfd, 1, size - 1)
            finally:
                os.close(rfd)
            if last != b"\n":
                data = b"\n" + data
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


class JsonlReader:
    """Incremental reader of an append-only JSONL file.

    `read_new()` returns the records appended since the last call. Only complete lines (ending in a
    newline) are consumed; a truncated last line stays pending and, if a later append closes it, is
    skipped as unparsable (counted in `bad_lines`).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.offset = 0
        self.bad_lines = 0

    def read_new(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []
        chunk = data[: end + 1]
        self.offset += len(chunk)
        out = []
        for line in chunk.split(b"\n"):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.bad_lines += 1
                continue
            if isinstance(rec, dict):
                out.append(rec)
            else:
                self.bad_lines += 1
        return out


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return JsonlReader(path).read_new()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj)).hexdigest()
