from __future__ import annotations

import threading

import pytest

from model_store import IdempotencyConflict, InvalidTransition, JobLog


def test_job_log_survives_reopen_and_state_machine(tmp_path):
    log = JobLog(tmp_path / "log")
    j = log.create_job(
        "j1",
        [{"id": "a", "text": "A", "facts": [{"question": "q", "answer": "x"}]}, {"text": "B"}],
        {"top_t": 5},
    )
    assert j.status == "queued" and j.documents[0] == "a" and j.documents[1].startswith("doc_")
    log.create_job("j2", [{"text": "C"}], {})
    log.update("j1", status="running")
    reopened = JobLog(tmp_path / "log")
    assert reopened.get("j1").status == "running"
    assert [x.job_id for x in reopened.queued()] == ["j1", "j2"]  # running = interrupted by the restart
    assert [x.job_id for x in reopened.queued(include_running=False)] == ["j2"]
    reopened.update(
        "j1", status="succeeded", version=3, parent=2, timings={"train_s": 1.5}, evaluation={"ok": True}
    )
    with pytest.raises(InvalidTransition):
        reopened.update("j1", status="running")
    reopened.update("j2", status="running")
    reopened.update("j2", status="failed", error="boom")
    reopened.retry("j2")
    j2 = JobLog(tmp_path / "log").get("j2")
    assert j2.status == "queued" and j2.error is None and j2.attempts == 1
    j1 = JobLog(tmp_path / "log").get("j1")
    assert (j1.version, j1.parent, j1.timings, j1.evaluation) == (3, 2, {"train_s": 1.5}, {"ok": True})
    assert [x.job_id for x in log.list(10)] == ["j2", "j1"]  # most recent first; `log` rereads on demand
    doc = log.document("a")
    assert doc["text"] == "A" and doc["job_id"] == "j1" and doc["facts"][0]["answer"] == "x"
    with pytest.raises(ValueError):
        log.update("j1", colour="red")


def test_truncated_last_line_tolerated(tmp_path):
    log = JobLog(tmp_path / "log")
    log.create_job("j1", [{"text": "A"}], {})
    with open(log.jobs_path, "ab") as f:  # a crash in the middle of an append
        f.write(b'{"event":"update","job_id":"j1","fie')
    with open(log.documents_path, "ab") as f:
        f.write(b'{"id":"x","te')
    again = JobLog(tmp_path / "log")
    assert again.get("j1").status == "queued"
    again.update("j1", status="running")  # appends after closing the broken line
    again.create_job("j2", [{"id": "y", "text": "Y"}], {})
    third = JobLog(tmp_path / "log")
    assert third.get("j1").status == "running" and third.get("j2").documents == ["y"]
    assert third.document("y")["text"] == "Y" and third.document("x") is None
    assert third.bad_lines == 2


def test_idempotency(tmp_path):
    log = JobLog(tmp_path / "log")
    a = log.create_job("j1", [{"text": "A"}], {}, idempotency_key="k", body_sha256="h1")
    b = log.create_job("j9", [{"text": "A"}], {}, idempotency_key="k", body_sha256="h1")
    assert b.job_id == a.job_id == "j1"
    with pytest.raises(IdempotencyConflict):
        log.create_job(None, [{"text": "other"}], {}, idempotency_key="k", body_sha256="h2")
    assert JobLog(tmp_path / "log").find_by_idempotency_key("k").job_id == "j1"
    assert len(JobLog(tmp_path / "log").list(None)) == 1


def test_two_writers_same_log(tmp_path):
    """Two JobLog objects (as two processes would) append to one log; threads inside each."""
    a, b = JobLog(tmp_path / "log"), JobLog(tmp_path / "log")

    def work(log, prefix):
        for i in range(20):
            log.create_job(f"{prefix}{i}", [{"text": f"{prefix} {i}"}], {})

    ts = [threading.Thread(target=work, args=(a, "a")), threading.Thread(target=work, args=(b, "b"))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(a.list(None)) == 40 and len(b.list(None)) == 40
    assert JobLog(tmp_path / "log").bad_lines == 0


def test_store_activation_log_and_jobs(h, store):
    job = store.jobs.create_job("j1", [{"id": "a", "text": "A"}], {})
    store.jobs.update(job.job_id, status="running")
    v = h.publish_update(store, {1: [1]}, seed=1, docs=["a"], job_id="j1", who="worker-1")
    store.jobs.update("j1", status="succeeded", version=v, parent=0)
    store.activate(0, who="alice", why="bad answers")
    acts = store.activations()
    assert acts[-1]["who"] == "alice" and acts[-1]["from"] == v and acts[-1]["to"] == 0
    assert acts[-1]["why"] == "bad answers" and acts[0]["who"] == "worker-1" and acts[0]["job_id"] == "j1"
