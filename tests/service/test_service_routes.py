"""Route-level tests on the in-process app (TestClient): every 4xx path in the contract's error shape,
limits naming the limit, SSE format, OpenAPI examples, version pinning and min_version.

The app runs without an update runner (`start_runner=False`): jobs stay queued, and versions are
published straight into the store with synthetic deltas, so nothing here trains.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from fastapi.testclient import TestClient

from memfit.config import Settings
from memlm.delta import LayerDelta, SlotDelta
from service.app import create_app

DOC = {"documents": [{"id": "d-1", "text": "Goju Theipouquis was born in Peivistead."}]}


def settings_for(model, store, **kw) -> Settings:
    base = dict(
        model=model,
        store=store,
        redis_url=None,
        api_keys=None,
        api_keys_file=None,
        rate_limit_per_minute=0,
        max_documents_per_request=3,
        max_document_chars=200,
        max_facts_per_document=2,
        max_prompt_chars=300,
        max_new_tokens_limit=20,
        max_stop_sequences=2,
        max_request_bytes=20_000,
        max_queue_depth=4,
        min_version_wait_s=0.6,
        follow_interval_s=0.05,
    )
    base.update(kw)
    return Settings(**base)


@pytest.fixture(scope="module")
def app_client(tiny_model_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("routes") / "store"
    app = create_app(settings_for(tiny_model_dir, store), start_runner=False)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield app, client


def assert_error(
    r, status: int, field: str | None = None, code: str | None = None, mentions: str | None = None
):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    assert {"code", "message", "field"} <= set(body["error"]), body
    if field is not None:
        assert body["error"]["field"] == field, body
    if code is not None:
        assert body["error"]["code"] == code, body
    if mentions is not None:
        assert mentions in body["error"]["message"], body
    return body["error"]


def publish_synthetic(store, activate: bool = True, state: str = "active", slots=(0, 1, 2, 3)) -> int:
    """A version that rewrites a few value rows with noise (no training)."""
    parent = store.active()
    idx = torch.tensor(sorted(slots), dtype=torch.int64)
    layers = {}
    for layer in store.table_info:
        old = store.rows_at(parent, {layer: idx})[layer]
        layers[layer] = LayerDelta(idx, old + torch.randn_like(old) * 5.0, old)
    return store.publish(SlotDelta(layers), parent, documents=[], activate=activate, state=state)


def wait_served(client, version: int, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = client.post("/generate", json={"prompt": "Hello", "max_new_tokens": 1})
        if r.headers.get("X-Memfit-Version") == str(version):
            return
        time.sleep(0.05)
    raise AssertionError(f"version {version} not served within {timeout} s")


# ---- generate ---------------------------------------------------------------------------------


def test_generate_json_and_header(app_client):
    _, c = app_client
    r = c.post("/generate", json={"prompt": "The capital of France is", "max_new_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"text", "version", "finish_reason", "usage"}
    assert body["finish_reason"] in ("stop", "length")
    assert body["usage"]["prompt_tokens"] > 0 and 0 < body["usage"]["completion_tokens"] <= 5
    assert r.headers["X-Memfit-Version"] == str(body["version"])


def test_generate_greedy_is_deterministic_and_seed_reproducible(app_client):
    _, c = app_client
    req = {"prompt": "Question: What is the capital of Armenia?\nAnswer:", "max_new_tokens": 8}
    a, b = c.post("/generate", json=req).json(), c.post("/generate", json=req).json()
    assert a["text"] == b["text"]
    sampled = {**req, "temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": 7}
    s1, s2 = c.post("/generate", json=sampled).json(), c.post("/generate", json=sampled).json()
    assert s1["text"] == s2["text"]


def test_stop_sequences_cut_the_text(app_client):
    _, c = app_client
    full = c.post("/generate", json={"prompt": "The capital of France is", "max_new_tokens": 12}).json()[
        "text"
    ]
    assert len(full) > 2
    stop = full[1:3]
    r = c.post(
        "/generate", json={"prompt": "The capital of France is", "max_new_tokens": 12, "stop": [stop]}
    ).json()
    assert r["finish_reason"] == "stop"
    assert stop not in r["text"] and full.startswith(r["text"])


def test_sse_stream_format(app_client):
    _, c = app_client
    body = {"prompt": "The capital of France is", "max_new_tokens": 6, "stream": True}
    with c.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        version = r.headers["X-Memfit-Version"]
        raw = "".join(r.iter_text())
    events = [e for e in raw.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events), raw
    objs = [json.loads(e[len("data: ") :]) for e in events]
    assert objs[-1]["done"] is True
    assert str(objs[-1]["version"]) == version
    assert objs[-1]["finish_reason"] in ("stop", "length")
    assert set(objs[-1]["usage"]) == {"prompt_tokens", "completion_tokens"}
    tokens = [o["token"] for o in objs[:-1]]
    assert all(set(o) == {"token"} for o in objs[:-1])
    plain = c.post("/generate", json={**body, "stream": False}).json()
    assert "".join(tokens) == plain["text"]


@pytest.mark.parametrize(
    "body, status, field, mentions",
    [
        ({}, 422, "prompt", None),
        ({"prompt": ""}, 422, "prompt", None),
        ({"prompt": "x", "max_new_tokens": 0}, 422, "max_new_tokens", None),
        ({"prompt": "x", "max_new_tokens": 21}, 422, "max_new_tokens", "max_new_tokens_limit"),
        ({"prompt": "x" * 301}, 413, "prompt", "max_prompt_chars"),
        ({"prompt": "x", "stop": ["a", "b", "c"]}, 422, "stop", "max_stop_sequences"),
        ({"prompt": "x", "stop": [""]}, 422, "stop", None),
        ({"prompt": "x", "temperature": -1}, 422, "temperature", None),
        ({"prompt": "x", "top_p": 0}, 422, "top_p", None),
        ({"prompt": "x", "top_k": -2}, 422, "top_k", None),
        ({"prompt": "x", "temprature": 0.5}, 422, "temprature", None),
        ({"prompt": 5}, 422, "prompt", None),
        ({"prompt": "x", "version": -1}, 422, "version", None),
        ({"prompt": "x", "version": 0, "min_version": 0}, 422, "version", None),
        ({"prompt": "x", "version": 999}, 404, "version", None),
    ],
)
def test_generate_4xx(app_client, body, status, field, mentions):
    _, c = app_client
    assert_error(c.post("/generate", json=body), status, field, mentions=mentions)


def test_bad_json_and_oversized_body(app_client):
    _, c = app_client
    r = c.post("/generate", content=b"{not json", headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500
    assert_error(r, r.status_code)
    r = c.post("/generate", content=b"x" * 20_001, headers={"Content-Type": "application/json"})
    assert_error(r, 413, "max_request_bytes", "payload_too_large", "max_request_bytes")


def test_unknown_route_and_method(app_client):
    _, c = app_client
    assert_error(c.get("/nope"), 404)
    assert_error(c.get("/generate"), 405)


# ---- versions, pinning, min_version -------------------------------------------------------


def test_pin_min_version_rollback(app_client):
    app, c = app_client
    store = app.state.store
    prompt = {"prompt": "Question: What is the capital of Armenia?\nAnswer:", "max_new_tokens": 8}
    before = c.post("/generate", json=prompt).json()
    v = publish_synthetic(store)
    r = c.post("/generate", json={**prompt, "min_version": v})  # waits for the follower to swap
    assert r.status_code == 200, r.text
    assert r.json()["version"] == v
    after = r.json()["text"]
    pinned = c.post("/generate", json={**prompt, "version": before["version"]})
    assert pinned.status_code == 200 and pinned.json()["version"] == before["version"]
    assert pinned.json()["text"] == before["text"]  # the per-request overlay reproduces the old rows
    assert c.post("/generate", json={**prompt, "version": v}).json()["text"] == after

    # a rejected version: pinning and min_version are 409 at once
    rej = publish_synthetic(store, activate=False, state="rejected", slots=(5, 6))
    assert_error(c.post("/generate", json={**prompt, "version": rej}), 409, "version", "version_rejected")
    t0 = time.time()
    assert_error(
        c.post("/generate", json={**prompt, "min_version": rej}), 409, "min_version", "version_rejected"
    )
    assert time.time() - t0 < 0.5

    # a version not published yet: 503 with Retry-After after min_version_wait_s
    r = c.post("/generate", json={**prompt, "min_version": rej + 50})
    assert_error(r, 503, "min_version", "version_not_ready")
    assert int(r.headers["Retry-After"]) >= 1

    # roll back through the API: v leaves the active chain -> 409 at once
    r = c.post(f"/versions/{before['version']}/activate", json={"why": "test rollback"})
    assert r.status_code == 200, r.text
    assert r.json() == {"active": before["version"], "previous": v}
    assert_error(
        c.post("/generate", json={**prompt, "min_version": v}),
        409,
        "min_version",
        "version_not_in_active_chain",
    )
    assert c.post("/generate", json=prompt).json()["text"] == before["text"]
    # roll forward again
    assert c.post(f"/versions/{v}/activate").status_code == 200
    assert c.post("/generate", json=prompt).json()["text"] == after

    listing = c.get("/versions").json()
    assert listing["active"] == v
    states = {x["id"]: x["state"] for x in listing["versions"]}
    assert states[v] == "active" and states[rej] == "rejected"
    one = c.get(f"/versions/{v}").json()
    assert one["id"] == v and one["active"] is True and one["slots_changed"] == 4 * len(store.table_info)


def test_cli_rollback_reaches_the_server(app_client):
    """A rollback written to the store by another process (the CLI) is followed within a second."""
    app, c = app_client
    from model_store import Store

    other = Store(app.state.store.root)  # a separate handle, as `memfit rollback` would open
    current = other.active()
    v = publish_synthetic(other)
    wait_served(c, v, timeout=2.0)
    other.activate(current, who="cli", why="test")
    t0 = time.time()
    wait_served(c, current, timeout=2.0)
    assert time.time() - t0 < 1.5


def test_versions_4xx(app_client):
    _, c = app_client
    assert_error(c.get("/versions/999999"), 404, "version_id")
    assert_error(c.get("/versions/abc"), 422, "version_id")
    assert_error(c.get("/versions/-1"), 422, "version_id")
    assert_error(c.post("/versions/999999/activate"), 404, "version_id")
    r = c.post("/documents/%2e%2e/revert")
    assert 400 <= r.status_code < 500 and set(r.json()) == {"error"}
    assert_error(c.post("/documents/never-ingested/revert"), 404, "document_id", code="document_not_found")


def test_activate_rejected_version_is_409(app_client):
    app, c = app_client
    rej = publish_synthetic(app.state.store, activate=False, state="rejected", slots=(9,))
    assert_error(c.post(f"/versions/{rej}/activate"), 409, "version_id")


# ---- ingest and jobs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, status, field, mentions",
    [
        ({}, 422, "documents", None),
        ({"documents": []}, 422, "documents", None),
        ({"documents": [{"text": "a"}] * 4}, 413, "documents", "max_documents_per_request"),
        ({"documents": [{"text": "a" * 201}]}, 413, "documents[0].text", "max_document_chars"),
        (
            {"documents": [{"text": "a", "facts": [{"question": "q", "answer": "a"}] * 3}]},
            422,
            "documents[0].facts",
            "max_facts_per_document",
        ),
        ({"documents": [{"id": "../etc/passwd", "text": "a"}]}, 422, "documents[0].id", None),
        ({"documents": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]}, 422, "documents[1].id", None),
        ({"documents": [{"text": ""}]}, 422, "documents[0].text", None),
        (
            {"documents": [{"text": "a", "facts": [{"question": "q"}]}]},
            422,
            "documents[0].facts[0].answer",
            None,
        ),
        ({"documents": [{"text": "a"}], "settings": {"wibble": 1}}, 422, "settings.wibble", None),
        ({"documents": [{"text": "a"}], "settings": {"top_t": 0}}, 422, "settings.top_t", None),
        ({"documents": [{"text": "a"}], "settings": {"top_t": 10**9}}, 422, "settings.top_t", None),
        ({"documents": [{"text": "a"}], "settings": {"optimizer": "lbfgs"}}, 422, "settings.optimizer", None),
        # issue 17: only an allow-list of trainer fields, each bounded (these were all accepted)
        ({"documents": [{"text": "a"}], "settings": {"adam_eps": 1e-3}}, 422, "settings.adam_eps", None),
        (
            {"documents": [{"text": "a"}], "settings": {"adam_betas": [0.5, 0.5]}},
            422,
            "settings.adam_betas",
            None,
        ),
        ({"documents": [{"text": "a"}], "settings": {"batch_size": 10**6}}, 422, "settings.batch_size", None),
        (
            {"documents": [{"text": "a"}], "settings": {"max_seq_len": 10**6}},
            422,
            "settings.max_seq_len",
            None,
        ),
        (
            {"documents": [{"text": "a"}], "settings": {"paraphrases": 10**4}},
            422,
            "settings.paraphrases",
            None,
        ),
        ({"documents": [{"text": "a"}], "settings": {"replay": 10**6}}, 422, "settings.replay", None),
        (
            {"documents": [{"text": "a"}], "settings": {"extra_steps": 10**7}},
            422,
            "settings.extra_steps",
            None,
        ),
        ({"documents": [{"text": "a"}], "settings": {"method": "all"}}, 422, "settings.method", None),
        ({"documents": [{"text": "a"}], "settings": {"max_df": 2.0}}, 422, "settings.max_df", None),
        ({"documents": [{"text": "a", "colour": "red"}]}, 422, "documents[0].colour", None),
    ],
)
def test_ingest_4xx(app_client, body, status, field, mentions):
    _, c = app_client
    assert_error(c.post("/ingest", json=body), status, field, mentions=mentions)


def test_allowed_update_overrides_are_recorded(app_client):
    """Every allow-listed override, in range, is accepted and recorded with the job as sent."""
    app, c = app_client
    jobs = app.state.store.jobs
    for j in jobs.queued(include_running=False):
        jobs.cancel(j.job_id)
    overrides = {
        "top_t": 8, "steps": 5, "lr": 10000.0, "optimizer": "adam", "method": "tf", "batch_size": 8,
        "loss_reduction": "mean", "early_stop": False, "check_every": 2, "extra_steps": 1,
        "grad_clip": 1.0, "max_row_change": 2.0, "max_df": 0.05, "idf_lr_power": 0.5, "replay": 4,
        "replay_weight": 0.5, "seed": 2**63 - 1, "max_seq_len": 64, "paraphrases": 1,
        "question_rewrites": 2, "train_text": True,
    }  # fmt: skip
    r = c.post("/ingest", json={"documents": [{"text": "Taia exports glass."}], "settings": overrides})
    assert r.status_code == 202, r.text
    job = jobs.get(r.json()["job_id"])
    assert job.settings == overrides
    jobs.cancel(job.job_id)


def test_idempotency_and_queue_limit(app_client):
    app, c = app_client
    jobs = app.state.store.jobs
    for j in jobs.queued(include_running=False):  # start from an empty queue
        jobs.cancel(j.job_id)
    r1 = c.post("/ingest", json=DOC, headers={"Idempotency-Key": "key-1"})
    assert r1.status_code == 202, r1.text
    assert r1.json()["status"] == "queued" and r1.json()["documents"] == ["d-1"]
    assert r1.headers["Location"] == f"/jobs/{r1.json()['job_id']}"
    r2 = c.post("/ingest", json=DOC, headers={"Idempotency-Key": "key-1"})
    assert r2.status_code == 202 and r2.json()["job_id"] == r1.json()["job_id"]
    assert r2.headers.get("Idempotent-Replayed") == "true"
    other = {"documents": [{"id": "d-2", "text": "something else"}]}
    assert_error(c.post("/ingest", json=other, headers={"Idempotency-Key": "key-1"}), 409, "Idempotency-Key")
    assert_error(c.post("/ingest", json=DOC, headers={"Idempotency-Key": "x" * 201}), 422, "Idempotency-Key")

    # queue depth: 4 queued at most, the 5th is a 429 naming max_queue_depth
    for i in range(3):
        assert c.post("/ingest", json={"documents": [{"text": f"doc {i}"}]}).status_code == 202
    r = c.post("/ingest", json={"documents": [{"text": "one too many"}]})
    assert_error(r, 429, "max_queue_depth", "queue_full", "max_queue_depth")
    assert int(r.headers["Retry-After"]) >= 1
    # a retry of a known key still answers while the queue is full
    assert c.post("/ingest", json=DOC, headers={"Idempotency-Key": "key-1"}).status_code == 202

    job_id = r1.json()["job_id"]
    job = c.get(f"/jobs/{job_id}").json()
    assert job["status"] == "queued" and job["documents"] == ["d-1"]
    listed = c.get("/jobs", params={"status": "queued"}).json()["jobs"]
    assert job_id in [j["job_id"] for j in listed]
    assert c.get("/jobs", params={"limit": 2}).json()["jobs"].__len__() == 2

    # cancel / retry state machine
    assert c.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    assert_error(c.post(f"/jobs/{job_id}/cancel"), 409, "job_id")
    assert c.post(f"/jobs/{job_id}/retry").json()["status"] == "queued"
    assert_error(c.post(f"/jobs/{job_id}/retry"), 409, "job_id")
    for j in jobs.queued(include_running=False):
        jobs.cancel(j.job_id)


def test_jobs_4xx(app_client):
    _, c = app_client
    assert_error(c.get("/jobs/j_doesnotexist"), 404, "job_id")
    assert_error(c.get("/jobs/.hidden"), 422, "job_id")
    assert_error(c.get("/jobs", params={"limit": 0}), 422, "limit")
    assert_error(c.get("/jobs", params={"status": "sleeping"}), 422, "status")
    assert_error(c.post("/jobs/j_doesnotexist/cancel"), 404, "job_id")


# ---- OpenAI-compatible --------------------------------------------------------------------------


def test_openai_routes(app_client):
    _, c = app_client
    models = c.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "memfit"
    assert "memfit@0" in [m["id"] for m in models["data"]]
    r = c.post(
        "/v1/completions",
        json={"model": "memfit", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] in ("stop", "length")
    assert (
        body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )
    with c.stream(
        "POST", "/v1/completions", json={"model": "memfit@0", "prompt": "Hi", "max_tokens": 3, "stream": True}
    ) as s:
        raw = "".join(s.iter_text())
    assert raw.rstrip().endswith("data: [DONE]")
    err = assert_error(c.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}), 404, "model")
    assert err["code"] == "model_not_found"
    assert_error(
        c.post("/v1/completions", json={"model": "memfit", "prompt": "x", "max_tokens": 21}),
        422,
        "max_tokens",
    )
    assert_error(c.post("/v1/completions", json={"model": "memfit", "prompt": ["a", "b"]}), 422, "prompt")
    assert_error(c.post("/v1/completions", json={"model": "memfit", "prompt": "x", "n": 2}), 422, "n")


# ---- health, metrics, openapi -------------------------------------------------------------------


def test_health_metrics_openapi(app_client):
    _, c = app_client
    assert c.get("/healthz").json() == {"status": "ok"}
    ready = c.get("/readyz").json()
    assert ready["ready"] is True and ready["model_loaded"] and ready["store_readable"]
    assert ready["mode"] == "embedded" and ready["redis"] is None
    text = c.get("/metrics").text
    for name in (
        "memfit_http_requests_total",
        "memfit_http_request_duration_seconds_bucket",
        "memfit_active_version",
        'memfit_jobs{state="queued"}',
        "memfit_time_to_first_token_seconds_bucket",
    ):
        assert name in text, name
    assert 'endpoint="/jobs/{job_id}"' in text  # route templates, never raw paths
    assert "j_doesnotexist" not in text
    spec = c.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for name in ("GenerateRequest", "GenerateResponse", "IngestRequest", "JobOut", "VersionOut"):
        assert schemas[name].get("examples"), name
    for path in (
        "/generate",
        "/ingest",
        "/jobs/{job_id}",
        "/versions",
        "/v1/completions",
        "/v1/models",
        "/readyz",
    ):
        assert path in spec["paths"], path


def test_idempotency_keys_are_scoped_to_the_api_key(tiny_model_dir, tmp_path):
    """Two clients that happen to use the same Idempotency-Key get two jobs (before: the second one
    was answered with the first client's job, Idempotent-Replayed); each one's retry gets its own."""
    keys = json.dumps({"alice-key": "write", "bob-key": "write"})
    app = create_app(settings_for(tiny_model_dir, tmp_path / "store", api_keys=keys), start_runner=False)
    with TestClient(app, raise_server_exceptions=False) as c:

        def ingest(key: str):
            return c.post(
                "/ingest",
                json=DOC,
                headers={"Authorization": f"Bearer {key}", "Idempotency-Key": "nightly-1"},
            )

        a, b = ingest("alice-key"), ingest("bob-key")
        assert a.status_code == b.status_code == 202, (a.text, b.text)
        assert a.json()["job_id"] != b.json()["job_id"] and "Idempotent-Replayed" not in b.headers
        again = ingest("alice-key")
        assert again.json()["job_id"] == a.json()["job_id"] and again.headers["Idempotent-Replayed"] == "true"
        assert ingest("bob-key").json()["job_id"] == b.json()["job_id"]


def test_idempotency_keys_recorded_before_scoping_are_honoured(tiny_model_dir, tmp_path):
    """A job whose Idempotency-Key was recorded unscoped, as /ingest did before keys were scoped to
    the caller's API key (commit 7f68372: the raw key and the body's hash), is still the job a replay
    with that key gets after the upgrade (before this fix: a second job, the retry doubled it). A
    different body is still a 409; an unscoped key recorded by today's code without API keys is not
    handed to a keyed caller."""
    from service.routes.ingest import body_hash
    from service.schemas import IngestRequest

    keys = json.dumps({"alice-key": "write", "bob-key": "write"})
    app = create_app(settings_for(tiny_model_dir, tmp_path / "store", api_keys=keys), start_runner=False)
    with TestClient(app, raise_server_exceptions=False) as c:
        jobs = app.state.store.jobs
        legacy = jobs.create_job(
            None,
            [dict(d) for d in DOC["documents"]],
            idempotency_key="nightly-1",
            body_sha256=body_hash(IngestRequest.model_validate(DOC)),
        )

        def ingest(key: str, idem: str, body=DOC):
            return c.post(
                "/ingest", json=body, headers={"Authorization": f"Bearer {key}", "Idempotency-Key": idem}
            )

        # the replay across the upgrade first: only the legacy record exists, written with the
        # arguments the code before the scoping had (so this part fails on that code by behaviour,
        # a second job, not by a missing keyword)
        r = ingest("alice-key", "nightly-1")
        assert r.status_code == 202, r.text
        assert r.json()["job_id"] == legacy.job_id and r.headers["Idempotent-Replayed"] == "true"
        assert len(jobs.list(None)) == 1
        other = {"documents": [{"id": "d-9", "text": "A different body."}]}
        assert_error(ingest("alice-key", "nightly-1", other), 409, code="idempotency_conflict")
        # the scoped record from now on: alice's retries keep getting the legacy job
        assert ingest("alice-key", "nightly-1").json()["job_id"] == legacy.job_id
        # what this code records for an anonymous caller (no API keys configured then)
        jobs.create_job(
            None,
            [{"id": "d-2", "text": "Another text."}],
            idempotency_key="nightly-2",
            body_sha256=body_hash(IngestRequest.model_validate(DOC)),
            idempotency_scope="anonymous",
        )
        r2 = ingest("bob-key", "nightly-2")
        assert r2.status_code == 202 and "Idempotent-Replayed" not in r2.headers
        assert len(jobs.list(None)) == 3


def test_ingested_texts_are_not_held_in_memory(tiny_model_dir, tmp_path):
    """Issue 17: every process kept every ingested document in RAM. Through the app: 30 ingests of
    four 40 KB documents (4.8 MB of text) grow what the process holds (tracemalloc, after gc) by
    well under a tenth of the text (before: by more than all of it, ~5 MB); the texts are read back
    from the store's documents.jsonl when a job needs them."""
    import gc
    import tracemalloc

    settings = settings_for(
        tiny_model_dir,
        tmp_path / "store",
        max_documents_per_request=4,
        max_document_chars=50_000,
        max_request_bytes=400_000,
        max_queue_depth=1000,
        ingest_bytes_per_minute=0,
    )
    app = create_app(settings, start_runner=False)
    letters = "abcdefghijklmnopqrstuvwxyz"

    def body(i: int) -> dict:
        return {
            "documents": [
                {"id": f"m{i}-{k}", "text": f"doc {i}-{k} " + (letters[k:] + letters[:k]) * 1500}
                for k in range(4)
            ]
        }

    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.post("/ingest", json=body(-1)).status_code == 202  # lazily built things built
        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            text = 0
            for i in range(30):
                b = body(i)
                text += sum(len(d["text"]) for d in b["documents"])
                r = c.post("/ingest", json=b)
                assert r.status_code == 202, r.text
                del b, r
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        assert grown < text / 10, (grown, text)
        jobs = app.state.store.jobs
        assert len(jobs.list(None)) == 31
        assert jobs.document("m29-3")["text"] == body(29)["documents"][3]["text"]
