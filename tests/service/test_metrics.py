"""Every metric of docs/observability.md moves when its event happens (scrape before and after).

One app (embedded mode, tiny model) takes real traffic: generations (plain, streamed, failing), a gentle
update that passes the gate, a destructive one that the gate rejects, a rollback and a revert. The
queue depth is checked on an app without a runner (jobs stay queued), the worker endpoint on its own.
"""

from __future__ import annotations

import threading
import time
import urllib.request

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from memfit.config import Settings
from service.app import create_app
from workers.gate import HOUSE_THRESHOLDS

PROMPT = "Question: What is the capital of France?\nAnswer:"
GENTLE = {"optimizer": "adam", "top_t": 8, "lr": 0.03, "steps": 10, "question_rewrites": 1, "paraphrases": 1}
DESTRUCTIVE = {
    "optimizer": "adam",
    "top_t": 1024,
    "lr": 1000.0,
    "steps": 3,
    "early_stop": False,
    "question_rewrites": 1,
    "paraphrases": 0,
}


class Scrape:
    def __init__(self, text: str) -> None:
        self.samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]
        self.names = {s.name for s in self.samples}

    def __call__(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` whose labels include `labels` (0 when there are none)."""
        return sum(
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def has(self, name: str, **labels: str) -> bool:
        return any(
            s.name == name and all(s.labels.get(k) == v for k, v in labels.items()) for s in self.samples
        )


def scrape(client) -> Scrape:
    r = client.get("/metrics")
    assert r.status_code == 200
    return Scrape(r.text)


def document(doc_id: str, who: str, town: str) -> dict:
    return {
        "id": doc_id,
        "text": f"{who} was born in {town}.",
        "facts": [
            {
                "question": f"Which town is the birthplace of {who}?",
                "answer": town,
                "heldout_question": f"{who} was born in which town?",
            }
        ],
    }


def wait_job(client, job_id: str, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    settings = Settings(model=tiny_model_dir, store=tmp_path_factory.mktemp("metrics") / "store")
    app = create_app(settings)
    with TestClient(app) as client:
        yield app, client


def test_serving_metrics_move(live):
    app, client = live
    a = scrape(client)
    r = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 8})
    assert r.status_code == 200
    usage = r.json()["usage"]
    assert usage["completion_tokens"] >= 2, "need two tokens for an inter-token gap"
    b = scrape(client)
    d = lambda name, **kw: b(name, **kw) - a(name, **kw)  # noqa: E731
    assert d("memfit_http_requests_total", endpoint="/generate", method="POST", status="200") == 1
    assert d("memfit_http_request_duration_seconds_count", endpoint="/generate") == 1
    assert d("memfit_e2e_request_latency_seconds_count") == 1
    assert d("memfit_time_to_first_token_seconds_count") == 1
    assert d("memfit_inter_token_latency_seconds_count") >= usage["completion_tokens"] - 1
    assert d("memfit_time_per_output_token_seconds_count") == 1
    assert d("memfit_request_queue_time_seconds_count") == 1
    assert d("memfit_prompt_tokens_total") == usage["prompt_tokens"]
    assert d("memfit_generation_tokens_total") == usage["completion_tokens"]
    assert d("memfit_request_generation_tokens_count") == 1
    # the /metrics request itself is in flight while it renders
    assert b("memfit_http_requests_in_flight") >= 1
    assert b("memfit_generation_requests_running") == 0
    # the route label is the template, never the raw path
    client.get("/jobs/j_does_not_exist")
    c = scrape(client)
    assert c.has("memfit_http_requests_total", endpoint="/jobs/{job_id}", status="404")
    assert not any("j_does_not_exist" in str(s.labels) for s in c.samples)


def test_running_generations_and_in_flight_while_streaming(live):
    app, client = live
    engine = app.state.engine
    seen: dict[str, float] = {}
    gate = threading.Event()

    real_submit = engine.submit

    def slow_submit(req, emit):  # hold the request open after its first piece
        pieces = []

        def held(item):
            emit(item)
            pieces.append(item)
            if len(pieces) == 1:
                gate.wait(30)

        real_submit(req, held)

    engine.submit = slow_submit
    try:

        def read():
            with client.stream(
                "POST", "/generate", json={"prompt": PROMPT, "max_new_tokens": 4, "stream": True}
            ) as r:
                for _ in r.iter_lines():
                    pass

        t = threading.Thread(target=read)
        t.start()
        deadline = time.time() + 30
        while time.time() < deadline:
            s = scrape(client)
            if s("memfit_generation_requests_running") >= 1:
                seen["running"] = s("memfit_generation_requests_running")
                seen["in_flight"] = s("memfit_http_requests_in_flight")
                break
            time.sleep(0.05)
        gate.set()
        t.join(30)
    finally:
        engine.submit = real_submit
        gate.set()
    assert seen.get("running") == 1
    assert seen.get("in_flight", 0) >= 2  # the stream and this scrape
    assert scrape(client)("memfit_generation_requests_running") == 0


def test_process_and_platform_collectors(live):
    """prometheus_client's standard process, platform and GC collectors are on the app's registry."""
    _, client = live
    s = scrape(client)
    assert s("process_cpu_seconds_total") > 0
    assert s("process_resident_memory_bytes") > 10_000_000  # the model is loaded
    assert s("process_open_fds") > 0 and s("process_start_time_seconds") > 0
    assert s.has("python_info", implementation="CPython")
    assert s.has("python_gc_collections_total", generation="0")


def test_finish_reasons_are_counted(live):
    _, client = live
    a = scrape(client)
    r = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 2})
    assert r.status_code == 200 and r.json()["finish_reason"] == "length"
    stops = [" ", "e", "a", "o", "i", "n", "\n", ","]  # one of these comes within 24 tokens
    r = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 24, "stop": stops})
    assert r.status_code == 200 and r.json()["finish_reason"] == "stop", r.json()
    b = scrape(client)
    name = "memfit_generation_finished_total"

    def d(reason: str) -> float:
        return b(name, finish_reason=reason) - a(name, finish_reason=reason)

    assert d("length") == 1 and d("stop") == 1
    assert d("cancelled") == d("deadline") == d("error") == 0
    for reason in ("stop", "length", "cancelled", "deadline", "error"):  # exported before they happen
        assert b.has("memfit_generation_finished_total", finish_reason=reason)


def test_waiting_requests_are_a_gauge_apart_from_running(tiny_model_dir, tmp_path):
    """vLLM's num_requests_waiting: with the one decoding thread held by a request, a second request
    waits (waiting 1, running 1); a waiting request that is cancelled counts as `cancelled`."""
    from service.generation import SamplingParams

    settings = Settings(model=tiny_model_dir, store=tmp_path / "store", generation_workers=1)
    app = create_app(settings, start_runner=False)
    with TestClient(app) as client:
        engine = app.state.engine
        gate = threading.Event()
        first_piece = threading.Event()

        def held(item):  # runs on the decoding thread: it stops there until the gate opens
            if not first_piece.is_set():
                first_piece.set()
                gate.wait(60)

        params = SamplingParams(max_new_tokens=3)
        engine.submit(engine.prepare(PROMPT, params), held)
        try:
            assert first_piece.wait(60)
            waiting = engine.prepare(PROMPT, params)
            engine.submit(waiting, lambda item: None)
            second = engine.prepare(PROMPT, params)
            engine.submit(second, lambda item: None)
            s = scrape(client)
            assert s("memfit_generation_requests_running") == 1
            assert s("memfit_generation_requests_waiting") == 2
            engine.cancel(second)  # gone before it was decoded
            s = scrape(client)
            assert s("memfit_generation_requests_waiting") == 1
            assert s("memfit_generation_finished_total", finish_reason="cancelled") == 1
        finally:
            gate.set()
        assert engine.wait_idle(60)
        s = scrape(client)
        assert s("memfit_generation_requests_running") == 0
        assert s("memfit_generation_requests_waiting") == 0
        assert (
            s("memfit_generation_finished_total", finish_reason="length")
            + s("memfit_generation_finished_total", finish_reason="stop")
            == 2
        )


def test_generation_failures_move(live, monkeypatch):
    app, client = live
    import service.engine as engine_module

    def broken(*a, **kw):
        raise RuntimeError("injected sampling failure")

    a = scrape(client)
    monkeypatch.setattr(engine_module, "sample_token", broken)  # the engine's sampler
    lenient = TestClient(app, raise_server_exceptions=False)  # same app and state, no second lifespan
    r = lenient.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 4})
    monkeypatch.undo()
    assert r.status_code >= 500
    b = scrape(client)
    assert b("memfit_generation_failures_total") - a("memfit_generation_failures_total") == 1
    assert (
        b("memfit_http_requests_total", endpoint="/generate", status=str(r.status_code))
        - a("memfit_http_requests_total", endpoint="/generate", status=str(r.status_code))
        == 1
    )
    assert b("memfit_generation_requests_running") == 0


def test_update_metrics_move(live):
    app, client = live
    store = app.state.store
    a = scrape(client)
    assert a("memfit_memory_slots") == sum(int(t["rows"]) for t in store.table_info.values())
    r = client.post(
        "/ingest",
        json={"documents": [document("m-gentle", "Zorvath Quellingmar", "Brindlemoor")], "settings": GENTLE},
    )
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job_id"])
    assert job["status"] == "succeeded", job
    v = job["version"]
    deadline = time.time() + 10
    while app.state.engine.version != v and time.time() < deadline:
        time.sleep(0.05)
    b = scrape(client)
    d = lambda name, **kw: b(name, **kw) - a(name, **kw)  # noqa: E731
    slots = store.manifest(v)["slots_changed"]["total"]
    assert slots > 0
    # ingest, jobs, durations, publication
    assert d("memfit_ingested_documents_total") == 1
    assert d("memfit_jobs", state="succeeded") == 1
    assert d("memfit_jobs_finished_total", state="succeeded") == 1
    for phase in ("queued", "training", "evaluation", "publish", "total"):
        assert d("memfit_job_duration_seconds_count", phase=phase) == 1, phase
    assert d("memfit_ingest_to_live_seconds_count") == 1
    assert d("memfit_versions_published_total") == 1
    assert d("memfit_slots_changed_total") == slots
    assert d("memfit_update_slots_changed_count") == 1 and d("memfit_update_slots_changed_sum") == slots
    # the hot swap
    assert d("memfit_swaps_total") >= 1
    assert d("memfit_swap_duration_seconds_count") >= 1
    assert d("memfit_swap_pause_seconds_count") >= 1
    assert d("memfit_swap_rows_total") >= slots
    assert b("memfit_active_version") == v
    # knowledge gauges: the active version's evaluation
    ev = store.manifest(v)["evaluation"]
    assert b("memfit_knowledge_version", which="active") == v
    assert b("memfit_knowledge_version", which="latest") == v
    assert b("memfit_knowledge_learning_ratio", which="active", wording="ingested") == pytest.approx(
        ev["learning"]
    )
    assert b("memfit_knowledge_learning_ratio", which="active", wording="heldout") == pytest.approx(
        ev["learning_heldout"]
    )
    assert b("memfit_knowledge_retention_ratio", which="active", reference="parent") == pytest.approx(
        ev["retention"]
    )
    assert b("memfit_knowledge_retention_ratio", which="active", reference="base") == pytest.approx(
        ev["retention_base"]
    )
    assert b("memfit_knowledge_forgetting_ratio", which="active", reference="parent") == pytest.approx(
        ev["forgetting"]
    )
    assert b("memfit_knowledge_forgetting_ratio", which="active", reference="base") == pytest.approx(
        ev["forgetting_base"]
    )
    assert b("memfit_knowledge_heldout_perplexity", which="active") == pytest.approx(ev["perplexity"])
    assert b.has("memfit_knowledge_heldout_perplexity", which="base")
    assert b("memfit_knowledge_perplexity_change_ratio", which="active", reference="parent") == pytest.approx(
        ev["perplexity_change"]
    )
    # memory capacity of the active chain
    assert d("memfit_memory_slots_written") == slots
    assert b("memfit_memory_slots_written_ratio") == pytest.approx(slots / b("memfit_memory_slots"))
    assert d("memfit_memory_slot_writes") == slots
    assert b("memfit_memory_slot_rewrites_max") == 1
    assert b("memfit_memory_top_slots_write_share") > 0
    assert d("memfit_memory_slots_by_writes", writes="1") == slots
    assert d("memfit_store_versions", state="retained") + d("memfit_store_versions", state="active") == 1

    # a destructive update: rejected, kept, not activated
    r = client.post(
        "/ingest",
        json={
            "documents": [document("m-destroy", "Quenby Tarrowick", "Ostrelmere")],
            "settings": DESTRUCTIVE,
        },
    )
    job = wait_job(client, r.json()["job_id"])
    assert job["status"] == "rejected", job
    c = scrape(client)
    dc = lambda name, **kw: c(name, **kw) - b(name, **kw)  # noqa: E731
    assert dc("memfit_jobs", state="rejected") == 1
    assert dc("memfit_jobs_finished_total", state="rejected") == 1
    assert dc("memfit_updates_rejected_total", reason="forgetting_parent") == 1
    assert dc("memfit_updates_rejected_total", reason="forgetting_base") == 1
    assert dc("memfit_updates_rejected_total", reason="perplexity") == 1
    assert dc("memfit_versions_published_total") == 0
    assert dc("memfit_store_versions", state="rejected") == 1
    assert c("memfit_active_version") == v
    assert c("memfit_knowledge_version", which="active") == v
    assert c("memfit_knowledge_version", which="latest") == job["version"]
    assert c("memfit_knowledge_forgetting_ratio", which="latest", reference="base") == pytest.approx(
        job["evaluation"]["forgetting_base"]
    )

    # a rollback to the base, then forward again and a revert
    assert client.post("/versions/0/activate", json={"why": "test"}).status_code == 200
    e = scrape(client)
    assert e("memfit_rollbacks_total", kind="activate") - c("memfit_rollbacks_total", kind="activate") == 1
    assert e("memfit_active_version") == 0 and e("memfit_memory_slots_written") == 0
    assert e("memfit_knowledge_version", which="active") == 0
    assert client.post(f"/versions/{v}/activate", json={"why": "test"}).status_code == 200
    f = scrape(client)
    assert f("memfit_rollbacks_total", kind="activate") == e(
        "memfit_rollbacks_total", kind="activate"
    )  # forward
    assert client.post(f"/versions/{v}/revert", json={"why": "test"}).status_code == 200
    g = scrape(client)
    assert g("memfit_rollbacks_total", kind="revert") - f("memfit_rollbacks_total", kind="revert") == 1
    assert g("memfit_memory_slot_rewrites_max") == 2  # the revert wrote the same slots back


def test_queue_depth_moves(tiny_model_dir, tmp_path):
    settings = Settings(model=tiny_model_dir, store=tmp_path / "store")
    app = create_app(settings, start_runner=False)  # jobs stay queued
    with TestClient(app) as client:
        a = scrape(client)
        app.state.store.jobs.create_job(None, [document("q-1", "Ilvara Dunmoth", "Kestrelby")])
        app.state.store.jobs.create_job(None, [document("q-2", "Ilvara Dunmoth", "Kestrelby")])
        b = scrape(client)
    assert a("memfit_update_queue_depth") == 0 and b("memfit_update_queue_depth") == 2
    assert b("memfit_jobs", state="queued") - a("memfit_jobs", state="queued") == 2
    assert b("memfit_gate_enabled") == 1
    # no setting and the tiny model's update_defaults.json names none: the house thresholds
    assert b("memfit_gate_max_forgetting_ratio") == HOUSE_THRESHOLDS["max_forgetting"]
    assert b("memfit_gate_max_forgetting_base_ratio") == HOUSE_THRESHOLDS["max_forgetting_base"]
    assert b("memfit_gate_max_perplexity_increase_ratio") == HOUSE_THRESHOLDS["max_ppl_increase"]


def test_gate_gauges_show_the_models_thresholds(tiny_model_copy, tmp_path):
    """The thresholds in effect: the model's update_defaults.json gate_max_*, a setting over it."""
    import json

    (tiny_model_copy / "update_defaults.json").write_text(
        json.dumps(
            {"preserve": False, "shield": 0, "gate_max_forgetting": 0.05, "gate_max_ppl_increase": 0.02}
        )
    )
    settings = Settings(model=tiny_model_copy, store=tmp_path / "store", gate_max_ppl_increase=0.5)
    with TestClient(create_app(settings, start_runner=False)) as client:
        b = scrape(client)
    assert b("memfit_gate_max_forgetting_ratio") == 0.05  # the model's
    assert b("memfit_gate_max_forgetting_base_ratio") == HOUSE_THRESHOLDS["max_forgetting_base"]  # nobody's
    assert b("memfit_gate_max_perplexity_increase_ratio") == 0.5  # the setting's


def test_worker_endpoint_exports_job_metrics():
    """A Celery worker process serves its own /metrics (MEMFIT_WORKER_METRICS_PORT)."""
    from service import worker_metrics
    from workers.pipeline import JobResult

    port = worker_metrics.start_server(port=0, addr="127.0.0.1")
    try:

        def get() -> Scrape:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return Scrape(r.read().decode())

        a = get()
        timings = {"queued": 0.1, "training": 1.0, "evaluation": 0.5, "publish": 0.1, "total": 1.7}
        worker_metrics.observe_job(JobResult("j_1", "failed", timings=timings, error="boom"))
        gate = {"reasons": ["held-out perplexity change +0.300 > gate_max_ppl_increase 0.05"]}
        worker_metrics.observe_job(
            JobResult("j_2", "rejected", version=3, timings=timings, evaluation={"gate": gate})
        )
        b = get()
    finally:
        worker_metrics.stop_server()
    assert (
        b("memfit_jobs_finished_total", state="failed") - a("memfit_jobs_finished_total", state="failed") == 1
    )
    assert (
        b("memfit_jobs_finished_total", state="rejected") - a("memfit_jobs_finished_total", state="rejected")
        == 1
    )
    assert (
        b("memfit_job_duration_seconds_count", phase="evaluation")
        - a("memfit_job_duration_seconds_count", phase="evaluation")
        == 2
    )
    assert (
        b("memfit_updates_rejected_total", reason="perplexity")
        - a("memfit_updates_rejected_total", reason="perplexity")
        == 1
    )


def test_worker_instrumentation_records_each_finished_job_once():
    """memfit worker hooks its pipeline: a job run here is recorded; a redelivered finished one is not."""
    from types import SimpleNamespace

    from service import worker_metrics
    from workers.pipeline import JobResult

    statuses = {"j_new": "queued", "j_done": "succeeded"}

    class Jobs:
        def get(self, job_id):
            s = statuses[job_id]
            return SimpleNamespace(status=s, terminal=s in ("succeeded", "rejected", "failed", "cancelled"))

    store = SimpleNamespace(jobs=Jobs(), manifest=lambda v: {"slots_changed": {"total": 5}})

    class FakePipeline:  # workers.pipeline.Pipeline's contract: hooks only for a job it finished
        def __init__(self):
            self.finished_hooks = []

        def run_job(self, job_id, should_cancel=None):
            if statuses[job_id] == "succeeded":
                return JobResult(job_id, "succeeded", version=1)
            statuses[job_id] = "succeeded"
            result = JobResult(job_id, "succeeded", version=1, timings={"total": 1.0})
            for hook in self.finished_hooks:
                hook(result)
            return result

    pipe = FakePipeline()
    worker_metrics.instrument(pipe, store)
    worker_metrics.instrument(pipe, store)  # idempotent
    m = worker_metrics.metrics()
    before = Scrape(m.render().decode())
    pipe.run_job("j_new")
    pipe.run_job("j_done")  # a redelivered task of a finished job
    after = Scrape(m.render().decode())
    assert (
        after("memfit_jobs_finished_total", state="succeeded")
        - before("memfit_jobs_finished_total", state="succeeded")
        == 1
    )
    assert after("memfit_versions_published_total") - before("memfit_versions_published_total") == 1
    assert after("memfit_slots_changed_total") - before("memfit_slots_changed_total") == 5
