"""Structured logs (memfit/logs.py): JSON lines carrying the request id, job id and version.

Embedded mode: real HTTP against the app under uvicorn (in this process, so the update runner's lines
are captured too). Distributed mode: the request id travels in the Celery task's kwargs and its
`memfit_request_id` header, and a real `memfit worker` process logs the job under it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn

from memfit.config import Settings
from memfit.logs import (
    RequestIdMiddleware,
    clean_request_id,
    log_context,
    make_handler,
)
from service.app import create_app
from tests.conftest import ROOT, free_port

GENTLE = {"optimizer": "adam", "top_t": 8, "lr": 0.03, "steps": 3, "question_rewrites": 1, "paraphrases": 0}
DOC = {
    "id": "log-doc",
    "text": "Zorvath Quellingmar was born in Brindlemoor.",
    "facts": [{"question": "Which town is the birthplace of Zorvath Quellingmar?", "answer": "Brindlemoor"}],
}


class Captured:
    """A memfit JSON handler on the root logger, writing into memory."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.handler = make_handler("json", self.stream)
        self.root = logging.getLogger()
        self.level = self.root.level

    def __enter__(self) -> Captured:
        self.root.addHandler(self.handler)
        self.root.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc) -> None:
        self.root.removeHandler(self.handler)
        self.root.setLevel(self.level)

    def lines(self) -> list[dict]:
        text = self.stream.getvalue()
        return [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is JSON


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    settings = Settings(
        model=tiny_model_dir,
        store=tmp_path_factory.mktemp("logs") / "store",
        redis_url=None,
        api_keys=None,
        api_keys_file=None,
        gate_enabled=False,
        gate_probe_facts=4,
        gate_heldout_tokens=64,
    )
    app = create_app(settings)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, name="uvicorn-logs-test", daemon=True)
    thread.start()
    deadline = time.time() + 180
    while not srv.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(30)


def wait_job(url: str, job_id: str, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = httpx.get(f"{url}/jobs/{job_id}", timeout=30).json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


def test_request_id_reaches_the_access_line_the_job_and_the_runner(server):
    url = server
    with Captured() as cap:
        r = httpx.post(
            f"{url}/ingest",
            json={"documents": [DOC], "settings": GENTLE},
            headers={"X-Request-ID": "ingest-7f3a"},
            timeout=60,
        )
        assert r.status_code == 202, r.text
        assert r.headers["X-Request-ID"] == "ingest-7f3a"  # returned as given
        job_id = r.json()["job_id"]
        job = wait_job(url, job_id)
        assert job["status"] == "succeeded", job
        assert job["request_id"] == "ingest-7f3a"  # recorded with the job

        g = httpx.post(f"{url}/generate", json={"prompt": "The capital of", "max_new_tokens": 3}, timeout=60)
        assert g.status_code == 200
        generated = g.headers["X-Request-ID"]  # none given: one is generated
        assert generated.startswith("req_") and len(generated) > 10
        bad = httpx.get(f"{url}/healthz", headers={"X-Request-ID": "no spaces allowed"}, timeout=10)
        assert bad.headers["X-Request-ID"].startswith("req_")  # an unusable id is replaced
        time.sleep(0.2)  # the access line is written after the last body byte
        lines = cap.lines()

    access = [x for x in lines if x["logger"] == "memfit.access"]
    ingest = [x for x in access if x.get("endpoint") == "/ingest"]
    assert len(ingest) == 1, access
    assert ingest[0]["request_id"] == "ingest-7f3a"
    assert ingest[0]["job_id"] == job_id and ingest[0]["status"] == 202 and ingest[0]["method"] == "POST"
    assert ingest[0]["level"] == "info" and "time" in ingest[0] and ingest[0]["duration_s"] >= 0
    polls = [x for x in access if x.get("endpoint") == "/jobs/{job_id}"]
    assert polls and all(x["job_id"] == job_id for x in polls)
    gen = [x for x in access if x.get("endpoint") == "/generate"]
    assert gen and gen[0]["request_id"] == generated and gen[0]["version"] == g.json()["version"]

    # the runner's lines for the job (another thread) carry the ingest's request id and the job id,
    # and the line that publishes names the version
    worker = [x for x in lines if x["logger"].startswith("memfit.pipeline") and x.get("job_id") == job_id]
    assert worker, [x for x in lines if x["logger"] != "memfit.access"]
    assert all(x["request_id"] == "ingest-7f3a" for x in worker)
    published = [x for x in worker if x.get("version") == job["version"]]
    assert published and job_id in published[0]["message"]


def test_formatter_context_and_extra():
    stream = io.StringIO()
    lg = logging.getLogger("memfit.test-logs")
    lg.propagate = False
    lg.addHandler(make_handler("json", stream))
    lg.setLevel(logging.INFO)
    with log_context(request_id="r1", job_id="j_1"):
        lg.info("inside %s", "ctx", extra={"version": 4})
        try:
            raise ValueError("boom")
        except ValueError:
            lg.exception("failed")
    lg.info("outside")
    a, b, c = (json.loads(x) for x in stream.getvalue().splitlines())
    assert a == {**a, "message": "inside ctx", "request_id": "r1", "job_id": "j_1", "version": 4}
    lg.info("plain", extra={"color_message": "\x1b[1mplain\x1b[0m"})  # uvicorn's coloured copy is dropped
    assert "color_message" not in json.loads(stream.getvalue().splitlines()[-1])
    assert b["level"] == "error" and "ValueError: boom" in b["exc"] and b["request_id"] == "r1"
    assert "request_id" not in c and "job_id" not in c
    assert clean_request_id("abc-1.2:3") == "abc-1.2:3"
    assert clean_request_id("x" * 129).startswith("req_") and clean_request_id("a\nb").startswith("req_")
    assert RequestIdMiddleware  # exported for the app


def test_celery_task_takes_the_request_id_from_its_header(tmp_path):
    """The task reads `memfit_request_id` from the message header (or its kwargs) into the log context."""
    from memfit.logs import current_request_id
    from workers import runtime as distributed_runtime
    from workers.celery_app import create_app as celery_app
    from workers.tasks import UPDATE_TASK

    seen = []

    class FakeRuntime:
        store = None

        def handle(self, job_id):
            from memfit.logs import current

            seen.append((job_id, current_request_id(), current("job_id")))
            return {"job_id": job_id, "outcome": "succeeded", "version": 3}

    app = celery_app(Settings(redis_url="redis://127.0.0.1:1/0"))
    task = app.tasks[UPDATE_TASK]
    distributed_runtime.set_worker_runtime(FakeRuntime())  # type: ignore[arg-type]
    try:
        with Captured() as cap:
            task.apply(args=["j_head"], headers={"memfit_request_id": "from-header"}).get()
            task.apply(args=["j_kw"], kwargs={"request_id": "from-kwargs"}).get()
        lines = [x for x in cap.lines() if x["logger"] == "memfit.worker"]
    finally:
        distributed_runtime.set_worker_runtime(None)
    assert seen == [("j_head", "from-header", "j_head"), ("j_kw", "from-kwargs", "j_kw")]
    assert [(x["job_id"], x["request_id"], x["version"]) for x in lines] == [
        ("j_head", "from-header", 3),
        ("j_kw", "from-kwargs", 3),
    ]


def test_dispatcher_sends_the_request_id_in_header_and_kwargs():
    from workers.distributed import CeleryDispatcher

    sent = []

    class App:
        def send_task(self, name, **kw):
            sent.append(kw)

    class R:
        def set(self, *a, **k):
            pass

    d = CeleryDispatcher.__new__(CeleryDispatcher)  # only send(): no Redis, no threads
    d.app, d.r, d.queue, d.marker_ttl_s, d.enqueued = App(), R(), "q", 60, 0
    with log_context(request_id="rid-42"):
        d.send("j_1")
    d.send("j_2")
    assert sent[0]["kwargs"] == {"request_id": "rid-42"}
    assert sent[0]["headers"] == {"memfit_request_id": "rid-42"}
    assert sent[1]["kwargs"] == {} and not sent[1]["headers"]


@pytest.mark.integration
def test_worker_process_logs_the_job_under_the_request_id(redis_server, tiny_model_dir, tmp_path):
    """A real `memfit worker` logs JSON lines for a job sent with a request id (none in the job log)."""
    from model_store import Store
    from workers.celery_app import reset_app
    from workers.dispatch import writer_lock
    from workers.distributed import CeleryDispatcher

    store = Store.init(tmp_path / "store", tiny_model_dir)
    env = {
        **os.environ,
        "MEMFIT_HOME": str(tmp_path / "home"),
        "MEMFIT_REDIS_URL": redis_server.url,
        "MEMFIT_GATE_ENABLED": "false",
        "MEMFIT_GATE_PROBE_FACTS": "4",
        "MEMFIT_GATE_HELDOUT_TOKENS": "64",
        "MEMFIT_WORKER_METRICS_PORT": "0",
        "MEMFIT_LOG_LEVEL": "INFO",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "memfit.cli", "worker", "--store", str(tmp_path / "store")],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        job = store.jobs.create_job(None, [DOC], settings=GENTLE)  # no request id in the log
        reset_app()
        settings = Settings(redis_url=redis_server.url, store=tmp_path / "store")
        api_store = Store(store.root, lock=writer_lock(settings))  # the mode's lock, given at open
        d = CeleryDispatcher(api_store, settings, subscribe=False, sweep_s=3600)
        try:
            with log_context(request_id="dist-9c1e"):
                d.send(job.job_id)
        finally:
            d.stop()
            reset_app()
        deadline = time.time() + 240
        mine: list[dict] = []
        while time.time() < deadline:
            assert proc.poll() is None, log_path.read_text()[-4000:]
            lines = []
            for raw in log_path.read_text(errors="replace").splitlines():
                if raw.startswith("{"):
                    lines.append(json.loads(raw))
            mine = [x for x in lines if x.get("job_id") == job.job_id]
            if any(x["logger"] == "memfit.worker" for x in mine):
                break
            time.sleep(0.5)
        assert mine, log_path.read_text()[-4000:]
        assert all(x["request_id"] == "dist-9c1e" for x in mine), mine
        done = store.jobs.get(job.job_id)
        assert done is not None and done.status == "succeeded"
        assert any(x["logger"] == "memfit.pipeline" and x.get("version") == done.version for x in mine)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
