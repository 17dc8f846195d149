"""No request can stop serving (issue 17, "Serving must not be stoppable by a request").

Each test fails on the code before the fix, over real HTTP (a `memfit serve` subprocess, or the
in-process app for the one test that must reach a decoding thread) and the tiny pretrained model:

- an out-of-range integer (seed 2**64 on /v1/completions killed the decoding thread and its request
  hung, with /readyz green) is a 422 naming the field, on every numeric field of every generate
  and ingest schema, and serving goes on;
- a request whose decoding row cannot be built fails alone, the other rows of its batch finish;
- a dead decoding thread makes /readyz answer 503 and is started again;
- admission control: past MEMFIT_MAX_WAITING waiting requests a 503 with Retry-After, a generation
  past MEMFIT_REQUEST_TIMEOUT_S is stopped (503), and a client that disconnects (streaming or not)
  stops its row.

The greedy continuation of PROMPT_LONG runs to the length limit on the tiny model (no EOS in the
first 500 tokens); `test_client_disconnect_stops_its_row` checks that first, so that "the row stopped
early" cannot come from an early EOS. Timeouts are only "does not hang" bounds.
"""

from __future__ import annotations

import ctypes
import json
import queue
import socket
import threading
import time
from contextlib import ExitStack

import httpx
import pytest
from fastapi.testclient import TestClient

from memfit.config import Settings
from model_store import Store
from service.app import create_app
from service.engine import Engine
from service.engine_errors import GenerationFailed
from service.errors import as_api_error
from service.generation import SamplingParams
from tests.service.conftest import ServerProcess

PROMPT_LONG = "1 2 3 4 5 6 7"
LONG = 500  # tokens asked of PROMPT_LONG
HANG = 60.0  # seconds: "does not hang"


def assert_error(r: httpx.Response, status: int, field: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    if field is not None:
        assert err["field"] == field, err
    if code is not None:
        assert err["code"] == code, err
    return err


def metric(client: httpx.Client, name: str) -> float:
    text = client.get("/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_until(cond, timeout: float = HANG, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} not reached in {timeout} s")


def first_token(lines) -> str:
    """Read SSE lines until the first token event."""
    for line in lines:
        if line.startswith("data:"):
            event = json.loads(line[5:])
            assert "token" in event or "choices" in event, event
            return line
    raise AssertionError("stream ended before a token")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """One server for the boundary and disconnect tests (long generations allowed)."""
    home = tmp_path_factory.mktemp("hardening")
    s = ServerProcess(tiny_model_dir, home / "store", home, {"MEMFIT_MAX_NEW_TOKENS_LIMIT": str(LONG)})
    s.start()
    yield s
    s.kill()


# ---- 1. out-of-range integers ---------------------------------------------------------------------


def test_out_of_range_seed_is_422_and_serving_goes_on(server):
    """Before: /v1/completions took seed 2**64, torch.Generator().manual_seed raised in the decoding
    thread outside its try block, the thread died and the request never got an answer; two such
    requests stopped all generation while /readyz stayed green."""
    with server.client(timeout=30.0) as c:
        for seed in (2**64, 2**63, 2**200):
            body = {"model": "memfit", "prompt": "Hi", "max_tokens": 3, "temperature": 1.0, "seed": seed}
            assert_error(c.post("/v1/completions", json=body), 422, field="seed")
        r = c.post("/generate", json={"prompt": "Hi", "max_new_tokens": 3, "temperature": 1.0, "seed": 2**64})
        assert_error(r, 422, field="seed")
        # the largest seed accepted works on both routes, and generation still runs
        top = 2**63 - 1
        r = c.post("/v1/completions", json={"model": "memfit", "prompt": "Hi", "max_tokens": 3, "seed": top})
        assert r.status_code == 200, r.text
        r = c.post("/generate", json={"prompt": "Hi", "max_new_tokens": 3, "temperature": 1.0, "seed": top})
        assert r.status_code == 200, r.text
        assert c.get("/readyz").status_code == 200


BAD_INTS = [2**63, 2**64, -1, -(2**63) - 1, 1e300, float("nan"), float("inf"), 1.5]
BAD_FLOATS = [-1, 1e300, -1e300, float("nan"), float("inf"), float("-inf")]
GEN = {"prompt": "Hi", "max_new_tokens": 2}
CMPL = {"model": "memfit", "prompt": "Hi", "max_tokens": 2}
CASES = (
    [("/generate", GEN, f, v, f) for f in ("max_new_tokens", "top_k", "seed", "min_version", "version") for v in BAD_INTS]
    + [("/generate", GEN, f, v, f) for f in ("temperature", "top_p") for v in BAD_FLOATS]
    + [("/v1/completions", CMPL, f, v, f) for f in ("max_tokens", "n", "seed", "logprobs", "best_of") for v in BAD_INTS]
    + [("/v1/completions", CMPL, f, v, f) for f in ("top_k", "version", "min_version") for v in BAD_INTS]
    + [("/v1/completions", CMPL, f, v, f) for f in ("temperature", "top_p") for v in BAD_FLOATS]
)  # fmt: skip


@pytest.mark.parametrize("path,base,name,value,field", CASES, ids=lambda x: repr(x)[:30])
def test_every_numeric_field_is_bounded(server, path, base, name, value, field):
    """Boundary values (2**63, 2**64, negative, huge and non-finite floats, where JSON as Python
    reads it allows NaN/Infinity) on every numeric field of the generate routes: a 422 naming the
    field, never a 5xx or a hang."""
    body = json.dumps({**base, name: value})  # allow_nan: NaN / Infinity literals, as json.loads reads
    with server.client(timeout=30.0) as c:
        r = c.post(path, content=body, headers={"content-type": "application/json"})
        assert_error(r, 422, field=field)


@pytest.mark.parametrize(
    "settings,field",
    [({"top_t": v}, "settings.top_t") for v in (2**63, 2**64, -1, 1e300, float("nan"))]
    + [({"steps": v}, "settings.steps") for v in (2**64, -1, float("inf"))]
    + [({"lr": v}, "settings.lr") for v in (-1, 1e300, float("nan"), float("inf"))]
    + [
        ({name: v}, f"settings.{name}")
        for name in ("batch_size", "max_seq_len", "paraphrases", "question_rewrites", "replay", "extra_steps")
        for v in (2**63, -1, 10**6)
    ]
    + [({"seed": v}, "settings.seed") for v in (2**63, 2**64, -1)]
    + [({name: v}, f"settings.{name}") for name in ("max_df", "grad_clip") for v in (-1, 1e300, float("nan"))]
    + [({"adam_eps": 1e-3}, "settings.adam_eps")],  # outside the allow-list
    ids=repr,
)
def test_ingest_numeric_overrides_are_bounded(server, settings, field):
    body = {"documents": [{"text": "Goju Theipouquis was born in Peivistead."}], "settings": settings}
    with server.client(timeout=30.0) as c:
        r = c.post("/ingest", content=json.dumps(body), headers={"content-type": "application/json"})
        assert_error(r, 422, field=field)


def test_embedded_job_past_the_time_limit_fails(server_factory):
    """Before: an embedded job had no time limit (only Celery tasks did): 10,000 steps without an
    early stop kept the update runner busy for minutes. Now MEMFIT_TASK_TIME_LIMIT_S bounds it in
    both modes: past it the job fails at the next step boundary, naming the setting, and nothing is
    published; the runner takes the next job."""
    s = server_factory({"MEMFIT_TASK_TIME_LIMIT_S": "2", "MEMFIT_GATE_ENABLED": "false"})
    doc = {"text": "Goju Theipouquis was born in Peivistead."}
    with s.client(timeout=HANG) as c:
        r = c.post("/ingest", json={"documents": [doc], "settings": {"steps": 10_000, "early_stop": False}})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        t0 = time.monotonic()
        wait_until(
            lambda: c.get(f"/jobs/{job_id}").json()["status"] not in ("queued", "running"), 60, "job end"
        )
        took = time.monotonic() - t0
        job = c.get(f"/jobs/{job_id}").json()
        assert job["status"] == "failed", job
        assert "MEMFIT_TASK_TIME_LIMIT_S" in job["error"] and "JobTimedOut" in job["error"], job["error"]
        # the error above is what shows the limit fired; the wall bound only guards against a hang (it
        # includes loading and access counting, 27 s on a loaded 2-core box)
        assert job["version"] is None and took < 60, took
        assert [v["id"] for v in c.get("/versions").json()["versions"]] == [0]
        # the runner is free again: the next job is taken at once (it ends, whatever its outcome)
        r = c.post("/ingest", json={"documents": [doc], "settings": {"steps": 1, "early_stop": False}})
        nxt = r.json()["job_id"]
        wait_until(lambda: c.get(f"/jobs/{nxt}").json()["status"] not in ("queued", "running"), 30, "next")


# ---- a bad row fails alone; a dead decoding thread --------------------------------------------------


def _collect(q: queue.Queue) -> object:
    """The final item a request's emit got: its done Delta or its exception."""
    while True:
        item = q.get(timeout=HANG)
        if isinstance(item, BaseException) or item.done:
            return item


def test_a_row_that_cannot_start_fails_alone(tiny_model_dir, tmp_path):
    """A seed torch refuses (past the schema, e.g. a future route) in the middle of a batch: that
    request gets an error, the others of its wave and of a running batch finish, the thread lives."""
    store = Store.init(tmp_path / "store", tiny_model_dir)
    settings = Settings(
        model=tiny_model_dir, store=tmp_path / "store", generation_workers=1, max_batch_size=8
    )
    engine = Engine.from_store(store, settings)
    try:
        good, bad = (
            SamplingParams(max_new_tokens=6),
            SamplingParams(max_new_tokens=6, temperature=1.0, seed=2**64),
        )
        for joining in (False, True):
            running = queue.Queue()
            if joining:  # a batch is decoding: the bad row arrives as a joiner
                engine.submit(engine.prepare(PROMPT_LONG, SamplingParams(max_new_tokens=40)), running.put)
                assert not isinstance(running.get(timeout=HANG), BaseException)
            qs = [queue.Queue() for _ in range(3)]
            with engine._pending_cond:  # one wave (or one join) of three, the middle one bad
                for q, p in zip(qs, (good, bad, good)):
                    engine._pending.append((engine.prepare("The capital of France is", p), q.put))
                engine._pending_cond.notify_all()
            first, failed, last = (_collect(q) for q in qs)
            assert isinstance(failed, GenerationFailed), failed  # the engine's own error, no HTTP
            assert as_api_error(failed).status == 500 and failed.code == "generation_failed", failed
            assert not isinstance(first, BaseException) and first.done
            assert not isinstance(last, BaseException) and last.done
            if joining:
                assert not isinstance(_collect(running), BaseException)
        # the decoding thread is alive: a later request is served
        after = engine.complete(engine.prepare("Hi", good))
        assert after.completion_tokens >= 1
        assert all(t.is_alive() for t in engine._decoders)
    finally:
        engine.close()


class _Killed(BaseException):
    """Raised inside a decoding thread by the test (what an escaped error does to it)."""


def _kill_thread(t: threading.Thread) -> None:
    n = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(t.ident), ctypes.py_object(_Killed))
    assert n == 1, n


def test_readyz_fails_when_a_decoding_thread_is_dead_and_it_is_restarted(tiny_model_dir, tmp_path):
    """Before: /readyz said ready with every decoding thread dead (requests queued forever)."""
    settings = Settings(
        model=tiny_model_dir, store=tmp_path / "store", redis_url=None, api_keys=None, api_keys_file=None,
        rate_limit_per_minute=0, generation_workers=2,
    )  # fmt: skip
    app = create_app(settings, start_runner=False)
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get("/readyz").status_code == 200
        engine = app.state.engine
        threads = list(engine._decoders)
        for t in threads:
            _kill_thread(t)
        with engine._pending_cond:  # wake them (idle, they wait on the queue) so that they die
            engine._pending_cond.notify_all()
        for t in threads:
            t.join(HANG)
            assert not t.is_alive()
        r = c.get("/readyz")
        assert r.status_code == 503, r.text
        body = r.json()
        assert body["ready"] is False and "decoding thread" in body["detail"], body
        assert "memfit-decode-0" in body["detail"] and "restarted" in body["detail"], body
        # restarted: generation works and the next probe is green
        r = c.post("/generate", json={"prompt": "Hi", "max_new_tokens": 3})
        assert r.status_code == 200, r.text
        assert c.get("/readyz").status_code == 200
        assert all(t.is_alive() for t in engine._decoders) and engine.decoder_restarts == 2


# ---- 2. admission control ---------------------------------------------------------------------------


def _stream(stack: ExitStack, url: str, body: dict, path: str = "/generate") -> tuple[httpx.Response, object]:
    """A streaming request on its own connection (closing the client closes the socket)."""
    client = stack.enter_context(httpx.Client(base_url=url, timeout=HANG))
    r = stack.enter_context(client.stream("POST", path, json={**body, "stream": True}))
    return r, r.iter_lines()


def test_past_max_waiting_is_503_with_retry_after(server_factory):
    """Before: the pending queue (and a waiter thread per request) grew without bound; a request
    past it waited behind everything. Now one decoding slot busy, one request waiting
    (MEMFIT_MAX_WAITING=1): the next one is a 503 with Retry-After, on both routes."""
    s = server_factory(
        {
            "MEMFIT_GENERATION_WORKERS": "1",
            "MEMFIT_MAX_BATCH_SIZE": "1",
            "MEMFIT_MAX_WAITING": "1",
            "MEMFIT_MAX_NEW_TOKENS_LIMIT": str(LONG),
        }
    )
    long = {"prompt": PROMPT_LONG, "max_new_tokens": LONG}
    with ExitStack() as a_stack, ExitStack() as b_stack, s.client(timeout=HANG) as c:
        a, a_lines = _stream(a_stack, s.url, long)  # decoding (the only slot)
        first_token(a_lines)
        b, _ = _stream(b_stack, s.url, long)  # waiting: the status line comes after it was queued
        assert b.status_code == 200
        with c.stream("POST", "/generate", json={**long, "stream": True}) as r:
            r.read()
            assert_error(r, 503, field="MEMFIT_MAX_WAITING", code="overloaded")
            assert int(r.headers["retry-after"]) >= 1
        r = c.post("/generate", json=long)
        assert_error(r, 503, field="MEMFIT_MAX_WAITING", code="overloaded")
        assert "retry-after" in r.headers
        r = c.post("/v1/completions", json={"model": "memfit", "prompt": "Hi", "max_tokens": 2})
        assert_error(r, 503, field="MEMFIT_MAX_WAITING", code="overloaded")
        a_stack.close()  # A's client goes away: B is decoded, the queue is empty again
        b_stack.close()
        wait_until(lambda: metric(c, "memfit_generation_requests_running") == 0, what="rows stopped")
        r = c.post("/generate", json={"prompt": "Hi", "max_new_tokens": 3})
        assert r.status_code == 200, r.text


def test_request_timeout_stops_the_generation(server_factory):
    """Before: no deadline, a generation ran as long as its tokens took. With
    MEMFIT_REQUEST_TIMEOUT_S=0.05 (a 500-token generation takes far longer): a 503 naming the
    setting (in-band for a stream) and the engine stops decoding the row."""
    s = server_factory({"MEMFIT_REQUEST_TIMEOUT_S": "0.05", "MEMFIT_MAX_NEW_TOKENS_LIMIT": str(LONG)})
    long = {"prompt": PROMPT_LONG, "max_new_tokens": LONG}
    with s.client(timeout=HANG) as c:
        r = c.post("/generate", json=long)
        err = assert_error(r, 503, field="MEMFIT_REQUEST_TIMEOUT_S", code="deadline_exceeded")
        assert "request_timeout_s" in err["message"] and "retry-after" in r.headers
        r = c.post("/v1/completions", json={"model": "memfit", "prompt": PROMPT_LONG, "max_tokens": LONG})
        assert_error(r, 503, field="MEMFIT_REQUEST_TIMEOUT_S", code="deadline_exceeded")
        with c.stream("POST", "/generate", json={**long, "stream": True}) as r:
            events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
        assert r.status_code == 200
        assert events and events[-1]["error"]["code"] == "deadline_exceeded", events[-3:]
        assert not any(e.get("done") for e in events)
        wait_until(lambda: metric(c, "memfit_generation_requests_running") == 0, what="rows stopped")
        assert metric(c, "memfit_generation_tokens_total") < 3 * LONG / 2  # stopped, not run out


def test_client_disconnect_stops_its_row(server):
    """Before: a non-streaming generation whose client had gone decoded to its last token. Now the
    route sees http.disconnect and the engine drops the row at the next step (streaming did stop)."""
    with server.client(timeout=HANG) as c:
        # the precondition: uncancelled, this prompt decodes 100 tokens without an EOS
        r = c.post("/generate", json={"prompt": PROMPT_LONG, "max_new_tokens": 100})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 100, r.text
        assert r.json()["finish_reason"] == "length"
        wait_until(lambda: metric(c, "memfit_generation_requests_running") == 0, what="idle")

        # non-streaming: a raw socket that closes once the generation is running
        before = metric(c, "memfit_generation_tokens_total")
        body = json.dumps({"prompt": PROMPT_LONG, "max_new_tokens": LONG}).encode()
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=HANG)
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_until(lambda: metric(c, "memfit_generation_requests_running") >= 1, what="generation running")
        sock.close()
        wait_until(lambda: metric(c, "memfit_generation_requests_running") == 0, what="row stopped")
        stopped_after = metric(c, "memfit_generation_tokens_total") - before
        assert stopped_after < 100, f"{stopped_after} tokens decoded for a client that had gone"

        # streaming: read a few tokens, then close the connection
        before = metric(c, "memfit_generation_tokens_total")
        with ExitStack() as stack:
            _, lines = _stream(stack, server.url, {"prompt": PROMPT_LONG, "max_new_tokens": LONG})
            first_token(lines)
        wait_until(lambda: metric(c, "memfit_generation_requests_running") == 0, what="row stopped")
        assert metric(c, "memfit_generation_tokens_total") - before < 100
        assert c.get("/readyz").status_code == 200


# ---- boundary fuzzing -----------------------------------------------------------------------------


def test_boundary_fuzz_every_numeric_field(tiny_model_dir, tmp_path):
    """Found from /openapi.json alone (so a new field cannot be left out): every integer and number
    field of every operation has both bounds (before: seed, max_new_tokens, top_k, version ids, ...
    had no maximum), and boundary values in each of them answer 4xx naming the field or 2xx, never
    a 5xx. The long run (all of BOUNDARY_VALUES, with the schemathesis run): benchmarks/fuzz_api.py."""
    from tests.service.fuzz_boundaries import SMALL_SET, plan, run_boundary_fuzz

    spec = create_app(Settings(model=tiny_model_dir, store=tmp_path / "unused"), start_runner=False).openapi()
    cases, unbounded = plan(spec, SMALL_SET)
    assert unbounded == [], unbounded
    report, _ = run_boundary_fuzz(tiny_model_dir, tmp_path, SMALL_SET)
    print(report.summary())
    assert report.cases == len(cases) >= 150, report.summary()
    assert {"POST /generate", "POST /v1/completions", "POST /ingest", "GET /jobs"} <= set(report.by_operation)
    assert report.server_errors == 0 and report.failures == [], report.summary()
    assert report.by_status[422] > report.cases // 2, report.summary()


def test_ingest_bytes_are_capped_per_key_and_minute(server_factory):
    """Before: a write key could post documents at any byte rate (only the request count was limited),
    and every process holds them. Now MEMFIT_INGEST_BYTES_PER_MINUTE is a per-key byte budget: a
    request over the whole budget is a 413, one over what is left a 429 with Retry-After, both naming
    the setting; nothing is recorded for them, and an Idempotency-Key replay is not charged again."""
    s = server_factory({"MEMFIT_INGEST_BYTES_PER_MINUTE": "1000"})
    with s.client(timeout=HANG) as c:
        big = c.post("/ingest", json={"documents": [{"text": "x" * 1001}]})
        assert big.status_code == 413 and big.json()["error"]["field"] == "ingest_bytes_per_minute", big.text
        doc = {"documents": [{"text": "Goju Theipouquis was born in Peivistead. " + "y" * 560}]}
        first = c.post("/ingest", json=doc, headers={"Idempotency-Key": "k1"})
        assert first.status_code == 202, first.text
        again = c.post("/ingest", json=doc, headers={"Idempotency-Key": "k1"})  # a replay: same job, free
        assert again.status_code in (200, 202) and again.json()["job_id"] == first.json()["job_id"], (
            again.text
        )
        over = c.post("/ingest", json=doc)
        assert over.status_code == 429, over.text
        assert over.json()["error"]["field"] == "ingest_bytes_per_minute"
        assert int(over.headers["Retry-After"]) >= 1
        jobs = c.get("/jobs").json()["jobs"]
        assert [j["job_id"] for j in jobs] == [first.json()["job_id"]]  # nothing recorded for the refusals
