"""Each role on each endpoint of the real app (service.app.create_app), with a tiny model.

The routes are discovered from the app itself, so a new route without a role dependency fails
test_every_route_needs_a_role instead of going out unprotected.
"""

from __future__ import annotations

import json
import re

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from memfit.config import Settings
from service.security import route_role

app_module = pytest.importorskip("service.app", reason="service.app not written yet")

KEYS = {"k-read": "read", "k-write": "write", "k-admin": "admin"}
RANK = {"read": 0, "write": 1, "admin": 2}
# FastAPI's own documentation routes: open on purpose (they hold no data)
DOC_ROUTES = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
# the dashboard's log-in exchange: open on purpose (it checks the key it is given; service/sessions.py)
LOGIN_ROUTES = {"/dashboard/login", "/dashboard/logout"}
PUBLIC = {"/healthz": "public_health", "/readyz": "public_health", "/metrics": "public_metrics"}
# the roles docs/deploy.md promises (routes the app does not have are not checked)
EXPECTED = {
    ("POST", "/generate"): "read",
    ("POST", "/v1/completions"): "read",
    ("GET", "/v1/models"): "read",
    ("GET", "/jobs"): "read",
    ("GET", "/jobs/{job_id}"): "read",
    ("GET", "/versions"): "read",
    ("GET", "/versions/{version_id}"): "read",
    ("GET", "/dashboard"): "read",
    ("POST", "/ingest"): "write",
    ("POST", "/jobs/{job_id}/cancel"): "write",
    ("POST", "/jobs/{job_id}/retry"): "write",
    ("POST", "/versions/{version_id}/activate"): "admin",
    ("POST", "/versions/{version_id}/revert"): "admin",
    ("POST", "/documents/{document_id}/revert"): "admin",
    ("GET", "/dashboard/data"): "read",
}


def normalise(path: str) -> str:
    """/versions/{id} and /versions/{version_id} alike: compare templates by shape."""
    return re.sub(r"\{[^}]+\}", "{}", path)


EXPECTED_BY_SHAPE = {(m, normalise(p)): role for (m, p), role in EXPECTED.items()}


@pytest.fixture(scope="module")
def secured(tiny_model_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("secured") / "store"
    settings = Settings(
        model=tiny_model_dir,
        store=store,
        api_keys=json.dumps(KEYS),
        rate_limit_per_minute=0,
        redis_url=None,
    )
    app = app_module.create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield app, client


def _walk(routes) -> list[APIRoute]:
    """APIRoutes, also inside included routers (FastAPI >= 0.16x keeps them as lazy branches)."""
    out: list[APIRoute] = []
    for route in routes:
        if isinstance(route, APIRoute):
            out.append(route)
        elif getattr(route, "original_router", None) is not None:
            out.extend(_walk(route.original_router.routes))
    return out


def api_routes(app) -> list[tuple[str, str, APIRoute]]:
    out = []
    for route in _walk(app.routes):
        if route.path not in DOC_ROUTES | LOGIN_ROUTES:
            for method in sorted(route.methods - {"HEAD", "OPTIONS"}):
                out.append((method, route.path, route))
    # the walk found exactly the operations the app publishes (no prefix or branch missed)
    published = {
        (method.upper(), path)
        for path, ops in app.openapi()["paths"].items()
        if path not in LOGIN_ROUTES
        for method in ops
        if method.upper() not in ("HEAD", "OPTIONS")
    }
    in_schema = {(m, p) for m, p, r in out if r.include_in_schema}
    assert in_schema == published, in_schema ^ published
    return out


def fill(path: str) -> str:
    def value(m: re.Match) -> str:
        return "0" if "version" in m.group(1) or m.group(1) == "id" and "/versions/" in path else "missing-1"

    return re.sub(r"\{([^}:]+)(?::[^}]*)?\}", value, path)


def send(client: TestClient, method: str, path: str, key: str | None):
    headers = {"X-API-Key": key} if key else {}
    if method in ("POST", "PUT", "PATCH"):
        return client.request(method, path, json={}, headers=headers)
    return client.request(method, path, headers=headers)


def assert_error(r, status: int, code: str) -> None:
    assert r.status_code == status, (r.request.method, r.request.url.path, r.text)
    body = r.json()
    keys = {"code", "message", "field"}
    if r.request.url.path.startswith("/v1/"):  # OpenAI's shape (service/errors.py), field kept
        keys |= {"type", "param"}
    assert set(body) == {"error"} and set(body["error"]) == keys, body
    assert body["error"]["code"] == code


def test_every_route_needs_a_role(secured):
    app, _ = secured
    routes = api_routes(app)
    assert routes
    for method, path, route in routes:
        needed = route_role(route)
        assert needed is not None, f"{method} {path} has no require_role dependency"
        role, flag = needed
        if path in PUBLIC:
            assert flag == PUBLIC[path], f"{path} should be open while {PUBLIC[path]} is set"
            assert role == "read"
        else:
            assert flag is None, f"{method} {path} is public through {flag}"


def test_routes_have_the_documented_roles(secured):
    app, _ = secured
    seen = set()
    for method, path, route in api_routes(app):
        key = (method, normalise(path))
        if key in EXPECTED_BY_SHAPE:
            seen.add(key)
            assert route_role(route)[0] == EXPECTED_BY_SHAPE[key], f"{method} {path}"
    assert ("POST", "/ingest") in seen and ("POST", "/generate") in seen


def test_each_role_on_each_real_endpoint(secured):
    app, client = secured
    for method, path, route in api_routes(app):
        role, flag = route_role(route)
        url = fill(path)
        if flag is not None:  # public by default
            r = send(client, method, url, None)
            assert r.status_code not in (401, 403), (method, path, r.text)
            continue
        assert_error(send(client, method, url, None), 401, "unauthorized")
        assert_error(send(client, method, url, "not-a-key"), 401, "unauthorized")
        for key, key_role in KEYS.items():
            r = send(client, method, url, key)
            if RANK[key_role] >= RANK[role]:
                assert r.status_code not in (401, 403), (method, path, key_role, r.text)
                assert r.status_code < 500, (method, path, key_role, r.text)
            else:
                assert_error(r, 403, "forbidden")


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/jobs/%2e%2e"),
        ("GET", "/jobs/..%5C..%5Cetc"),
        ("GET", "/versions/%2e%2e"),
        ("GET", "/versions/-1"),
        ("POST", "/documents/%2e%2e/revert"),
        ("POST", "/documents/.hidden/revert"),
        ("POST", "/jobs/%2e%2e/cancel"),
    ],
)
def test_traversal_ids_refused_by_the_real_app(secured, method, path):
    _, client = secured
    r = send(client, method, path, "k-admin")
    assert 400 <= r.status_code < 500, (path, r.text)
    assert set(r.json()) == {"error"}


def test_real_app_413_and_429(tiny_model_dir, tmp_path):
    settings = Settings(
        model=tiny_model_dir,
        store=tmp_path / "store",
        api_keys=json.dumps(KEYS),
        rate_limit_per_minute=2,
        max_request_bytes=2_000,
        redis_url=None,
    )
    app = app_module.create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as client:
        big = {"documents": [{"text": "x" * 5_000}]}
        assert_error(
            client.post("/ingest", json=big, headers={"X-API-Key": "k-write"}), 413, "payload_too_large"
        )
        client.get("/versions", headers={"X-API-Key": "k-read"})
        client.get("/versions", headers={"X-API-Key": "k-read"})
        r = client.get("/versions", headers={"X-API-Key": "k-read"})
        assert_error(r, 429, "rate_limited")
        assert int(r.headers["Retry-After"]) >= 1


def test_openapi_declares_the_key_schemes(secured):
    app, _ = secured
    schema = app.openapi()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["HTTPBearer"]["scheme"] == "bearer"
    assert schemes["APIKeyHeader"]["name"] == "X-API-Key"
    for path, ops in schema["paths"].items():
        if path in LOGIN_ROUTES:  # they take the key in the form, or none
            continue
        for method, op in ops.items():
            assert {"HTTPBearer": []} in op.get("security", []), f"{method.upper()} {path}"
