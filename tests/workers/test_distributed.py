"""Distributed mode end to end: a private redis-server, a real `memfit worker` (Celery, solo pool) and two
`memfit serve` replicas on one store.

One scenario test pays for the process start-ups once (about 1-2 minutes on 2 cores):
- a fact the tiny model cannot know is not answered; after its job succeeds, both replicas answer it;
  the update ran in the worker's pid (timings.worker_pid), not in an API process;
- a redelivered task for the finished job publishes nothing;
- a rollback on one replica reaches the other within a second (version event, poll as fallback);
- a burst of 50 ingests becomes a few batched versions (at most settings.max_batch_jobs jobs each),
  every job succeeds with its batch's version, every document is in a version's manifest, and both
  replicas answer exactly the facts the worker's evaluation says the batch learned. The tiny model
  (1,024 memory slots) learns few of 30+ facts taught in one update, so learning is not asserted for
  the burst; it is for the single fact above;
- with Redis down, /ingest answers 202 with "dispatch": "pending" and the job is queued in the log;
  when Redis is back the re-enqueue sweep sends it and it succeeds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.integration

FACT_DOC = {
    "id": "goju",
    "text": "Goju Theipouquis was born in Peivistead.",
    "facts": [{"question": "Where was Goju Theipouquis born?", "answer": "Peivistead"}],
}
FACT_PROMPT = "Question: Where was Goju Theipouquis born?\nAnswer:"
FACT_ANSWER = "Peivistead"

FAST_ENV = {
    "MEMFIT_GATE_ENABLED": "false",  # the tiny model forgets its probe set when it learns: no gate here
    "MEMFIT_GATE_PROBE_FACTS": "8",
    "MEMFIT_GATE_HELDOUT_TOKENS": "256",
    "MEMFIT_FOLLOW_INTERVAL_S": "0.25",
    "MEMFIT_LOG_LEVEL": "INFO",
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
    "MEMFIT_WORKER_METRICS_PORT": "0",  # no fixed port: tests may run beside other workers
}


class Proc:
    """A `memfit` subprocess with its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logdir: Path) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        full_env = {**os.environ, **env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "memfit.cli", *args],
                cwd=ROOT,
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_log(self, text: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if text in self.log():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            time.sleep(0.2)
        raise AssertionError(f"{self.name}: {text!r} not in its log after {timeout} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Server(Proc):
    def __init__(self, name: str, model: Path, store: Path, env: dict[str, str], logdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = ["serve", "--model", str(model), "--store", str(store), "--port", str(self.port)]
        super().__init__(name, args, env, logdir)
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited:\n{self.log()[-4000:]}")
            try:
                if self.http.get("/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{self.name} not ready after {timeout} s:\n{self.log()[-4000:]}")

    def ask(self, prompt: str = FACT_PROMPT) -> dict:
        r = self.http.post("/generate", json={"prompt": prompt, "max_new_tokens": 16, "stop": ["\n"]})
        assert r.status_code == 200, r.text
        return r.json()

    def ingest(
        self, docs: list[dict], settings: dict | None = None, key: str | None = None
    ) -> httpx.Response:
        body: dict = {"documents": docs}
        if settings:
            body["settings"] = settings
        headers = {"Idempotency-Key": key} if key else {}
        return self.http.post("/ingest", json=body, headers=headers)

    def job(self, job_id: str) -> dict:
        r = self.http.get(f"/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_jobs(self, job_ids: list[str], timeout: float) -> list[dict]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            jobs = [self.job(j) for j in job_ids]
            if all(j["status"] not in ("queued", "running") for j in jobs):
                return jobs
            time.sleep(0.3)
        raise AssertionError(f"jobs not finished after {timeout} s: {[j['status'] for j in jobs]}")

    def stop(self) -> None:
        self.http.close()
        super().stop()


def _answers(text: str, answer: str) -> bool:
    return answer.lower() in text.split("\n")[0].lower()


def _wait_version(server: Server, version: int, timeout: float) -> float:
    """Seconds until `server` serves `version` (asserts it happens within `timeout`)."""
    t0 = time.perf_counter()
    while True:
        got = server.ask()["version"]
        if got == version:
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            raise AssertionError(
                f"{server.name} still serves version {got}, not {version}, after {timeout} s"
            )
        time.sleep(0.02)


@pytest.fixture
def cluster(redis_server, tiny_model_dir, tmp_path):
    """A store seeded from the tiny model, one worker and two API replicas on the private Redis."""
    from model_store import Store

    store = tmp_path / "store"
    Store.init(store, tiny_model_dir)
    env = {**FAST_ENV, "MEMFIT_HOME": str(tmp_path / "home"), "MEMFIT_REDIS_URL": redis_server.url}
    procs: list[Proc] = []
    try:
        worker = Proc(
            "worker", ["worker", "--model", str(tiny_model_dir), "--store", str(store)], env, tmp_path
        )
        procs.append(worker)
        a = Server("api-a", tiny_model_dir, store, env, tmp_path)
        procs.append(a)
        b = Server("api-b", tiny_model_dir, store, env, tmp_path)
        procs.append(b)
        worker.wait_log(" ready.", timeout=180)
        a.wait_ready(180)
        b.wait_ready(180)
        yield {"worker": worker, "a": a, "b": b, "store": store, "redis": redis_server, "tmp": tmp_path}
    finally:
        for p in reversed(procs):
            p.stop()


def test_distributed_end_to_end(cluster):
    from memlm.data.invented import invented_facts
    from model_store import Store

    worker, a, b = cluster["worker"], cluster["a"], cluster["b"]
    store = Store(cluster["store"])

    # -- one fact: unknown before, learned by the worker, served by both replicas ------------------
    for s in (a, b):
        assert not _answers(s.ask()["text"], FACT_ANSWER)
    before = a.ask()["text"]
    r = a.ingest([FACT_DOC])
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    (job,) = a.wait_jobs([job_id], timeout=120)
    assert job["status"] == "succeeded", job
    version = job["version"]
    assert version >= 1 and job["evaluation"]["learning"] == 1.0
    deadline = time.time() + 5
    while "worker_pid" not in a.job(job_id)["timings"] and time.time() < deadline:
        time.sleep(0.05)
    timings = a.job(job_id)["timings"]
    assert timings["worker_pid"] == worker.pid, (timings, worker.pid)
    assert worker.pid not in (a.pid, b.pid)
    for s in (a, b):
        _wait_version(s, version, timeout=2)
        out = s.ask()
        assert out["version"] == version and _answers(out["text"], FACT_ANSWER), (s.name, out)

    # -- a redelivered task for the finished job publishes nothing ---------------------------------
    from memfit.config import Settings
    from workers.celery_app import create_app
    from workers.tasks import UPDATE_TASK

    versions_before = store.version_ids()
    settings = Settings(redis_url=cluster["redis"].url)
    create_app(settings).send_task(
        UPDATE_TASK, args=[job_id], queue=settings.celery_queue, ignore_result=True
    )
    worker.wait_log("'outcome': 'already_succeeded'", timeout=30)
    assert store.version_ids() == versions_before

    # -- rollback on one replica: both answer as before within a second ---------------------------
    parent = job["parent"]
    r = a.http.post(f"/versions/{parent}/activate", json={"why": "test rollback"})
    assert r.status_code == 200, r.text
    took = _wait_version(b, parent, timeout=1.0)
    for s in (a, b):
        out = s.ask()
        assert out["version"] == parent and out["text"] == before, (s.name, out)
    print(f"rollback reached the other replica in {took * 1000:.0f} ms")

    # -- a burst of 50 ingests: fewer, batched versions --------------------------------------------
    n = 50
    facts = invented_facts(n, seed=11)
    docs = [
        {
            "id": f"burst-{i}",
            "text": f["text"],
            "facts": [{"question": f["question"], "answer": f["answer"]}],
        }
        for i, f in enumerate(facts)
    ]
    ids = []
    for i, d in enumerate(docs):
        r = (a if i % 2 else b).ingest([d])  # the default update settings
        assert r.status_code == 202, r.text
        ids.append(r.json()["job_id"])
    jobs = a.wait_jobs(ids, timeout=240)
    assert all(j["status"] == "succeeded" for j in jobs), [(j["status"], j["error"]) for j in jobs]
    new_versions = sorted({j["version"] for j in jobs})
    assert len(new_versions) < n / 5, new_versions  # batched: a handful of versions, not 50
    max_batch = Settings().max_batch_jobs
    taught = []
    for v in new_versions:
        m = store.manifest(v)
        assert len(m["documents"]) <= max_batch
        taught += m["documents"]
        members = [j for j in jobs if j["version"] == v]
        assert sorted(m["documents"]) == sorted(d for j in members for d in j["documents"])
    assert sorted(taught) == sorted(d["id"] for d in docs)  # every document is in exactly one version
    assert any(len(store.manifest(v)["documents"]) > 1 for v in new_versions)
    assert all(j["timings"].get("worker_pid", worker.pid) == worker.pid for j in jobs)

    # each batched version records what it learned when it was published; the tiny model (1,024 slots)
    # learns most of a merged batch of up to 8 facts, not always all of it (that depends on its build)
    learned = {v: store.manifest(v)["evaluation"]["learning"] for v in new_versions}
    assert all(x >= 0.5 for x in learned.values()), learned
    final = store.active()
    assert final == new_versions[-1]
    for s in (a, b):
        _wait_version(s, final, timeout=2)
    # Both replicas serve the same rows as the worker's training copy: they answer exactly as many facts
    # of the last batch as the worker's evaluation said it learned.
    last = store.manifest(final)
    last_facts = [facts[int(d.split("-")[1])] for d in last["documents"]]
    texts = {
        s.name: [s.ask(f"Question: {f['question']}\nAnswer:")["text"] for f in last_facts] for s in (a, b)
    }
    assert texts[a.name] == texts[b.name]
    hits = sum(_answers(t, f["answer"]) for t, f in zip(texts[a.name], last_facts))
    expected = round(learned[final] * len(last_facts))
    assert hits == expected, list(zip(texts[a.name], [f["answer"] for f in last_facts]))
    print(f"burst of {n}: versions {new_versions}, learned per version {learned}")

    # -- Redis down: 202 "dispatch": "pending", the job waits in the log; Redis back: it runs -----
    redis = cluster["redis"]
    redis.stop()
    r = a.ingest(
        [{"id": "after-outage", "text": FACT_DOC["text"], "facts": FACT_DOC["facts"]}], key="outage-1"
    )
    assert r.status_code == 202 and r.json()["dispatch"] == "pending", r.text  # recorded: no 503
    queued = [j for j in store.jobs.list(limit=None) if "after-outage" in j.documents]
    assert len(queued) == 1 and queued[0].status == "queued"
    again = a.ingest(
        [{"id": "after-outage", "text": FACT_DOC["text"], "facts": FACT_DOC["facts"]}], key="outage-1"
    )
    assert again.status_code == 202 and again.json()["job_id"] == queued[0].job_id
    # a rollback needs the Redis writer lock: 503 naming Redis, and the active version is unchanged
    r = a.http.post(f"/versions/{parent}/activate", json={"why": "during the outage"})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "redis_unavailable" and int(r.headers["Retry-After"]) >= 1
    assert store.active() == final
    redis.start()
    (job,) = a.wait_jobs([queued[0].job_id], timeout=120)
    assert job["status"] == "succeeded", job
    assert job["timings"].get("worker_pid", worker.pid) == worker.pid


def test_worker_needs_redis_url(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MEMFIT_REDIS_URL"}
    env["MEMFIT_HOME"] = str(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "memfit.cli", "worker", "--store", str(tmp_path / "store")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "MEMFIT_REDIS_URL" in out.stderr


def test_celery_config_policy():
    from memfit.config import Settings
    from workers.celery_app import celery_config, create_app

    s = Settings(redis_url="redis://127.0.0.1:1/0")
    conf = celery_config(s)
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["accept_content"] == ["json"] and conf["task_serializer"] == "json"
    assert conf["result_accept_content"] == ["json"]
    assert conf["task_always_eager"] is False
    assert conf["broker_transport_options"]["visibility_timeout"] > conf["task_time_limit"]
    assert conf["broker_url"] == conf["result_backend"] == s.redis_url
    for opts in (conf["broker_transport_options"], conf["result_backend_transport_options"]):
        assert opts["socket_timeout"] == s.redis_socket_timeout_s  # a silent Redis must not hang an enqueue
        assert opts["socket_connect_timeout"] == s.redis_connect_timeout_s
    app = create_app(s)
    task = app.tasks["memfit.update"]
    assert task.acks_late and task.time_limit == s.task_time_limit_s
    assert app.amqp.router.route({}, "memfit.update")["queue"].name == s.celery_queue
    with pytest.raises(ValueError, match="VISIBILITY_TIMEOUT"):
        celery_config(Settings(redis_url="redis://x/0", visibility_timeout_s=60, task_time_limit_s=600))
    with pytest.raises(ValueError, match="MEMFIT_REDIS_URL"):
        celery_config(Settings(redis_url=None))
    # importing the Celery side loads no torch (an API process never needs it for enqueueing)
    code = "import sys, workers.celery_app, workers.tasks, workers.events; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_version_events_reach_subscriber(redis_server):
    from workers.events import VersionSubscriber, publish_active

    got: list[int] = []
    current = {"v": 3}
    sub = VersionSubscriber(redis_server.url, got.append, current_active=lambda: current["v"]).start()
    try:
        deadline = time.time() + 5
        while not got and time.time() < deadline:  # catch-up on connect from the ACTIVE pointer
            time.sleep(0.02)
        assert got == [3]
        assert publish_active(redis_server.url, 4, version=4) == 1
        while len(got) < 2 and time.time() < deadline:
            time.sleep(0.02)
        assert got == [3, 4]
        # Redis restarts: the subscriber reconnects and catches up from ACTIVE (it missed nothing)
        redis_server.stop()
        current["v"] = 5
        redis_server.start()
        deadline = time.time() + 15
        while got[-1] != 5 and time.time() < deadline:
            time.sleep(0.05)
        assert got[-1] == 5 and sub.connected
    finally:
        sub.stop()
    assert json.loads(json.dumps({"active": 1}))  # messages are plain JSON
