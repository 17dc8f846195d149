"""The durable job record: documents as ingested and job events, append-only JSONL with fsync.

`STORE/log/documents.jsonl` holds every ingested document (id, text, facts, metadata, time, job_id):
the source of truth for replay and document revert. `STORE/log/jobs.jsonl` holds job events
(`create`, then `update`s); the current state of a job is the fold of its events, replayed from the
file on open, so jobs survive restarts. `create_job` returns only after both appends are fsynced.

Concurrency: one process with threads is serialised by a lock; several processes (API replicas and
workers on one shared store) by an exclusive file lock, `log/.jobs.lock`, held across every write:
fold in what others appended (`refresh()`), check (the Idempotency-Key lookup, the state transition),
append, fsync. So a key is claimed once across processes, and a state change is a compare-and-set
on the state every process sees: of two racing changes from the same state, the second is refused
(InvalidTransition) when the first one made it invalid. Appends never interleave, also where
O_APPEND is not atomic (NFS: a client computes the offset from its cached size; the lock makes it
revalidate). Readers need no lock: they consume complete lines only. Replaying the log applies a
state change only when it is a valid transition from the folded state (logs written before the lock
may hold racing ones; they are counted in `invalid_transitions`). A crash mid-append leaves a
truncated last line: it is skipped, never fatal.

State machine: queued -> running -> succeeded | rejected | failed | cancelled; queued -> cancelled;
retry: failed | cancelled -> queued; a job found `running` after a restart was interrupted and is
returned by `queued()` so that the runner starts it again (its work is idempotent by job id).
"""

from __future__ import annotations

import builtins
import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock
from filelock import Timeout as FileLockTimeout

from .errors import IdempotencyConflict, InvalidTransition, LockTimeout, StoreError
from .fsutil import JsonlReader, append_jsonl

LOCK_TIMEOUT_S = 60.0  # a write waiting longer for the job log's file lock raises LockTimeout

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
    request_id: str | None = None  # X-Request-ID of the ingest (service/logs.py): the worker logs it
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


def new_job_id() -> str:
    return "j_" + uuid.uuid4().hex[:16]


def new_document_id() -> str:
    return "doc_" + uuid.uuid4().hex[:16]


class JobLog:
    def __init__(self, log_dir: str | Path) -> None:
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jobs_path = self.dir / "jobs.jsonl"
        self.documents_path = self.dir / "documents.jsonl"
        self._lock = threading.RLock()
        # across processes: held (after _lock) from the check to the fsync of every write
        self._plock = FileLock(str(self.dir / ".jobs.lock"), timeout=LOCK_TIMEOUT_S, thread_local=False)
        self.invalid_transitions = 0
        self._jobs: dict[str, Job] = {}
        self._by_key: dict[str, str] = {}
        self._docs: dict[str, list[dict[str, Any]]] = {}
        self._jobs_reader = JsonlReader(self.jobs_path)
        self._docs_reader = JsonlReader(self.documents_path)
        self._seq = 0
        self.refresh()

    # -- replay ------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Fold in records appended since the last read (by this or another process)."""
        with self._lock:
            for rec in self._docs_reader.read_new():
                if "id" in rec:
                    self._docs.setdefault(str(rec["id"]), []).append(rec)
            for rec in self._jobs_reader.read_new():
                self._apply(rec)

    def _apply(self, rec: dict[str, Any]) -> None:
        ev = rec.get("event")
        if ev == "create":
            j = rec.get("job") or {}
            known = {k: v for k, v in j.items() if k in Job.__dataclass_fields__}
            if "job_id" not in known or known["job_id"] in self._jobs:
                return
            self._seq += 1
            job = Job(**known)
            job.seq = self._seq
            self._jobs[job.job_id] = job
            if job.idempotency_key:
                self._by_key[job.idempotency_key] = job.job_id
        elif ev == "update":
            found = self._jobs.get(str(rec.get("job_id")))
            if found is None:
                return
            job = found
            before = job.status
            status = rec.get("fields", {}).get("status")
            if status is not None and status not in TRANSITIONS.get(before, set()):
                self.invalid_transitions += 1  # a racing write from before the file lock: not applied
                return
            for k, v in (rec.get("fields") or {}).items():
                if k in UPDATABLE:
                    setattr(job, k, v)
            if status == "running":
                job.attempts += 1
                job.deliveries += 1
            elif status == "queued" and before != "queued":
                job.deliveries = 0
            job.updated_at = rec.get("time", job.updated_at)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The job log's file lock (every process writing this log takes it; re-entrant here)."""
        try:
            self._plock.acquire()
        except FileLockTimeout:
            raise LockTimeout(
                f"job log lock {self._plock.lock_file} not acquired within {LOCK_TIMEOUT_S} s"
            ) from None
        try:
            yield
        finally:
            self._plock.release()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Hold the job log's locks (this process's and the file lock) across several reads and
        writes, with everything other processes appended folded in first: no other writer can change
        a job between a check made here and the writes that follow it (workers.batching)."""
        with self._lock, self._locked():
            self.refresh()
            yield

    @property
    def bad_lines(self) -> int:
        return self._jobs_reader.bad_lines + self._docs_reader.bad_lines

    # -- writes ------------------------------------------------------------------------------------
    def create_job(
        self,
        job_id: str | None,
        documents: list[dict[str, Any]],
        settings: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        body_sha256: str | None = None,
        request_id: str | None = None,
        idempotency_scope: str | None = None,
        legacy_key: str | None = None,
    ) -> Job:
        """Record the documents, then the job, both fsynced, before returning the queued Job.

        Documents without an "id" get one. With an idempotency key already used (or `legacy_key`
        recorded before keys were scoped, see find_by_idempotency_key): the same body hash returns
        the existing job; a different one raises IdempotencyConflict.
        """
        with self._lock, self._locked():
            self.refresh()
            if idempotency_key is not None:
                existing = self.find_by_idempotency_key(idempotency_key, legacy_key)
                if existing is not None:
                    if body_sha256 is not None and existing.body_sha256 not in (None, body_sha256):
                        raise IdempotencyConflict(idempotency_key, existing.job_id)
                    return existing
            job_id = job_id or new_job_id()
            if job_id in self._jobs:
                raise StoreError(f"job {job_id} already exists")
            now = time.time()
            doc_records: builtins.list[dict[str, Any]] = []
            for d in documents:
                if "text" not in d:
                    raise ValueError(f"document {d.get('id', len(doc_records))} has no text")
                doc_records.append(
                    {
                        "id": str(d.get("id") or new_document_id()),
                        "text": d["text"],
                        "facts": list(d.get("facts") or []),
                        "metadata": dict(d.get("metadata") or {}),
                        "time": now,
                        "job_id": job_id,
                    }
                )
            job = Job(
                job_id=job_id,
                status="queued",
                documents=[r["id"] for r in doc_records],
                settings=dict(settings or {}),
                created_at=now,
                updated_at=now,
                idempotency_key=idempotency_key,
                idempotency_scope=idempotency_scope,
                body_sha256=body_sha256,
                request_id=request_id,
            )
            append_jsonl(self.documents_path, doc_records)
            d = job.to_dict()
            d.pop("seq")
            d.pop("deliveries")  # folded from the updates, like attempts
            append_jsonl(self.jobs_path, [{"event": "create", "time": now, "job": d}])
            self.refresh()
            return self._jobs[job_id]

    def update(self, job_id: str, **fields: Any) -> Job:
        """Append an update event; `status` must follow the state machine (InvalidTransition if not)."""
        unknown = set(fields) - set(UPDATABLE)
        if unknown:
            raise ValueError(f"unknown job fields {sorted(unknown)}; allowed: {list(UPDATABLE)}")
        with self._lock, self._locked():
            self.refresh()
            job = self._jobs.get(job_id)
            if job is None:
                raise KeyError(f"job {job_id} not found")
            new = fields.get("status")
            if new is not None:
                if new not in STATUSES:
                    raise ValueError(f"unknown job status {new!r}; one of {STATUSES}")
                if new not in TRANSITIONS[job.status]:
                    raise InvalidTransition(f"job {job_id}: {job.status} -> {new} is not allowed")
                if new == "queued" and job.status in ("failed", "cancelled"):
                    fields.setdefault("error", None)
            append_jsonl(
                self.jobs_path, [{"event": "update", "time": time.time(), "job_id": job_id, "fields": fields}]
            )
            self.refresh()
            return self._jobs[job_id]

    def cancel(self, job_id: str) -> Job:
        return self.update(job_id, status="cancelled")

    def retry(self, job_id: str) -> Job:
        return self.update(job_id, status="queued")

    # -- reads -------------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        with self._lock:
            self.refresh()
            return self._jobs.get(job_id)

    def list(self, limit: int | None = 50, status: str | None = None) -> builtins.list[Job]:
        """Most recent first."""
        with self._lock:
            self.refresh()
            jobs = sorted(self._jobs.values(), key=lambda j: j.seq, reverse=True)
        if status is not None:
            jobs = [j for j in jobs if j.status == status]
        return jobs if limit is None else jobs[:limit]

    def find_by_idempotency_key(self, key: str, legacy_key: str | None = None) -> Job | None:
        """The job recorded with `key`; else, with `legacy_key`, the job recorded under that key
        before keys were scoped to the caller (no `idempotency_scope`: /ingest wrote the raw
        Idempotency-Key then), so a client's retry across the upgrade gets its job, not a second
        one. A record of today's code under the raw key (an anonymous caller) is not a match."""
        with self._lock:
            self.refresh()
            jid = self._by_key.get(key)
            if jid is None and legacy_key is not None:
                old = self._jobs.get(self._by_key.get(legacy_key) or "")
                if old is not None and old.idempotency_scope is None:
                    return old
            return self._jobs.get(jid) if jid else None

    def queued(self, include_running: bool = True) -> builtins.list[Job]:
        """Jobs still to run, oldest first; `running` ones were interrupted by a restart."""
        states = ("queued", "running") if include_running else ("queued",)
        with self._lock:
            self.refresh()
            return sorted((j for j in self._jobs.values() if j.status in states), key=lambda j: j.seq)

    def document(self, doc_id: str) -> dict[str, Any] | None:
        """The latest ingested record of a document id."""
        with self._lock:
            self.refresh()
            recs = self._docs.get(str(doc_id))
            return recs[-1] if recs else None

    def documents(self, ids: builtins.list[str], job_id: str | None = None) -> builtins.list[dict[str, Any]]:
        """Records for `ids` in that order (the one from `job_id` when a document id was reused)."""
        with self._lock:
            self.refresh()
            out = []
            for i in ids:
                recs = self._docs.get(str(i), [])
                if job_id is not None:
                    match = [r for r in recs if r.get("job_id") == job_id]
                    recs = match or recs
                if not recs:
                    raise KeyError(f"document {i} is not in the document log")
                out.append(recs[-1])
            return out

    def jobs_of_document(self, doc_id: str) -> builtins.list[str]:
        with self._lock:
            self.refresh()
            return [r["job_id"] for r in self._docs.get(str(doc_id), [])]
