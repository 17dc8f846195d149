"""What the job log's lines hold: the Job record, its states and transitions, a finished job's compact
form (Folded), and the on-disk formats of the segments' headers and of the snapshot
(model_store/joblog.py writes and replays them)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SNAPSHOT_FORMAT = 1
_SEGMENT_PREFIX = b'{"event":"segment"'

STATUSES = ("queued", "running", "succeeded", "rejected", "failed", "cancelled")
TERMINAL = ("succeeded", "rejected", "failed", "cancelled")
TRANSITIONS: dict[str, set[str]] = {
    "queued": {"queued", "running", "cancelled", "failed"},
    "running": {"running", "succeeded", "rejected", "failed", "cancelled", "queued"},
    "succeeded": set(),
    "rejected": set(),
    "failed": {"queued"},
    "cancelled": {"queued"},
}
UPDATABLE = ("status", "version", "parent", "error", "timings", "evaluation", "progress", "report")


@dataclass
class Job:
    job_id: str
    status: str = "queued"
    documents: list[str] = field(default_factory=list)  # document ids, in ingestion order
    settings: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    version: int | None = None
    parent: int | None = None
    error: str | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    progress: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None
    # who the key belongs to, as recorded by /ingest: "key:<key id>" (the key is prefixed with it) or
    # "anonymous"; None on records written before keys were scoped (see find_by_idempotency_key)
    idempotency_scope: str | None = None
    body_sha256: str | None = None
    request_id: str | None = None  # X-Request-ID of the ingest (memfit/logs.py): the worker logs it
    attempts: int = 0
    # starts since the job was last put in the queue (created, retried, or handed back by a stopping
    # runner): every start but the last died with its process (workers.pipeline: MEMFIT_MAX_ATTEMPTS)
    deliveries: int = 0
    seq: int = 0  # creation order in the log

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


class Folded:
    """A finished job as every process holds it: its record as JSON, zlib-compressed, with the two
    fields reads filter on. Decoded into a Job (a fresh copy) when asked for. A finished job with
    its evaluation took ~6 KB as a Job; this ~0.8 KB (test_joblog_compaction.py::
    test_finished_jobs_are_held_compactly). Jobs still to run stay Job objects."""

    __slots__ = ("seq", "status", "blob")
    terminal = True

    def __init__(self, seq: int, status: str, record: bytes) -> None:
        self.seq = seq
        self.status = sys.intern(status)
        self.blob = zlib.compress(record, 1)

    @classmethod
    def of(cls, job: Job) -> Folded:
        # the fields' values came from JSON (the log's lines): no deep copy needed to encode them
        fields = {k: getattr(job, k) for k in _JOB_FIELDS}
        return cls(job.seq, job.status, json.dumps(fields, separators=(",", ":")).encode())

    def to_dict(self) -> dict[str, Any]:
        d = json.loads(zlib.decompress(self.blob))
        return {k: d[k] for k in _JOB_FIELDS if k in d}

    def job(self) -> Job:
        return Job(**self.to_dict())


_JOB_FIELDS = tuple(Job.__dataclass_fields__)


def held(job: Job) -> Job | Folded:
    return Folded.of(job) if job.terminal else job


def new_job_id() -> str:
    return "j_" + uuid.uuid4().hex[:16]


def new_document_id() -> str:
    return "doc_" + uuid.uuid4().hex[:16]


def document_records(documents: list[dict[str, Any]], job_id: str, now: float) -> list[dict[str, Any]]:
    """The documents.jsonl records of a job's documents (an id given to those without one)."""
    records: list[dict[str, Any]] = []
    for d in documents:
        if "text" not in d:
            raise ValueError(f"document {d.get('id', len(records))} has no text")
        records.append(
            {
                "id": str(d.get("id") or new_document_id()),
                "text": d["text"],
                "facts": list(d.get("facts") or []),
                "metadata": dict(d.get("metadata") or {}),
                "time": now,
                "job_id": job_id,
            }
        )
    return records


def apply_update(job: Job, rec: dict[str, Any]) -> bool:
    """Apply an `update` event to `job`; False (nothing applied) when its status change is not a
    valid transition from the job's state."""
    before = job.status
    status = rec.get("fields", {}).get("status")
    if status is not None and status not in TRANSITIONS.get(before, set()):
        return False
    for k, v in (rec.get("fields") or {}).items():
        if k in UPDATABLE:
            setattr(job, k, v)
    if status == "running":
        job.attempts += 1
        job.deliveries += 1
    elif status == "queued" and before != "queued":
        job.deliveries = 0
    job.updated_at = rec.get("time", job.updated_at)
    return True


def write_snapshot_file(
    path: Path,
    header: dict[str, Any],
    jobs: Iterable[Job | Folded],
    doc_index: dict[str, list[tuple[str | None, int, int]]],
    generation: int,
) -> int:
    """Write a snapshot (header, one line per job in creation order, one per document record, the end
    record) to `path` and fsync it; returns its size."""
    with open(path, "wb") as f:

        def put(rec: dict[str, Any]) -> None:
            f.write(json.dumps(rec, default=str, separators=(",", ":")).encode() + b"\n")

        put(header)
        for job in sorted(jobs, key=lambda j: j.seq):
            put({"j": job.to_dict()})
        for doc_id, refs in doc_index.items():
            for jid, off, n in refs:
                put({"d": [doc_id, jid, off, n]})
        put({"end": generation})
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


def held_from_snapshot(line: bytes, j: dict[str, Any]) -> Job | Folded:
    """A snapshot's job line as held in memory: a finished job folded straight from its line (no Job
    built), one still to run as its Job."""
    if j.get("status") in TERMINAL:
        raw = line.rstrip(b"\n")
        ok = raw.startswith(b'{"j":') and raw.endswith(b"}")  # as write_snapshot_file writes it
        record = raw[5:-1] if ok else json.dumps(j).encode()
        return Folded(int(j.get("seq", 0)), j["status"], record)
    return Job(**{k: v for k, v in j.items() if k in Job.__dataclass_fields__})


def segment_header(generation: int) -> bytes:
    """The first line of a jobs.jsonl written by a compaction (a log without one is generation 0)."""
    return json.dumps({"event": "segment", "generation": generation}, separators=(",", ":")).encode() + b"\n"


def segment_generation(head: bytes) -> tuple[int, int]:
    """(generation, header length) from the first bytes of a jobs.jsonl."""
    if head.startswith(_SEGMENT_PREFIX):
        nl = head.find(b"\n")
        if nl > 0:
            with contextlib.suppress(ValueError, TypeError):
                return int(json.loads(head[:nl])["generation"]), nl + 1
    return 0, 0


def snapshot_generation(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return int(json.loads(f.readline()).get("generation", 0))
    except (OSError, ValueError, AttributeError):
        return 0
