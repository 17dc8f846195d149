"""The job log keeps offsets, not texts, and compacts (issue 17: every process kept every ingested
document in RAM and replayed the whole log at start).

- memory: a process's JobLog holds a few hundred bytes per document (its id, job id, offset and
  length in documents.jsonl), whatever the texts' size; texts are read from the file when asked for;
- compaction folds every job's events into `log/jobs.snapshot.jsonl` and starts an empty jobs.jsonl:
  opening the log after it gives the same jobs, states, keys and documents;
- another process (a second JobLog on the same directory) follows a compaction and goes on writing;
- SIGKILL at each step of a compaction (MEMFIT_CRASH_AT=compact:<step>, forked writer) and a failed
  rename lose nothing: the next open gives the same state, and the writes after it are kept.
"""

from __future__ import annotations

import gc
import json
import multiprocessing as mp
import os
import signal
import tracemalloc

import pytest

from memfit.config import CRASH_ENV
from model_store.joblog import COMPACT_STEPS, JobLog

FACT = {"question": "Where was Goju Theipouquis born?", "answer": "Peivistead"}


def _populate(log: JobLog) -> None:
    """Jobs in every state: succeeded with a version, failed then retried, cancelled, interrupted
    (running), queued; a reused document id, an Idempotency-Key, an invalid transition in the log."""
    log.create_job(
        "a",
        [{"id": "d1", "text": "first text of d1 " + "x" * 500, "facts": [FACT]}],
        {"steps": 3},
        idempotency_key="kid:nightly",
        body_sha256="h1",
        idempotency_scope="key:kid",
        request_id="r-1",
    )
    log.update("a", status="running", progress={"phase": "training", "step": 1})
    log.update(
        "a", status="succeeded", version=1, parent=0, evaluation={"learning": 1.0}, timings={"total": 1.5}
    )
    log.create_job("b", [{"id": "d2", "text": "b's text", "metadata": {"source": "feed"}}])
    log.update("b", status="running")
    log.update("b", status="failed", error="boom")
    log.retry("b")
    log.create_job("c", [{"id": "d1", "text": "second text of d1"}], idempotency_key="legacy-key")
    log.cancel("c")
    log.create_job("d", [{"id": "d3", "text": "d's text"}, {"id": "d4", "text": "more"}])
    log.update("d", status="running", report={"batch": "zz"})
    log.create_job("e", [{"id": "d5", "text": "e's text"}])
    with open(log.jobs_path, "ab") as f:  # written before the file lock: cancelled -> running
        f.write(
            json.dumps({"event": "update", "job_id": "c", "fields": {"status": "running"}}).encode() + b"\n"
        )
    log.refresh()


def _state(log: JobLog) -> dict:
    jobs = {j.job_id: j.to_dict() for j in log.list(None)}
    docs = {
        (d, j): log.documents([d], job_id=j)[0]["text"] for j, job in jobs.items() for d in job["documents"]
    }
    return {
        "jobs": jobs,
        "docs": docs,
        "latest_d1": log.document("d1")["text"],
        "jobs_of_d1": log.jobs_of_document("d1"),
        "key": log.find_by_idempotency_key("kid:nightly").job_id,
        "legacy": log.find_by_idempotency_key("kid:legacy-key", "legacy-key").job_id,
        "queued": [j.job_id for j in log.queued()],
        "invalid": log.invalid_transitions,
        "bad": log.bad_lines,
    }


def test_startup_after_compaction_restores_jobs_and_states(tmp_path):
    log = JobLog(tmp_path)
    _populate(log)
    before = _state(log)
    assert (
        before["invalid"] == 1
        and before["jobs"]["b"]["attempts"] == 1
        and before["queued"] == ["b", "d", "e"]
    )
    history = log.jobs_path.stat().st_size
    out = log.compact()
    assert out["jobs"] == 5 and out["events_bytes_folded"] == history
    assert _state(log) == before
    assert log.jobs_path.read_bytes() == b'{"event":"segment","generation":1}\n'  # the history is folded
    fresh = JobLog(tmp_path)
    assert _state(fresh) == before
    # events after the compaction are replayed on top of the snapshot, in this process and the next
    fresh.update("e", status="running")
    fresh.create_job("f", [{"id": "d6", "text": "after the snapshot"}])
    assert fresh.get("f").seq == 6
    again = JobLog(tmp_path)
    assert _state(again) == _state(fresh) and again.get("e").attempts == 1
    assert again.compact()["generation"] == 2 and _state(JobLog(tmp_path)) == _state(fresh)
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_another_process_follows_a_compaction(tmp_path):
    """Two JobLog objects on one directory, as two processes: each compacts while the other holds a
    view (and an offset) of the old jobs.jsonl; both go on reading and writing the same state."""
    a, b = JobLog(tmp_path), JobLog(tmp_path)
    _populate(a)
    assert _state(b) == _state(a)
    a.compact()
    b.update("e", status="running")  # b's offset was into the replaced file: it reloads first
    assert a.get("e").status == "running" and _state(a) == _state(b)
    b.compact()
    a.create_job("f", [{"id": "d6", "text": "six"}])
    a.compact()
    a.update("f", status="cancelled")
    assert b.get("f").status == "cancelled" and _state(a) == _state(b) == _state(JobLog(tmp_path))


ctx = mp.get_context("fork")


def _write_and_compact(barrier, out, log_dir, worker: int, n: int) -> None:
    log = JobLog(log_dir, compact_bytes=4000)  # compacts every few writes, racing the others
    barrier.wait()
    for i in range(n):
        job = log.create_job(
            f"w{worker}-{i}", [{"id": f"w{worker}-d{i}", "text": f"text {worker} {i} " + "y" * 300}]
        )
        log.update(job.job_id, status="running")
        log.update(job.job_id, status="succeeded", version=i)
    out.put((worker, log.compactions))


def test_processes_appending_while_others_compact_lose_nothing(tmp_path):
    n_procs, n = 4, 30
    barrier, out = ctx.Barrier(n_procs), ctx.Queue()
    procs = [
        ctx.Process(target=_write_and_compact, args=(barrier, out, tmp_path, w, n)) for w in range(n_procs)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert sum(c for _, c in results) >= 4  # compactions did happen, in several processes
    log = JobLog(tmp_path)
    jobs = log.list(None)
    assert len(jobs) == n_procs * n and log.bad_lines == 0 and log.invalid_transitions == 0
    for j in jobs:
        w, i = j.job_id[1:].split("-")
        assert (j.status, j.version, j.attempts) == ("succeeded", int(i), 1), j
        assert log.documents(j.documents)[0]["text"].startswith(f"text {w} {i} ")
    assert sorted(j.seq for j in jobs) == list(range(1, n_procs * n + 1))


@pytest.mark.parametrize("step", COMPACT_STEPS)
def test_killed_mid_compaction_loses_nothing(tmp_path, step):
    log = JobLog(tmp_path)
    _populate(log)
    before = _state(log)
    pid = os.fork()
    if pid == 0:  # the compacting process, SIGKILLed at `step`
        try:
            os.environ[CRASH_ENV] = step
            JobLog(tmp_path).compact()
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    assert _state(JobLog(tmp_path)) == before
    # a process that had the log open before the crash goes on writing; a fresh one sees all of it
    log.update("e", status="running")
    log.create_job("g", [{"id": "d7", "text": "written after the crash"}])
    fresh = JobLog(tmp_path)
    assert _state(fresh) == _state(log) and fresh.get("g").seq == 6
    fresh.compact()  # the next compaction cleans up and folds everything
    assert _state(JobLog(tmp_path)) == _state(log)
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("target", ["jobs.snapshot.jsonl", "jobs.jsonl"])
def test_a_failed_compaction_keeps_the_write_and_the_log(tmp_path, monkeypatch, target):
    """A rename failing (ENOSPC, EIO) in an automatic compaction: the write that triggered it is
    recorded and answered, the log reads as before; a later compaction succeeds."""
    log = JobLog(tmp_path, compact_bytes=None)
    _populate(log)
    real_replace = os.replace

    def failing_replace(src, dst, *a, **kw):
        if os.path.basename(str(dst)) == target:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", failing_replace)
    log.compact_bytes = 1
    assert log.update("e", status="running").status == "running"  # compaction failed after the write
    assert log.compactions == 0
    state = _state(log)
    assert state["jobs"]["e"]["status"] == "running"
    assert _state(JobLog(tmp_path, compact_bytes=None)) == state
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    monkeypatch.setattr(os, "replace", real_replace)
    log.compact()
    log.update("e", status="succeeded", version=2)
    assert _state(JobLog(tmp_path)) == _state(log)


def test_memory_holds_offsets_not_texts(tmp_path):
    """200 documents of 40 KB (8 MB of text): the process that wrote them, and one that opens the
    log afterwards, hold well under a tenth of that (before: both held every text, ~8.5 MB)."""
    n, size = 200, 40_000
    text_bytes = 0
    letters = "abcdefghijklmnopqrstuvwxyz"
    tracemalloc.start()
    try:
        writer = JobLog(tmp_path)
        for i in range(n):
            text = f"document {i}: " + (letters[i % 26 :] + letters[: i % 26]) * (size // 26)
            text_bytes += len(text)
            writer.create_job(None, [{"id": f"d{i}", "text": text, "facts": [FACT]}], {"steps": 3})
        gc.collect()
        held_writer, _ = tracemalloc.get_traced_memory()
        del writer
        gc.collect()
        base, _ = tracemalloc.get_traced_memory()
        reader = JobLog(tmp_path)
        gc.collect()
        held_reader = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert held_writer < text_bytes / 10, (held_writer, text_bytes)
    assert held_reader < text_bytes / 10, (held_reader, text_bytes)
    assert (
        reader.document("d7")["text"].startswith("document 7: ")
        and len(reader.document("d7")["text"]) >= size - 26
    )
    # after a compaction the next open reads the snapshot (one line per job and document record)
    reader.compact()
    tracemalloc.start()
    try:
        again = JobLog(tmp_path)
        gc.collect()
        held_again = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held_again < text_bytes / 10 and len(again.list(None)) == n
    assert again.documents(["d199"])[0]["facts"] == [FACT]


def test_automatic_compaction_bounds_the_log(tmp_path):
    """Progress updates (one per training step) no longer grow what every start replays without
    bound: jobs.jsonl is folded whenever it passes compact_bytes (and the snapshot's size)."""
    log = JobLog(tmp_path, compact_bytes=20_000)
    for i in range(20):
        log.create_job(f"j{i}", [{"id": f"d{i}", "text": "t" * 100}])
        log.update(f"j{i}", status="running")
        for step in range(30):
            log.update(f"j{i}", progress={"phase": "training", "step": step, "steps": 30})
        log.update(f"j{i}", status="succeeded", version=i + 1)
    assert log.compactions >= 3
    assert log.jobs_path.stat().st_size < 2 * max(20_000, log.snapshot_path.stat().st_size)
    assert _jobs_only(JobLog(tmp_path)) == _jobs_only(log)


def _jobs_only(log: JobLog) -> dict:
    return {j.job_id: j.to_dict() for j in log.list(None)}


# what a finished job's record holds after the pipeline (the tiny model's evaluation with the gate on)
EVALUATION = {
    "learning": 1.0,
    "learning_heldout": None,
    "retention": 0.857,
    "retention_base": 0.857,
    "forgetting": 0.143,
    "forgetting_base": 0.143,
    "perplexity": 160.96208352116508,
    "perplexity_parent": 94.91463241874061,
    "perplexity_change": 0.6958616329149224,
    "perplexity_change_base": 0.6958616329149224,
    "probe_facts": 7,
    "reach": {"share": 1.0, "reached": 7, "probes": 7, "rows_read_changed_mean": 66.14285714285714},
    "new_facts": 1,
    "parent": 0,
    "seconds": 0.2425,
    "gate": {
        "enabled": True,
        "passed": True,
        "reasons": [],
        "thresholds": {"max_forgetting": 0.1, "max_forgetting_base": 0.25, "max_ppl_increase": 0.25},
    },
}


def _finished_jobs(log: JobLog, n: int) -> None:
    for i in range(n):
        jid = f"j_{i:016x}"
        log.create_job(
            jid,
            [{"id": f"doc_{i:016x}", "text": f"fact {i}", "facts": [FACT]}],
            {"steps": 3},
            idempotency_key=f"kid:key-{i}",
            body_sha256=f"{i:064x}",
            idempotency_scope="key:kid",
            request_id=f"r-{i:016x}",
        )
        log.update(jid, status="running", progress={"phase": "loading"})
        log.update(jid, progress={"phase": "training", "step": 3, "steps": 3, "loss": 1.2345})
        timings = {"queued": 0.0167, "training": 0.1289, "evaluation": 0.2506, "publish": 0.0297}
        if i % 10 == 9:
            log.update(jid, status="failed", error="RuntimeError: " + "x" * 200, progress={"phase": "failed"})
        else:
            log.update(
                jid,
                status="succeeded",
                version=i + 1,
                parent=i,
                evaluation={**EVALUATION, "parent": i},
                timings={**timings, "total": 0.5442, "attempts": 1},
                progress={"phase": "done"},
            )


def test_finished_jobs_are_held_compactly(tmp_path):
    """Issue 17's remaining memory item: every process held every job's folded state (a finished
    job with its evaluation ~6 KB as a Job object, terminal jobs never dropped). A finished job is
    now held as its compressed record and decoded when read: 400 finished jobs (the realistic
    evaluation, timings, Idempotency-Key, one failed in ten) cost a process that opens the log
    under 1.5 KB each, replaying the events or loading the snapshot (before: ~6.5 KB), and every
    read gives the same jobs as the writer's."""
    n = 400
    writer = JobLog(tmp_path, compact_bytes=None)
    _finished_jobs(writer, n)
    expected = {j.job_id: j.to_dict() for j in writer.list(None)}
    held = {}
    for how in ("replay", "snapshot"):
        if how == "snapshot":
            writer.compact()
        gc.collect()
        tracemalloc.start()
        try:
            reader = JobLog(tmp_path)
            gc.collect()
            held[how] = tracemalloc.get_traced_memory()[0] / n
        finally:
            tracemalloc.stop()
        assert held[how] < 1500, held
        assert {j.job_id: j.to_dict() for j in reader.list(None)} == expected
        assert reader.get("j_0000000000000001").evaluation == {**EVALUATION, "parent": 1}
        assert reader.counts() == {"succeeded": n - n // 10, "failed": n // 10}
    # reads: newest first, a status filter before the limit, Idempotency-Keys, the queue
    log = JobLog(tmp_path)
    assert [j.job_id for j in log.list(3)] == [f"j_{i:016x}" for i in (n - 1, n - 2, n - 3)]
    assert [j.version for j in log.list(2, status="failed")] == [None, None]
    assert [j.job_id for j in log.list(2, status="failed")] == [f"j_{i:016x}" for i in (n - 1, n - 11)]
    assert log.find_by_idempotency_key("kid:key-7").job_id == "j_0000000000000007"
    assert log.queued() == []
    # a folded job can change again: a retry unfolds it, a finished job's later update is kept
    failed = "j_0000000000000009"
    assert log.retry(failed).status == "queued" and [j.job_id for j in log.queued()] == [failed]
    log.update("j_0000000000000002", timings={"total": 9.0, "stamped": 1})
    other = JobLog(tmp_path)
    assert other.get(failed).status == "queued" and other.get(failed).error is None
    assert other.get("j_0000000000000002").timings == {"total": 9.0, "stamped": 1}
    got = log.get("j_0000000000000003")
    got.evaluation["learning"] = -1.0  # a caller changing its copy changes nothing held
    assert log.get("j_0000000000000003").evaluation["learning"] == 1.0
