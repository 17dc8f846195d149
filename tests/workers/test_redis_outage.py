"""Redis outages in distributed mode (issue 17, "Redis outage"), with a private redis-server, real
`memfit serve` replicas and a real `memfit worker`:

- Redis down at ingest: the job is durably in the log, so the answer is 202 with
  `"dispatch": "pending"` (it was a 503, which made clients without an Idempotency-Key retry and
  double the job); once Redis is back the replicas' sweep sends it;
- a Redis that accepts connections but never answers (a blackhole: a listening socket nobody
  accepts on) must not hang a route: every client has connect and reply timeouts (settings);
- a Redis blip while a worker publishes (stopped after training, started again two seconds later)
  is waited out (Settings.redis_retry_s) instead of failing the job for good.
"""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from tests.faults.test_worker_kill import ENV as WORKER_ENV
from tests.faults.test_worker_kill import GENTLE, Worker
from tests.workers.test_distributed import FACT_DOC, FAST_ENV, Server

pytestmark = pytest.mark.integration


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached in {timeout} s")


def test_ingest_while_redis_is_down_is_202_pending_and_sent_later(redis_server, tiny_model_dir, tmp_path):
    import redis

    from model_store import Store

    root = tmp_path / "store"
    store = Store.init(root, tiny_model_dir)
    env = {**FAST_ENV, "MEMFIT_HOME": str(tmp_path / "home"), "MEMFIT_REDIS_URL": redis_server.url}
    api = Server("api", tiny_model_dir, root, env, tmp_path)  # no worker: the queue itself is checked
    try:
        api.wait_ready(180)
        redis_server.stop()
        t0 = time.monotonic()
        r = api.ingest([{"id": "during-outage", "text": FACT_DOC["text"], "facts": FACT_DOC["facts"]}])
        took = time.monotonic() - t0
        assert r.status_code == 202, r.text  # before: 503 queue_unavailable, the job recorded anyway
        body = r.json()
        assert body["dispatch"] == "pending" and body["status"] == "queued", body
        assert r.headers["Location"] == f"/jobs/{body['job_id']}" and took < 10, took
        recorded = [j for j in store.jobs.list(limit=None) if "during-outage" in j.documents]
        assert [j.job_id for j in recorded] == [body["job_id"]]  # exactly one job, queued in the log
        assert recorded[0].status == "queued"
        redis_server.start()
        r_ = redis.Redis.from_url(redis_server.url, socket_timeout=5, socket_connect_timeout=5)
        # the sweep (every 5 s, jobs unchanged for 5 s) sends it: the task is in the Celery queue
        _wait(lambda: r_.exists(f"memfit:job:{body['job_id']}:enqueued"), 30, "the sweep's enqueued marker")
        _wait(lambda: r_.llen(FAST_ENV.get("MEMFIT_CELERY_QUEUE", "memfit-updates")) >= 1, 10, "the task")
        ok = api.ingest([{"id": "after-outage", "text": "Taia exports glass."}])
        assert ok.status_code == 202 and ok.json()["dispatch"] == "sent", ok.text
    finally:
        api.stop()


def test_a_blackholed_redis_does_not_hang_a_route(tiny_model_dir, tmp_path):
    """Redis accepts the TCP connection (the kernel's backlog) and never answers. Before: the
    writer lock's client had no timeouts and the Celery transport only a connect timeout, so
    /ingest and /versions/{v}/activate hung. Now: 202 pending and 503 redis_unavailable in seconds."""
    from model_store import Store

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(128)  # never accept()ed: connects succeed, replies never come
    url = f"redis://127.0.0.1:{hole.getsockname()[1]}/0"
    root = tmp_path / "store"
    Store.init(root, tiny_model_dir)
    env = {
        **FAST_ENV,
        "MEMFIT_HOME": str(tmp_path / "home"),
        "MEMFIT_REDIS_URL": url,
        "MEMFIT_REDIS_SOCKET_TIMEOUT_S": "1",
        "MEMFIT_REDIS_CONNECT_TIMEOUT_S": "1",
    }
    api = Server("api-hole", tiny_model_dir, root, env, tmp_path)
    api.http = httpx.Client(base_url=api.url, timeout=20)
    try:
        api.wait_ready(180)
        t0 = time.monotonic()
        r = api.ingest([{"id": "into-the-hole", "text": "Taia exports glass."}])
        took_ingest = time.monotonic() - t0
        assert r.status_code == 202 and r.json()["dispatch"] == "pending", r.text
        t0 = time.monotonic()
        r = api.http.post("/versions/0/activate", json={"why": "during the blackhole"})
        took_activate = time.monotonic() - t0
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "redis_unavailable" and int(r.headers["Retry-After"]) >= 1
        assert took_ingest < 10 and took_activate < 10, (took_ingest, took_activate)
        assert api.ask("Hello")["version"] == 0  # serving goes on
        print(f"blackholed Redis: ingest answered in {took_ingest:.1f} s, activate in {took_activate:.1f} s")
    finally:
        api.stop()
        hole.close()


def test_a_redis_blip_at_publish_is_waited_out(redis_server, tiny_model_dir, tmp_path):
    """Redis stops while the worker trains and comes back 2 s after the worker reached the publish
    step. Before: the writer lock raised ConnectionError and the job was `failed` for good. Now the
    worker retries the lock (MEMFIT_REDIS_RETRY_S) and the job succeeds, published once."""
    from memfit.config import Settings
    from model_store import Store
    from workers.celery_app import create_app
    from workers.tasks import UPDATE_TASK

    root = tmp_path / "store"
    store = Store.init(root, tiny_model_dir)
    env = {
        **WORKER_ENV,
        "MEMFIT_HOME": str(tmp_path / "home"),
        "MEMFIT_REDIS_URL": redis_server.url,
        "MEMFIT_TASK_TIME_LIMIT_S": "300",
        "MEMFIT_VISIBILITY_TIMEOUT_S": "301",
        "MEMFIT_REDIS_RETRY_S": "30",
    }
    job_id = store.jobs.create_job(
        None, [{"id": "blip", "text": FACT_DOC["text"]}], settings={**GENTLE, "steps": 150}
    ).job_id
    w = Worker(tiny_model_dir, root, env, tmp_path / "worker.log", crash=None)
    try:
        w.wait_ready()
        settings = Settings(redis_url=redis_server.url, task_time_limit_s=300, visibility_timeout_s=301)
        create_app(settings).send_task(
            UPDATE_TASK, args=[job_id], queue=settings.celery_queue, ignore_result=True
        )

        def phase() -> str | None:
            return (store.jobs.get(job_id).progress or {}).get("phase")

        _wait(lambda: phase() == "training", 60, "training")
        redis_server.stop()
        _wait(lambda: phase() in ("publish", "done", "failed"), 120, "the publish step")
        assert phase() == "publish", store.jobs.get(job_id)
        time.sleep(2)
        redis_server.start()
        _wait(lambda: store.jobs.get(job_id).terminal, 60, "the job's end")
        job = store.jobs.get(job_id)
        assert job.status == "succeeded", (job.error, w.log()[-2000:])
        assert [v for v in store.version_ids() if store.manifest(v).get("job_id") == job_id] == [job.version]
        assert w.proc.poll() is None
    finally:
        w.stop()


def test_redis_password_file_reaches_every_client(redis_server, tmp_path):
    """Redis with requirepass (compose and k8s now set one, issue 17): MEMFIT_REDIS_PASSWORD_FILE
    puts the password into the URL every client is built from, the queue, the writer lock and plain
    clients authenticate with it, and messages show it as ***."""
    import redis

    from memfit.config import Settings, redacted
    from model_store import RedisWriterLock
    from workers.celery_app import create_app
    from workers.runtime import redis_client
    from workers.tasks import UPDATE_TASK

    password = "s3cret/with:odd@chars"
    redis.Redis.from_url(redis_server.url).config_set("requirepass", password)
    secret = tmp_path / "redis_password"
    secret.write_text(password + "\n")
    with pytest.raises(redis.RedisError):  # the server refuses anyone without it now
        redis.Redis.from_url(redis_server.url, socket_timeout=5).ping()
    settings = Settings(redis_url=redis_server.url, redis_password_file=secret)
    assert password not in redacted(settings.redis_url) and ":***@" in redacted(settings.redis_url)
    client = redis_client(settings.redis_url, settings)
    assert client.ping()
    lock = RedisWriterLock(settings.redis_url, name="memfit:test:writer")
    with lock:
        assert lock.held()
    create_app(settings).send_task(UPDATE_TASK, args=["j_x"], queue=settings.celery_queue, ignore_result=True)
    assert client.llen(settings.celery_queue) == 1
    with pytest.raises(ValueError, match="MEMFIT_REDIS_PASSWORD_FILE"):
        Settings(redis_url=redis_server.url, redis_password_file=tmp_path / "missing")
