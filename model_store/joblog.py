"""The durable job record: documents as ingested and job events, append-only JSONL with fsync.

`STORE/log/documents.jsonl` holds every ingested document (id, text, facts, metadata, time, job_id):
the source of truth for replay and document revert, never rewritten. `STORE/log/jobs.jsonl` holds
job events (`create`, then `update`s); the current state of a job is the fold of its events, so jobs
survive restarts. `create_job` returns only after both appends are fsynced.

Memory: a process keeps every job's folded state and, per document record, its id, job id, byte
offset and length in documents.jsonl, never its text: `documents()` / `document()` read the
records from the file when a job runs (a few hundred bytes held per document, whatever its size).
A finished job's state is held as its compressed JSON record (`Folded`, ~0.8 KB with a full
evaluation, where the Job took ~6 KB) and decoded when read; jobs still to run are Job objects.

Compaction: `compact()` (automatic after a write once the events since the last snapshot pass
`compact_bytes` and the snapshot's size) folds every job's state and the document offsets into
`STORE/log/jobs.snapshot.jsonl` and starts jobs.jsonl afresh, as generation N+1 (its first line
`{"event":"segment","generation":N+1}`; a log without that line is generation 0). Opening the log
loads the snapshot, then replays only the events after it. Crash-safe: temp files fsynced, the
snapshot renamed first (it records which segment and offset it covers, so the old jobs.jsonl,
still in place if the process dies before the second rename, is replayed from there), then the
new segment; see compact(). Another process notices the new generation on its next read (the
header is read with every refresh) and reloads from the snapshot.

The Job record, its states and the formats of the lines are in model_store/jobrecord.py.

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
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock
from filelock import Timeout as FileLockTimeout

from .errors import IdempotencyConflict, InvalidTransition, LockTimeout, StoreError
from .fsutil import JsonlReader, append_jsonl, crash_point, fsync_dir, read_record_at
from .jobrecord import (
    SNAPSHOT_FORMAT,
    STATUSES,
    TERMINAL,
    TRANSITIONS,
    UPDATABLE,
    Folded,
    Job,
    apply_update,
    document_records,
    held,
    held_from_snapshot,
    new_document_id,
    new_job_id,
    segment_generation,
    segment_header,
    snapshot_generation,
    write_snapshot_file,
)

__all__ = [
    "COMPACT_BYTES",
    "COMPACT_STEPS",
    "STATUSES",
    "TERMINAL",
    "TRANSITIONS",
    "UPDATABLE",
    "Job",
    "JobLog",
    "new_document_id",
    "new_job_id",
]

log = logging.getLogger("memfit.store.joblog")

LOCK_TIMEOUT_S = 60.0  # a write waiting longer for the job log's file lock raises LockTimeout
# compact when the events appended since the last snapshot pass this many bytes (or the snapshot's
# own size, whichever is larger: rewriting the snapshot then costs at most what was appended)
COMPACT_BYTES = 16 << 20
# MEMFIT_CRASH_AT points inside compact(), in order (crash-safety tests)
COMPACT_STEPS = (
    "compact:snapshot_written",
    "compact:segment_written",
    "compact:snapshot_renamed",
    "compact:done",
)


class JobLog:
    def __init__(self, log_dir: str | Path, compact_bytes: int | None = COMPACT_BYTES) -> None:
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jobs_path = self.dir / "jobs.jsonl"
        self.documents_path = self.dir / "documents.jsonl"
        self.snapshot_path = self.dir / "jobs.snapshot.jsonl"
        self.compact_bytes = compact_bytes  # None or 0: compact() only when called
        self._lock = threading.RLock()
        # across processes: held (after _lock) from the check to the fsync of every write
        self._plock = FileLock(str(self.dir / ".jobs.lock"), timeout=LOCK_TIMEOUT_S, thread_local=False)
        self.compactions = 0  # done by this object
        self.reloads = 0  # snapshot loads (at open, and after another process compacted)
        self._compact_at: int | None = None  # after a failed compaction: the next try's size
        self._reset()
        self.refresh()

    def _reset(self) -> None:
        """Empty in-memory state: what a log with no snapshot and no events folds to."""
        self.invalid_transitions = 0
        # a finished job is held folded (Folded: compressed), one still to run as its Job
        self._jobs: dict[str, Job | Folded] = {}
        self._by_key: dict[str, str] = {}
        # document id -> [(job id, byte offset, length) of each record in documents.jsonl]: offsets,
        # never the texts (read from the file when a job runs, documents())
        self._doc_index: dict[str, list[tuple[str | None, int, int]]] = {}
        self._docs_reader = JsonlReader(self.documents_path)
        self._seq = 0
        self._snap_gen = 0  # generation of the snapshot loaded (0: none)
        self._snap_bytes = 0
        self._covers: tuple[int, int] = (0, 0)  # (segment generation, offset) the snapshot folded in
        self._seg_gen: int | None = None  # generation of the jobs.jsonl being read; None: not opened yet
        self._seg_start = 0  # where the events not in the snapshot start in that segment
        self._jobs_reader = JsonlReader(self.jobs_path)
        self._bad_before = 0  # unreadable lines counted before the snapshot

    # -- replay ------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Fold in records appended since the last read (by this or another process); after another
        process compacted the log (jobs.jsonl is a new generation), reload from its snapshot."""
        with self._lock:
            for _ in range(20):
                if self._seg_gen is None:
                    self._load_snapshot()
                self._read_documents()
                if self._read_jobs():
                    return
                self._seg_gen = None  # compacted meanwhile: load the newer snapshot
            with self._locked():  # compactions hold the lock: under it the files are consistent
                self._load_snapshot()
                self._read_documents()
                if not self._read_jobs():
                    raise StoreError(
                        f"job log {self.dir}: jobs.jsonl does not follow {self.snapshot_path.name}"
                    )

    def _read_documents(self) -> None:
        for off, n, rec in self._docs_reader.read_new_spans():
            if "id" in rec:
                jid = rec.get("job_id")
                ref = (sys.intern(str(jid)) if jid is not None else None, off, n)
                self._doc_index.setdefault(str(rec["id"]), []).append(ref)

    def _read_jobs(self) -> bool:
        """Apply the events appended to jobs.jsonl; False when it is not the segment being read (or,
        right after a snapshot load, not one that follows the snapshot)."""
        try:
            f = open(self.jobs_path, "rb")
        except FileNotFoundError:
            if self._seg_gen is None:
                self._seg_gen, self._seg_start = self._snap_gen, 0
                self._jobs_reader.offset = 0
            return True
        with f:
            head = os.pread(f.fileno(), 128, 0)
            gen, header_len = segment_generation(head)
            if self._seg_gen is None:
                if gen == self._snap_gen:  # both 0: no snapshot, a log without segment header
                    start = header_len
                elif self._snap_gen and gen == self._covers[0]:
                    start = self._covers[1]
                else:
                    return False
                self._seg_gen, self._seg_start = gen, start
                self._jobs_reader.offset = start
            elif gen != self._seg_gen:
                return False
            for rec in self._jobs_reader.read_new(f):
                self._apply(rec)
        return True

    def _load_snapshot(self) -> None:
        """Reset to the state the snapshot holds (empty without one)."""
        self._reset()
        self.reloads += 1
        try:
            f = open(self.snapshot_path, "rb")
        except FileNotFoundError:
            return
        with f:
            header = json.loads(f.readline())
            if not isinstance(header, dict) or header.get("snapshot") != SNAPSHOT_FORMAT:
                raise StoreError(f"{self.snapshot_path}: not a job log snapshot of format {SNAPSHOT_FORMAT}")
            complete = False
            for line in f:
                rec = json.loads(line)
                if "j" in rec:
                    j = rec["j"]
                    self._jobs[j["job_id"]] = held_from_snapshot(line, j)
                    if j.get("idempotency_key"):
                        self._by_key[j["idempotency_key"]] = j["job_id"]
                elif "d" in rec:
                    doc_id, jid, off, n = rec["d"]
                    ref = (sys.intern(jid) if jid is not None else None, int(off), int(n))
                    self._doc_index.setdefault(str(doc_id), []).append(ref)
                elif "end" in rec:
                    complete = rec["end"] == header["generation"]
            if not complete:  # written to a temp file, fsynced and renamed: only damage gets here
                raise StoreError(
                    f"{self.snapshot_path} is incomplete (no end record): the job log cannot be read"
                )
            self._snap_bytes = f.tell()
        self._snap_gen = int(header["generation"])
        covers = header.get("covers") or {}
        self._covers = (int(covers.get("generation", 0)), int(covers.get("offset", 0)))
        self._seq = int(header.get("seq", 0))
        self.invalid_transitions = int(header.get("invalid_transitions", 0))
        self._bad_before = int(header.get("bad_lines", 0))
        self._docs_reader.offset = int(header.get("documents_offset", 0))

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
            self._jobs[job.job_id] = held(job)
            if job.idempotency_key:
                self._by_key[job.idempotency_key] = job.job_id
        elif ev == "update":
            found = self._job(str(rec.get("job_id")))
            if found is None:
                return
            if not apply_update(found, rec):
                self.invalid_transitions += 1  # a racing write from before the file lock: not applied
                return
            self._jobs[found.job_id] = held(found)  # folded once finished (a retry unfolds it)

    def _job(self, job_id: str) -> Job | None:
        """The job's current state (a fresh Job for a finished one, else the one held)."""
        held = self._jobs.get(job_id)
        return held.job() if isinstance(held, Folded) else held

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
        return self._bad_before + self._jobs_reader.bad_lines + self._docs_reader.bad_lines

    # -- compaction --------------------------------------------------------------------------------
    def compact(self) -> dict[str, Any]:
        """Fold every job's events into a new snapshot and start an empty jobs.jsonl, so that opening
        the log reads one record per job (and per document record: its offset) instead of replaying
        the whole history. documents.jsonl is the store of the texts and is never rewritten.

        Crash-safe, under the file lock: (1) the snapshot is written to a temp file and fsynced;
        (2) so is the new segment, a header line naming the new generation; (3) the snapshot is
        renamed into place (directory fsynced): from here a reader loads it and replays the old
        jobs.jsonl from the offset the snapshot covers (`covers`); (4) the segment is renamed over
        jobs.jsonl. A crash before (3) leaves the old files (temp files are removed by the next
        compaction); between (3) and (4) the old jobs.jsonl still follows the new snapshot, and
        what other processes append to it meanwhile is replayed too. Returns a summary."""
        with self.transaction():
            return self._compact()

    def _compact(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        assert self._seg_gen is not None
        for p in self.dir.glob(f".{self.snapshot_path.name}.tmp-*"):
            p.unlink(missing_ok=True)  # left by a compaction that died (none runs: we hold the lock)
        for p in self.dir.glob(f".{self.jobs_path.name}.tmp-*"):
            p.unlink(missing_ok=True)
        gen = max(self._snap_gen, self._seg_gen, snapshot_generation(self.snapshot_path)) + 1
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        snap_tmp = self.dir / f".{self.snapshot_path.name}.tmp-{tag}"
        seg_tmp = self.dir / f".{self.jobs_path.name}.tmp-{tag}"
        n_docs = sum(len(v) for v in self._doc_index.values())
        header = {
            "snapshot": SNAPSHOT_FORMAT,
            "generation": gen,
            "covers": {"generation": self._seg_gen, "offset": self._jobs_reader.offset},
            "documents_offset": self._docs_reader.offset,
            "seq": self._seq,
            "invalid_transitions": self.invalid_transitions,
            "bad_lines": self.bad_lines,
            "time": time.time(),
            "jobs": len(self._jobs),
            "documents": n_docs,
        }
        seg_header = segment_header(gen)
        renamed = False
        try:
            snap_bytes = write_snapshot_file(snap_tmp, header, self._jobs.values(), self._doc_index, gen)
            crash_point(COMPACT_STEPS[0])
            with open(seg_tmp, "wb") as f:
                f.write(seg_header)
                f.flush()
                os.fsync(f.fileno())
            crash_point(COMPACT_STEPS[1])
            os.replace(snap_tmp, self.snapshot_path)
            renamed = True
            self._snap_gen = gen  # generations stay unique even if the next step fails
            self._covers = (self._seg_gen, self._jobs_reader.offset)
            fsync_dir(self.dir)
            crash_point(COMPACT_STEPS[2])
            os.replace(seg_tmp, self.jobs_path)
            fsync_dir(self.dir)
            crash_point(COMPACT_STEPS[3])
        except BaseException:
            for p in (seg_tmp, snap_tmp):
                with contextlib.suppress(OSError):
                    p.unlink(missing_ok=True)
            if renamed:  # the old jobs.jsonl still follows the new snapshot: keep reading it
                self._snap_bytes = snap_bytes
            raise
        folded = self._jobs_reader.offset - self._seg_start
        self._snap_bytes = snap_bytes
        self._bad_before = self.bad_lines
        self._seg_gen, self._seg_start = gen, len(seg_header)
        self._jobs_reader = JsonlReader(self.jobs_path)
        self._jobs_reader.offset = len(seg_header)
        self._docs_reader.bad_lines = 0
        self.compactions += 1
        self._compact_at = None
        out = {
            "generation": gen,
            "jobs": len(self._jobs),
            "documents": n_docs,
            "events_bytes_folded": folded,
            "snapshot_bytes": snap_bytes,
            "seconds": round(time.perf_counter() - t0, 4),
        }
        log.info("job log %s compacted: %s", self.dir, out)
        return out

    def _maybe_compact(self) -> None:
        """After a write (under the lock): compact once the events since the snapshot outgrow
        compact_bytes and the snapshot itself. A failure is logged (the write is recorded already);
        the next try waits for another compact_bytes of events."""
        if not self.compact_bytes or self._seg_gen is None:
            return
        grown = self._jobs_reader.offset - self._seg_start
        if grown < max(self.compact_bytes, self._snap_bytes) or grown < (self._compact_at or 0):
            return
        try:
            self._compact()
        except Exception as e:
            self._compact_at = grown + self.compact_bytes
            log.warning(
                "job log %s: compaction failed (%s: %s); the log stays as it was",
                self.dir,
                type(e).__name__,
                e,
            )

    def _append_events(self, records: builtins.list[dict[str, Any]]) -> None:
        if self._seg_gen and not (self.jobs_path.exists() and self.jobs_path.stat().st_size):
            records = [json.loads(segment_header(self._seg_gen)), *records]  # the file went missing
        append_jsonl(self.jobs_path, records)

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
            doc_records = document_records(documents, job_id, now)
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
            self._append_events([{"event": "create", "time": now, "job": d}])
            self.refresh()
            created = self._job(job_id)
            assert created is not None
            self._maybe_compact()
            return created

    def update(self, job_id: str, **fields: Any) -> Job:
        """Append an update event; `status` must follow the state machine (InvalidTransition if not)."""
        unknown = set(fields) - set(UPDATABLE)
        if unknown:
            raise ValueError(f"unknown job fields {sorted(unknown)}; allowed: {list(UPDATABLE)}")
        with self._lock, self._locked():
            self.refresh()
            job = self._job(job_id)
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
            self._append_events(
                [{"event": "update", "time": time.time(), "job_id": job_id, "fields": fields}]
            )
            self.refresh()
            job = self._job(job_id)
            assert job is not None
            self._maybe_compact()
            return job

    def cancel(self, job_id: str) -> Job:
        return self.update(job_id, status="cancelled")

    def request_cancel(self, job_id: str, flag_queued: bool = False) -> Job:
        """What an API replica's cancel writes, as one compare-and-set under the log's locks (like
        every state change): queued -> cancelled at once (or, with `flag_queued`, flagged: a runner
        of this process has picked it and marks it running next); running -> flagged,
        `progress.cancel_requested` added to the progress as it is now (the pipeline stops at its
        next step boundary). A finished job raises InvalidTransition, an unknown one KeyError.

        Read, check and write hold the lock, so a worker's write cannot land in between: before, a
        cancel that read `running` and wrote after the worker recorded `succeeded` answered 200
        with the finished job, and replaced the worker's final progress with its stale copy."""
        with self._lock, self._locked():
            job = self.get(job_id)  # refreshed under the lock: what every process has written
            if job is None:
                raise KeyError(job_id)
            if job.status == "queued" and not flag_queued:
                return self.update(job_id, status="cancelled")
            if job.status in ("queued", "running"):
                return self.update(job_id, progress={**(job.progress or {}), "cancel_requested": True})
            raise InvalidTransition(
                f"job {job_id} is {job.status}: only queued or running jobs can be cancelled"
            )

    def retry(self, job_id: str) -> Job:
        return self.update(job_id, status="queued")

    # -- reads -------------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        with self._lock:
            self.refresh()
            return self._job(job_id)

    def list(self, limit: int | None = 50, status: str | None = None) -> builtins.list[Job]:
        """Most recent first (only the jobs returned are decoded)."""
        with self._lock:
            self.refresh()
            held = sorted(self._jobs.values(), key=lambda j: j.seq, reverse=True)
        if status is not None:
            held = [j for j in held if j.status == status]
        if limit is not None:
            held = held[:limit]
        return [j.job() if isinstance(j, Folded) else j for j in held]

    def counts(self) -> dict[str, int]:
        """Jobs per status (without decoding the finished ones)."""
        with self._lock:
            self.refresh()
            return dict(Counter(j.status for j in self._jobs.values()))

    def find_by_idempotency_key(self, key: str, legacy_key: str | None = None) -> Job | None:
        """The job recorded with `key`; else, with `legacy_key`, the job recorded under that key
        before keys were scoped to the caller (no `idempotency_scope`: /ingest wrote the raw
        Idempotency-Key then), so a client's retry across the upgrade gets its job, not a second
        one. A record of today's code under the raw key (an anonymous caller) is not a match."""
        with self._lock:
            self.refresh()
            jid = self._by_key.get(key)
            if jid is None and legacy_key is not None:
                old = self._job(self._by_key.get(legacy_key) or "")
                if old is not None and old.idempotency_scope is None:
                    return old
            return self._job(jid) if jid else None

    def queued(self, include_running: bool = True) -> builtins.list[Job]:
        """Jobs still to run, oldest first; `running` ones were interrupted by a restart."""
        states = ("queued", "running") if include_running else ("queued",)
        with self._lock:
            self.refresh()
            # never a finished (folded) one: `states` holds no terminal status
            return sorted(
                (j for j in self._jobs.values() if isinstance(j, Job) and j.status in states),
                key=lambda j: j.seq,
            )

    def document(self, doc_id: str) -> dict[str, Any] | None:
        """The latest ingested record of a document id (read from documents.jsonl)."""
        with self._lock:
            self.refresh()
            refs = self._doc_index.get(str(doc_id))
            if not refs:
                return None
            return self._read_records([refs[-1]])[0]

    def documents(self, ids: builtins.list[str], job_id: str | None = None) -> builtins.list[dict[str, Any]]:
        """Records for `ids` in that order (the one from `job_id` when a document id was reused),
        read from documents.jsonl at the offsets kept in memory."""
        with self._lock:
            self.refresh()
            refs = []
            for i in ids:
                recs = self._doc_index.get(str(i), [])
                if job_id is not None:
                    match = [r for r in recs if r[0] == job_id]
                    recs = match or recs
                if not recs:
                    raise KeyError(f"document {i} is not in the document log")
                refs.append(recs[-1])
            return self._read_records(refs)

    def _read_records(
        self, refs: builtins.list[tuple[str | None, int, int]]
    ) -> builtins.list[dict[str, Any]]:
        with open(self.documents_path, "rb") as f:
            return [read_record_at(f, off, n) for _, off, n in refs]

    def jobs_of_document(self, doc_id: str) -> builtins.list[str]:
        with self._lock:
            self.refresh()
            return [str(jid) for jid, _, _ in self._doc_index.get(str(doc_id), [])]
