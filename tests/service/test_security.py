"""API keys, roles, rate limits, error bodies, id validation and safe binding (service.security).

A tiny FastAPI app built here uses the same dependencies the real routes use; requests go through
real HTTP handling via httpx.ASGITransport.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from fastapi import Depends, FastAPI

from memfit.config import Settings
from service.errors import ApiError, install_error_handlers, validate_id, validate_version_id
from service.security import (
    KeyStore,
    RateLimiter,
    check_bind,
    hash_key,
    require_role,
    require_role_unless,
)

KEYS = {"k-read": "read", "k-write": "write", "k-admin": "admin"}
ROLE_OF_KIND = {"read": "read", "write": "write", "admin": "admin"}
RANK = {"read": 0, "write": 1, "admin": 2}


def make_settings(tmp_path: Path, **kw) -> Settings:
    base = dict(model=tmp_path / "model", store=tmp_path / "store", rate_limit_per_minute=0)
    base.update(kw)
    return Settings(**base)


def build_app(settings: Settings) -> FastAPI:
    app = FastAPI()
    app.state.settings = settings
    install_error_handlers(app)

    @app.get("/read", dependencies=[Depends(require_role("read"))])
    def read_route() -> dict:
        return {"ok": "read"}

    @app.post("/write")
    def write_route(body: dict, who=Depends(require_role("write"))) -> dict:
        return {"ok": "write", "who": who.name, "role": who.role}

    @app.post("/admin", dependencies=[Depends(require_role("admin"))])
    def admin_route() -> dict:
        return {"ok": "admin"}

    @app.get("/metrics", dependencies=[Depends(require_role_unless("public_metrics", "read"))])
    def metrics() -> dict:
        return {"ok": "metrics"}

    @app.get("/healthz", dependencies=[Depends(require_role_unless("public_health", "read"))])
    def healthz() -> dict:
        return {"ok": "healthz"}

    @app.get("/documents/{document_id}")
    def document(document_id: str) -> dict:
        return {"id": validate_id(document_id, "document_id")}

    @app.get("/versions/{version_id}")
    def version(version_id: str) -> dict:
        return {"id": validate_version_id(version_id, "version_id")}

    @app.post("/sized")
    def sized(body: dict) -> dict:
        return {"n": len(body)}

    return app


def request(app: FastAPI, method: str, path: str, **kw) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return await client.request(method, path, **kw)

    return asyncio.run(go())


def call(app: FastAPI, kind: str, headers: dict | None = None) -> httpx.Response:
    if kind == "read":
        return request(app, "GET", "/read", headers=headers)
    if kind == "write":
        return request(app, "POST", "/write", json={"x": 1}, headers=headers)
    return request(app, "POST", "/admin", headers=headers)


def assert_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "field"}, body
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return body["error"]


@pytest.fixture
def keyed_app(tmp_path) -> FastAPI:
    return build_app(make_settings(tmp_path, api_keys=json.dumps(KEYS)))


# --- roles -----------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["read", "write", "admin"])
@pytest.mark.parametrize("kind", ["read", "write", "admin"])
@pytest.mark.parametrize("header", ["bearer", "x-api-key"])
def test_each_role_on_each_kind_of_endpoint(keyed_app, role, kind, header):
    key = f"k-{role}"
    headers = {"Authorization": f"Bearer {key}"} if header == "bearer" else {"X-API-Key": key}
    r = call(keyed_app, kind, headers)
    if RANK[role] >= RANK[kind]:
        assert r.status_code == 200, r.text
        assert r.json()["ok"] == kind
    else:
        err = assert_error(r, 403, "forbidden")
        assert role in err["message"] and kind in err["message"]


@pytest.mark.parametrize("kind", ["read", "write", "admin"])
def test_missing_and_unknown_keys_are_401(keyed_app, kind):
    for headers in [
        None,
        {"X-API-Key": "nope"},
        {"Authorization": "Bearer nope"},
        {"Authorization": "Basic abc"},
    ]:
        r = call(keyed_app, kind, headers)
        err = assert_error(r, 401, "unauthorized")
        assert err["field"] == "Authorization"
        assert r.headers["WWW-Authenticate"] == "Bearer"


def test_principal_names_the_key_not_the_key_itself(keyed_app):
    r = call(keyed_app, "write", {"X-API-Key": "k-admin"})
    assert r.status_code == 200
    who = r.json()["who"]
    assert who == "key:" + hash_key("k-admin")[:12]
    assert "k-admin" not in who
    assert r.json()["role"] == "admin"


def test_no_keys_configured_allows_everything(tmp_path):
    app = build_app(make_settings(tmp_path))
    for kind in ["read", "write", "admin"]:
        r = call(app, kind)
        assert r.status_code == 200, r.text
        # a key sent anyway is ignored, not rejected
        assert call(app, kind, {"X-API-Key": "whatever"}).status_code == 200


def test_auth_runs_before_body_validation(keyed_app):
    # a well-formed JSON body of the wrong shape: the key is checked first (only a body that is not
    # JSON at all is refused earlier, by FastAPI's body parsing)
    r = request(keyed_app, "POST", "/write", json=[1, 2])
    assert_error(r, 401, "unauthorized")


# --- public endpoints ------------------------------------------------------------------------


def test_public_metrics_and_health_by_default(keyed_app):
    assert request(keyed_app, "GET", "/metrics").status_code == 200
    assert request(keyed_app, "GET", "/healthz").status_code == 200


def test_private_metrics_and_health_need_a_read_key(tmp_path):
    s = make_settings(tmp_path, api_keys=json.dumps(KEYS), public_metrics=False, public_health=False)
    app = build_app(s)
    for path in ["/metrics", "/healthz"]:
        assert_error(request(app, "GET", path), 401, "unauthorized")
        assert request(app, "GET", path, headers={"X-API-Key": "k-read"}).status_code == 200


def test_require_role_rejects_unknown_names():
    with pytest.raises(ValueError, match="role"):
        require_role("root")
    with pytest.raises(ValueError, match="Settings field"):
        require_role_unless("public_everything", "read")


# --- rate limits -----------------------------------------------------------------------------


def test_rate_limit_429_with_retry_after(tmp_path):
    app = build_app(make_settings(tmp_path, api_keys=json.dumps(KEYS), rate_limit_per_minute=3))
    h = {"X-API-Key": "k-read"}
    for _ in range(3):
        assert call(app, "read", h).status_code == 200
    r = call(app, "read", h)
    err = assert_error(r, 429, "rate_limited")
    assert err["field"] == "rate_limit_per_minute"
    retry = int(r.headers["Retry-After"])
    assert 1 <= retry <= 20  # one token refills in 60/3 = 20 s
    # buckets are per key: another key is unaffected
    assert call(app, "read", {"X-API-Key": "k-write"}).status_code == 200


def test_rejected_requests_do_not_spend_tokens(tmp_path):
    app = build_app(make_settings(tmp_path, api_keys=json.dumps(KEYS), rate_limit_per_minute=1))
    for _ in range(3):
        assert call(app, "admin", {"X-API-Key": "k-read"}).status_code == 403
    assert call(app, "read", {"X-API-Key": "k-read"}).status_code == 200


def test_token_bucket_refills():
    now = [0.0]
    limiter = RateLimiter(60, clock=lambda: now[0])  # one per second, burst 60
    assert all(limiter.acquire("a") == 0.0 for _ in range(60))
    wait = limiter.acquire("a")
    assert wait == pytest.approx(1.0)
    now[0] += 0.5
    assert limiter.acquire("a") == pytest.approx(0.5)
    now[0] += 0.5
    assert limiter.acquire("a") == 0.0
    assert RateLimiter(0).acquire("a") == 0.0  # disabled


# --- keys file -------------------------------------------------------------------------------


def test_keys_file_by_sha256(tmp_path):
    f = tmp_path / "keys"
    f.write_text(
        "# memfit API keys: sha256 of the key, then the role\n"
        f"{hash_key('file-writer')} write   # the ingest bot\n"
        "\n"
        f"{hash_key('file-reader').upper()} read\n"
    )
    app = build_app(make_settings(tmp_path, api_keys_file=f))
    assert call(app, "write", {"Authorization": "Bearer file-writer"}).status_code == 200
    assert call(app, "admin", {"Authorization": "Bearer file-writer"}).status_code == 403
    assert call(app, "read", {"X-API-Key": "file-reader"}).status_code == 200
    assert call(app, "write", {"X-API-Key": "file-reader"}).status_code == 403
    # the digest itself is not a key
    assert call(app, "read", {"X-API-Key": hash_key("file-reader")}).status_code == 401


def test_keys_file_and_env_combine(tmp_path):
    f = tmp_path / "keys"
    f.write_text(f"{hash_key('from-file')} admin\n")
    app = build_app(make_settings(tmp_path, api_keys_file=f, api_keys=json.dumps({"from-env": "read"})))
    assert call(app, "admin", {"X-API-Key": "from-file"}).status_code == 200
    assert call(app, "read", {"X-API-Key": "from-env"}).status_code == 200


def test_keys_file_reload_on_change(tmp_path, monkeypatch):
    import os

    import service.security as sec

    monkeypatch.setattr(sec, "_RELOAD_CHECK_S", 0.0)
    f = tmp_path / "keys"
    f.write_text(f"{hash_key('old')} read\n")
    app = build_app(make_settings(tmp_path, api_keys_file=f))
    assert call(app, "read", {"X-API-Key": "old"}).status_code == 200
    f.write_text(f"{hash_key('new')} read\n")
    st = f.stat()
    os.utime(f, (st.st_atime, st.st_mtime + 5))
    assert call(app, "read", {"X-API-Key": "new"}).status_code == 200
    assert call(app, "read", {"X-API-Key": "old"}).status_code == 401


@pytest.mark.parametrize(
    "content, match",
    [
        ("abc read\n", "sha256"),
        (f"{hash_key('x')} root\n", "role"),
        (f"{hash_key('x')}\n", "fields"),
        (f"{hash_key('x')} read extra\n", "fields"),
    ],
)
def test_bad_keys_file_names_the_line(tmp_path, content, match):
    f = tmp_path / "keys"
    f.write_text("# header\n" + content)
    with pytest.raises(ValueError, match=match) as e:
        KeyStore.from_settings(make_settings(tmp_path, api_keys_file=f))
    assert f"{f}:2" in str(e.value)


@pytest.mark.parametrize("raw", ["not json", '["a"]', '{"k": "superuser"}', '{"": "read"}'])
def test_bad_env_keys(tmp_path, raw):
    with pytest.raises(ValueError, match="MEMFIT_API_KEYS"):
        KeyStore.from_settings(make_settings(tmp_path, api_keys=raw))


def test_missing_keys_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        KeyStore.from_settings(make_settings(tmp_path, api_keys_file=tmp_path / "absent"))


def test_misconfigured_keys_fail_closed_over_http(tmp_path):
    app = build_app(make_settings(tmp_path, api_keys="{broken"))
    r = call(app, "read", {"X-API-Key": "k-read"})
    assert_error(r, 500, "misconfigured")


def test_env_from_environment(monkeypatch, tmp_path):
    f = tmp_path / "keys"
    f.write_text(f"{hash_key('envfile')} write\n")
    monkeypatch.setenv("MEMFIT_API_KEYS_FILE", str(f))
    monkeypatch.setenv("MEMFIT_API_KEYS", json.dumps({"envjson": "admin"}))
    store = KeyStore.from_settings(Settings(model=tmp_path, store=tmp_path))
    assert store.lookup("envfile") == "write"
    assert store.lookup("envjson") == "admin"
    assert store.lookup("other") is None


# --- ids and errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/documents/%2e%2e", "/documents/..", "/documents/a%2Fb", "/documents/.hidden"]
)
def test_traversal_document_ids_refused(keyed_app, path):
    r = request(keyed_app, "GET", path)
    assert 400 <= r.status_code < 500
    assert set(r.json()) == {"error"}


@pytest.mark.parametrize("path", ["/versions/-1", "/versions/1.5", "/versions/%2e%2e", "/versions/x"])
def test_bad_version_ids_refused(keyed_app, path):
    err = assert_error(request(keyed_app, "GET", path), 422, "invalid_version")
    assert err["field"] == "version_id"


def test_good_ids_pass(keyed_app):
    assert request(keyed_app, "GET", "/documents/doc-42.v1:part_2").json() == {"id": "doc-42.v1:part_2"}
    assert request(keyed_app, "GET", "/versions/7").json() == {"id": 7}


@pytest.mark.parametrize(
    "bad", ["", ".", "..", "../etc", "a/b", "a\\b", "a b", "-x", "x" * 129, 5, None, "é"]
)
def test_validate_id_rejects(bad):
    with pytest.raises(ApiError) as e:
        validate_id(bad, "document_id")
    assert e.value.status == 422 and e.value.field == "document_id"


@pytest.mark.parametrize("bad", [-1, True, "1e3", "", " 1", 1.0, None, "٣"])
def test_validate_version_id_rejects(bad):
    with pytest.raises(ApiError):
        validate_version_id(bad)


def test_validation_error_names_the_field(keyed_app):
    r = request(keyed_app, "POST", "/write", content=b"[1, 2]", headers={"X-API-Key": "k-write"})
    err = assert_error(r, 422, "invalid_request")
    assert err["field"] == "body"
    r = request(
        keyed_app,
        "POST",
        "/write",
        content=b"{oops",
        headers={"X-API-Key": "k-write", "content-type": "application/json"},
    )
    err = assert_error(r, 422, "invalid_request")
    assert "JSON" in err["message"]


def test_404_and_405_in_contract_format(keyed_app):
    assert_error(request(keyed_app, "GET", "/nowhere"), 404, "not_found")
    assert_error(request(keyed_app, "DELETE", "/read"), 405, "method_not_allowed")


def test_oversized_body_413(tmp_path):
    app = build_app(make_settings(tmp_path, max_request_bytes=100))
    body = json.dumps({"text": "x" * 200}).encode()
    # declared by Content-Length
    err = assert_error(request(app, "POST", "/sized", content=body), 413, "payload_too_large")
    assert err["field"] == "max_request_bytes" and "100" in err["message"]

    # streamed without Content-Length (chunked)
    async def chunks():
        for i in range(0, len(body), 50):
            yield body[i : i + 50]

    r = request(app, "POST", "/sized", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, "payload_too_large")
    assert request(app, "POST", "/sized", json={"a": 1}).status_code == 200


# --- binding ---------------------------------------------------------------------------------


def test_check_bind_without_keys(tmp_path):
    s = make_settings(tmp_path)
    host, warning = check_bind(s, None, insecure=False)
    assert host == "127.0.0.1" and "no API keys" in warning and "127.0.0.1" in warning
    for loop in ["localhost", "::1", "127.0.0.2"]:
        assert check_bind(s, loop, insecure=False)[0] == loop
    with pytest.raises(SystemExit, match="--insecure"):
        check_bind(s, "0.0.0.0", insecure=False)
    with pytest.raises(SystemExit, match="refusing"):
        check_bind(make_settings(tmp_path, host="0.0.0.0"), None, insecure=False)
    host, warning = check_bind(s, "0.0.0.0", insecure=True)
    assert host == "0.0.0.0" and "WARNING" in warning


def test_check_bind_with_keys(tmp_path):
    s = make_settings(tmp_path, api_keys=json.dumps(KEYS), host="0.0.0.0")
    assert check_bind(s, None, insecure=False) == ("0.0.0.0", None)
    assert check_bind(s, "10.1.2.3", insecure=False) == ("10.1.2.3", None)


def test_check_bind_bad_keys_file_exits(tmp_path):
    f = tmp_path / "keys"
    f.write_text("garbage\n")
    with pytest.raises(SystemExit, match="API key configuration"):
        check_bind(make_settings(tmp_path, api_keys_file=f), "0.0.0.0", insecure=False)
