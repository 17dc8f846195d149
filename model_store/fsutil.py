"""Durable file primitives: atomic replace, fsync'd appends, tolerant JSONL reading, crash points."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import uuid
from pathlib import Path
from typing import Any

from memfit.config import crash_at


def crash_point(name: str, job_id: str | None = None) -> None:
    """Kill this process with SIGKILL when MEMFIT_CRASH_AT (comma-separated entries) names this point,
    alone or, given `job_id`, as `name@job_id` (the crash tests of the store and of the pipeline).
    Inactive (one dict lookup) when the variable is unset."""
    raw = crash_at()
    if not raw:
        return
    wanted = {x.strip() for x in raw.split(",")}
    if name in wanted or (job_id is not None and f"{name}@{job_id}" in wanted):
        logging.getLogger("memfit.crash").warning(
            "MEMFIT_CRASH_AT: killing this process at %s (job %s)", name, job_id
        )
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

    def read_new(self, f: Any = None) -> list[dict[str, Any]]:
        return [rec for _, _, rec in self.read_new_spans(f)]

    def read_new_spans(self, f: Any = None) -> list[tuple[int, int, dict[str, Any]]]:
        """Like read_new, with each record's byte offset and length in the file (its line, newline
        included), so that a reader can keep offsets and read a record again (read_record_at).
        `f`: an open binary file of `path` to read from (the caller checked what file it is)."""
        if f is not None:
            f.seek(self.offset)
            data = f.read()
        else:
            try:
                with open(self.path, "rb") as fh:
                    fh.seek(self.offset)
                    data = fh.read()
            except FileNotFoundError:
                return []
        end = data.rfind(b"\n")
        if end < 0:
            return []
        chunk = data[: end + 1]
        start = self.offset
        self.offset += len(chunk)
        out = []
        pos = 0
        while pos < len(chunk):
            nl = chunk.index(b"\n", pos)
            line = chunk[pos:nl]
            at, pos = start + pos, nl + 1
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.bad_lines += 1
                continue
            if isinstance(rec, dict):
                out.append((at, len(line) + 1, rec))
            else:
                self.bad_lines += 1
        return out


def read_record_at(f: Any, offset: int, length: int) -> dict[str, Any]:
    """The JSON record of the line at `offset` (`length` bytes) of the binary file `f`."""
    f.seek(offset)
    rec = json.loads(f.read(length))
    if not isinstance(rec, dict):
        raise ValueError(f"{getattr(f, 'name', f)} at {offset}: not a JSON object")
    return rec


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
