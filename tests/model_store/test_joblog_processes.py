"""The job log written by several processes at once (issue 17: API replicas and workers share one
store; the job log was safe only inside one process, behind a threading lock).

Real processes (multiprocessing, fork) on one log directory, started together by a barrier:
- N processes appending jobs, documents and updates concurrently: nothing lost, nothing torn;
- an Idempotency-Key claimed by N processes at once gives one job (before: several, since each
  process checked its own view and appended);
- racing state changes from one state are a compare-and-set: exactly one wins, the others get
  InvalidTransition (before: every process "won" and the log held cancelled -> failed);
- replaying a log that holds an invalid transition (written before the file lock) skips it.
"""

from __future__ import annotations

import json
import multiprocessing as mp

import pytest

from model_store import InvalidTransition
from model_store.joblog import JobLog

N_PROCS = 6
ctx = mp.get_context("fork")


def _run(target, args_per_proc: list[tuple]) -> list:
    barrier = ctx.Barrier(len(args_per_proc))
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(barrier, out, *a)) for a in args_per_proc]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0, p.exitcode
    return results


def _append_many(barrier, out, log_dir, worker: int, n: int) -> None:
    log = JobLog(log_dir)
    barrier.wait()
    ids = []
    for i in range(n):
        text = f"worker {worker} document {i} " + "x" * (3000 + 37 * i)  # records of a few KB
        job = log.create_job(None, [{"id": f"w{worker}-d{i}", "text": text}], settings={"steps": i})
        log.update(job.job_id, status="running", progress={"phase": "training", "by": worker})
        ids.append(job.job_id)
    out.put((worker, ids))


def test_n_processes_append_concurrently_nothing_lost_or_torn(tmp_path):
    n = 60
    results = _run(_append_many, [(tmp_path, w, n) for w in range(N_PROCS)])
    log = JobLog(tmp_path)  # a fresh replay of everything written
    assert log.bad_lines == 0 and log.invalid_transitions == 0
    jobs = log.list(limit=None)
    assert len(jobs) == N_PROCS * n
    for worker, ids in results:
        for i, job_id in enumerate(ids):
            job = log.get(job_id)
            assert job.status == "running" and job.attempts == 1 and job.progress["by"] == worker
            assert job.settings == {"steps": i}
            (doc,) = log.documents(job.documents, job_id=job_id)
            assert doc["text"].startswith(f"worker {worker} document {i} ") and len(doc["text"]) == (
                len(f"worker {worker} document {i} ") + 3000 + 37 * i
            )
    for path in (tmp_path / "jobs.jsonl", tmp_path / "documents.jsonl"):
        lines = path.read_bytes().split(b"\n")
        assert lines[-1] == b"" and all(json.loads(x) for x in lines[:-1])  # every line whole


def _claim(barrier, out, log_dir, worker: int, rounds: int) -> None:
    log = JobLog(log_dir)
    got = []
    for r in range(rounds):
        barrier.wait()
        job = log.create_job(None, [{"text": f"round {r}"}], idempotency_key=f"key-{r}", body_sha256=f"h{r}")
        got.append(job.job_id)
    out.put((worker, got))


def test_idempotency_key_is_claimed_once_across_processes(tmp_path):
    rounds = 15
    results = _run(_claim, [(tmp_path, w, rounds) for w in range(N_PROCS)])
    log = JobLog(tmp_path)
    for r in range(rounds):
        ids = {got[r] for _, got in results}
        assert len(ids) == 1, (r, ids)  # every process got the same job for key-r
    assert len(log.list(limit=None)) == rounds  # one job per key in the log


def _race(barrier, out, log_dir, worker: int, job_ids: list[str]) -> None:
    log = JobLog(log_dir)
    wins = []
    for job_id in job_ids:
        barrier.wait()
        try:
            if worker % 2:
                log.cancel(job_id)
            else:
                log.update(job_id, status="failed", error=f"by {worker}")
            wins.append(job_id)
        except InvalidTransition:
            pass
    out.put((worker, wins))


def test_racing_state_changes_are_compare_and_set(tmp_path):
    log = JobLog(tmp_path)
    job_ids = [log.create_job(None, [{"text": f"t{i}"}]).job_id for i in range(40)]
    results = _run(_race, [(tmp_path, w, job_ids) for w in range(N_PROCS)])
    fresh = JobLog(tmp_path)
    for job_id in job_ids:
        winners = [w for w, wins in results if job_id in wins]
        assert len(winners) == 1, (job_id, winners)  # queued -> cancelled | failed, once
        expected = "cancelled" if winners[0] % 2 else "failed"
        assert fresh.get(job_id).status == expected
    assert fresh.invalid_transitions == 0  # nothing invalid was written


def test_replay_skips_an_invalid_transition(tmp_path):
    log = JobLog(tmp_path)
    job = log.create_job("j1", [{"text": "a"}])
    log.cancel(job.job_id)
    # what two unlocked writers could leave: a change valid only in a stale view (queued -> running)
    from model_store.fsutil import append_jsonl

    append_jsonl(
        tmp_path / "jobs.jsonl",
        [{"event": "update", "time": 1.0, "job_id": "j1", "fields": {"status": "running", "version": 3}}],
    )
    fresh = JobLog(tmp_path)
    j = fresh.get("j1")
    assert j.status == "cancelled" and j.version is None and fresh.invalid_transitions == 1
    with pytest.raises(InvalidTransition):
        fresh.update("j1", status="running")
