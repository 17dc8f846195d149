"""Distributed mode: a Celery worker SIGKILLed at three points of an update (before training, during
training, after publishing but before the job is recorded and the task acknowledged). Each time the
unacknowledged task is redelivered (acks_late; Redis visibility timeout) to the restarted worker, the
job completes exactly once, and the version chain has no gap and no duplicate.

The kills come from the pipeline's crash hook (`MEMFIT_CRASH_AT=point@job_id`, workers/pipeline.py).
Timeouts are shortened through settings so redelivery takes seconds: a 12 s task limit, a 13 s
visibility timeout (kombu looks for lapsed messages every second at that size), 3 s job claims.
One worker process runs at a time: each restarted worker carries the next scenario's crash entry and
first receives the previous scenario's redelivered task. No API replica runs (its re-enqueue sweep
would be a second path to recovery): jobs are written to the log and their tasks sent from here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration

GENTLE = {
    "optimizer": "adam",
    "top_t": 8,
    "lr": 0.03,
    "steps": 6,
    "early_stop": False,
    "question_rewrites": 1,
    "paraphrases": 0,
}
POINTS = ["pipeline:before_training", "pipeline:training", "pipeline:published"]
VISIBILITY_S = 13
ENV = {
    "MEMFIT_GATE_ENABLED": "false",  # the tiny model forgets its probe set when it learns
    "MEMFIT_GATE_PROBE_FACTS": "8",
    "MEMFIT_GATE_HELDOUT_TOKENS": "256",
    "MEMFIT_TASK_TIME_LIMIT_S": str(VISIBILITY_S - 1),
    "MEMFIT_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S),
    "MEMFIT_CLAIM_TTL_S": "3",
    "MEMFIT_MAX_BATCH_JOBS": "1",  # one job per update: the chain is easy to read
    "MEMFIT_WORKER_METRICS_PORT": "0",
    "MEMFIT_LOG_LEVEL": "INFO",
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
}


class Worker:
    def __init__(self, model: Path, store: Path, env: dict[str, str], log: Path, crash: str | None) -> None:
        self.log_path = log
        full = {**os.environ, **env}
        full.pop("MEMFIT_CRASH_AT", None)
        if crash:
            full["MEMFIT_CRASH_AT"] = crash
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "memfit.cli", "worker", "--model", str(model), "--store", str(store)],
                cwd=ROOT,
                env=full,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if " ready." in self.log():
                return
            assert self.proc.poll() is None, f"worker exited early:\n{self.log()[-3000:]}"
            time.sleep(0.2)
        raise AssertionError(f"worker not ready after {timeout} s:\n{self.log()[-3000:]}")

    def wait_killed(self, timeout: float = 60) -> None:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker still alive after {timeout} s:\n{self.log()[-3000:]}") from None
        assert rc == -signal.SIGKILL, (rc, self.log()[-3000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _wait_status(store, job_id: str, statuses: tuple[str, ...], timeout: float, worker: Worker) -> object:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = store.jobs.get(job_id)
        if job is not None and job.status in statuses:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} not {statuses} after {timeout} s: {job}\n{worker.log()[-3000:]}")


def test_killed_worker_job_redelivered_and_done_once(redis_server, tiny_model_dir, tmp_path):
    from memfit.config import Settings
    from memlm.data.invented import invented_facts
    from model_store import Store
    from workers.celery_app import create_app
    from workers.tasks import UPDATE_TASK

    root = tmp_path / "store"
    store = Store.init(root, tiny_model_dir)
    env = {**ENV, "MEMFIT_HOME": str(tmp_path / "home"), "MEMFIT_REDIS_URL": redis_server.url}
    settings = Settings(
        redis_url=redis_server.url, task_time_limit_s=VISIBILITY_S - 1, visibility_timeout_s=VISIBILITY_S
    )
    celery = create_app(settings)

    facts = invented_facts(len(POINTS), seed=5)
    job_ids = [
        store.jobs.create_job(
            None,
            [
                {
                    "id": f"kill-{i}",
                    "text": f["text"],
                    "facts": [{"question": f["question"], "answer": f["answer"]}],
                }
            ],
            settings=GENTLE,
        ).job_id
        for i, f in enumerate(facts)
    ]

    def send(job_id: str) -> None:
        celery.send_task(UPDATE_TASK, args=[job_id], queue=settings.celery_queue, ignore_result=True)

    workers: list[Worker] = []
    timings: list[str] = []
    try:
        for k, (point, job_id) in enumerate(zip(POINTS, job_ids, strict=True)):
            w = Worker(tiny_model_dir, root, env, tmp_path / f"worker-{k}.log", crash=f"{point}@{job_id}")
            workers.append(w)
            w.wait_ready()
            if k > 0:  # the previous scenario's task, redelivered to this worker, completes
                t0 = time.time()
                _wait_status(store, job_ids[k - 1], ("succeeded",), 90, w)
                timings.append(f"{POINTS[k - 1]}: done {time.time() - t0:.1f} s after the restart was ready")
            t_sent = time.time()
            send(job_id)
            w.wait_killed()
            timings.append(f"{point}: killed {time.time() - t_sent:.1f} s after the task was sent")
            job = store.jobs.get(job_id)
            assert job.status == "running", job  # the dead worker left it running, not finished
            published = [v for v in store.version_ids() if store.manifest(v).get("job_id") == job_id]
            assert len(published) == (1 if point == "pipeline:published" else 0), (point, published)
        last = Worker(tiny_model_dir, root, env, tmp_path / "worker-last.log", crash=None)
        workers.append(last)
        last.wait_ready()
        t0 = time.time()
        _wait_status(store, job_ids[-1], ("succeeded",), 90, last)
        timings.append(f"{POINTS[-1]}: done {time.time() - t0:.1f} s after the restart was ready")
        time.sleep(2)  # a stray second delivery would publish now
    finally:
        for w in workers:
            w.stop()
    print("\n".join(timings))

    fresh = Store(root)
    versions = fresh.version_ids()
    assert versions == [0, 1, 2, 3], versions  # no gap, no duplicate
    for v in (1, 2, 3):
        assert fresh.manifest(v)["parent"] == v - 1
    assert fresh.active() == 3
    for k, job_id in enumerate(job_ids):
        job = fresh.jobs.get(job_id)
        assert job.status == "succeeded", job
        assert job.version == k + 1, (job_id, job.version)
        owners = [v for v in versions if v and fresh.manifest(v).get("job_id") == job_id]
        assert owners == [job.version], (job_id, owners)  # exactly one version per job
        assert job.timings.get("worker_pid") == workers[k + 1].proc.pid  # finished by the restarted worker
    # killed after publishing: the redelivered task recorded the existing version, never trained again
    assert fresh.jobs.get(job_ids[2]).timings.get("redelivered") is True
    rep = fresh.verify()
    assert rep["ok"], rep["problems"]


MAX_ATTEMPTS = 2


def test_job_that_keeps_killing_its_worker_fails_after_max_attempts(redis_server, tiny_model_dir, tmp_path):
    """Before: a job whose every delivery killed its worker (here the crash hook; in life an OOM or a
    segfault in training) came back forever: redelivered after each visibility timeout, it took every
    restarted worker down with it. Now each start is counted in the job log (`Job.deliveries`) before
    training, and the delivery after MEMFIT_MAX_ATTEMPTS starts fails the job without running it: the
    worker lives, nothing is published."""
    from memfit.config import Settings
    from model_store import Store
    from workers.celery_app import create_app
    from workers.tasks import UPDATE_TASK

    root = tmp_path / "store"
    store = Store.init(root, tiny_model_dir)
    visibility = 8
    env = {
        **ENV,
        "MEMFIT_HOME": str(tmp_path / "home"),
        "MEMFIT_REDIS_URL": redis_server.url,
        "MEMFIT_TASK_TIME_LIMIT_S": str(visibility - 1),
        "MEMFIT_VISIBILITY_TIMEOUT_S": str(visibility),
        "MEMFIT_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
    }
    doc = {"id": "poison", "text": "Goju Theipouquis was born in Peivistead."}
    job_id = store.jobs.create_job(None, [doc], settings=GENTLE).job_id
    crash = f"pipeline:training@{job_id}"  # every process that trains this job dies
    settings = Settings(
        redis_url=redis_server.url, task_time_limit_s=visibility - 1, visibility_timeout_s=visibility
    )
    workers: list[Worker] = []
    try:
        for k in range(MAX_ATTEMPTS):
            w = Worker(tiny_model_dir, root, env, tmp_path / f"poison-{k}.log", crash=crash)
            workers.append(w)
            w.wait_ready()
            if k == 0:
                create_app(settings).send_task(
                    UPDATE_TASK, args=[job_id], queue=settings.celery_queue, ignore_result=True
                )
            w.wait_killed(timeout=90)  # the redelivered task (visibility timeout) kills it again
            job = store.jobs.get(job_id)
            assert job.status == "running" and job.deliveries == k + 1, job
        last = Worker(tiny_model_dir, root, env, tmp_path / "poison-last.log", crash=crash)
        workers.append(last)
        last.wait_ready()
        job = _wait_status(store, job_id, ("failed",), 90, last)
        assert "MEMFIT_MAX_ATTEMPTS=2" in job.error and "started 2 times" in job.error, job.error
        time.sleep(1)
        assert last.proc.poll() is None, last.log()[-3000:]  # not killed: the job was not run again
    finally:
        for w in workers:
            w.stop()
    fresh = Store(root)
    assert fresh.version_ids() == [0] and fresh.active() == 0
    job = fresh.jobs.get(job_id)
    assert job.status == "failed" and job.attempts == MAX_ATTEMPTS
    # a retry starts the count again (the operator's call)
    assert fresh.jobs.retry(job_id).deliveries == 0
