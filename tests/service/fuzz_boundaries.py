"""Boundary-value fuzzing of every numeric request field (issue 17), next to the schemathesis run of
tests/faults/fuzzing.py (same in-process app, admin key and seeded store) and shared with
benchmarks/fuzz_api.py.

Schemathesis draws values the OpenAPI document allows or just breaks; the values that took serving
down were at the edges of machine integers (seed 2**64 passed `ge=0` and killed a decoding thread),
and JSON as Python reads it also carries NaN and Infinity, which no schema generator sends. This pass
walks the app's own /openapi.json, finds every integer and number field of every operation (JSON
body fields, nested objects included, query and path parameters), and sends each boundary value in
BOUNDARY_VALUES (2**63 - 1, 2**63, 2**64, -1, -(2**63) - 1, 1e300, NaN, Infinity, a 5,000-digit
literal, ...) into an otherwise valid request (the schema's example), streaming and not where the
operation streams. Checked for each answer:

- no 5xx, except a 503 the operation declares that carries Retry-After (as tests/faults/fuzzing.py);
- a 4xx has the error body, and a 422 names the field it is about;
- a 200 event stream carries no in-band internal_error;
- and, from the document alone, every numeric field has a minimum and a maximum (`unbounded`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from tests.faults.fuzzing import ADMIN_KEY, FuzzReport, _seed_store, fuzz_settings

HUGE = "1" + "0" * 5000  # past Python's 4,300-digit int parsing limit: json.loads refuses it
BOUNDARY_VALUES: list[Any] = [
    0,
    1,
    -1,
    2**31 - 1,
    2**31,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64 - 1,
    2**64,
    -(2**63),
    -(2**63) - 1,
    10**30,
    0.5,
    1.5,
    -0.0,
    1e-310,
    1e300,
    -1e300,
    math.nan,
    math.inf,
    -math.inf,
    HUGE,
]
SMALL_SET: list[Any] = [2**63 - 1, 2**63, 2**64, -1, 1e300, math.nan, math.inf, HUGE]
_HUGE_MARK = "__memfit_huge_literal__"


def _resolve(spec: dict, schema: dict) -> dict:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = spec["components"]["schemas"][name]
    return schema


def _variants(spec: dict, schema: dict) -> list[dict]:
    """The non-null alternatives of a schema (Optional fields are anyOf [X, null])."""
    schema = _resolve(spec, schema)
    alts = schema.get("anyOf") or schema.get("oneOf")
    if not alts:
        return [schema]
    out = []
    for a in alts:
        out.extend(v for v in _variants(spec, a) if v.get("type") != "null")
    return out


def numeric_fields(
    spec: dict, schema: dict, prefix: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], dict]]:
    """(path, schema) of each integer / number property, recursing into nested objects."""
    found = []
    for v in _variants(spec, schema):
        if v.get("type") in ("integer", "number"):
            found.append((prefix, v))
        for name, sub in (v.get("properties") or {}).items():
            found.extend(numeric_fields(spec, sub, (*prefix, name)))
    return found


def _example(spec: dict, schema: dict) -> dict:
    for v in _variants(spec, schema):
        examples = v.get("examples") or []
        if examples and isinstance(examples[0], dict):
            return json.loads(json.dumps(examples[0]))
    return {}


def _set(body: dict, path: tuple[str, ...], value: Any) -> dict:
    body = json.loads(json.dumps(body))
    node = body
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = _HUGE_MARK if value is HUGE else value
    return body


def _dumps(body: dict) -> str:
    # allow_nan (the default): NaN / Infinity / -Infinity literals, which the server's json.loads reads
    return json.dumps(body).replace(f'"{_HUGE_MARK}"', HUGE)


def _as_param(value: Any) -> str:
    return HUGE if value is HUGE else (repr(value) if isinstance(value, float) else str(value))


def bounds_missing(schema: dict) -> list[str]:
    lo = "minimum" in schema or "exclusiveMinimum" in schema
    hi = "maximum" in schema or "exclusiveMaximum" in schema
    return [name for name, ok in (("minimum", lo), ("maximum", hi)) if not ok]


class _Checker:
    def __init__(self, client, report: FuzzReport, headers: dict) -> None:
        self.client, self.report, self.headers = client, report, headers

    def _fail(self, check: str, label: str, status: int | None, message: str, request: str) -> None:
        self.report.failures.append(
            {
                "check": check,
                "operation": label,
                "status": status,
                "message": message,
                "request": request[:800],
            }
        )

    def send(self, op: dict, label: str, method: str, url: str, field: str, content: str | None, params=None):
        report = self.report
        request = f"{method} {url} params={params} {(content or '')[:300]}"
        report.cases += 1
        report.by_operation[label] += 1
        headers = dict(self.headers)
        if content is not None:
            headers["content-type"] = "application/json"
        try:
            r = self.client.request(method, url, content=content, params=params, headers=headers)
        except Exception as e:  # raised through the transport: a server error
            report.server_errors += 1
            self._fail("server_error", label, None, f"{type(e).__name__}: {e}", request)
            return
        status = r.status_code
        report.by_status[status] += 1
        if status >= 500:
            declared = "503" in (op.get("responses") or {})
            if status == 503 and declared and r.headers.get("retry-after"):
                report.retry_later += 1
            else:
                report.server_errors += 1
                self._fail("server_error", label, status, r.text[:500], request)
            return
        if status >= 400:
            try:
                err = r.json()["error"]
            except Exception:
                self._fail("error_body", label, status, r.text[:300], request)
                return
            # a 422 names the field; a body the JSON parser refused names "body" (or nothing, 400)
            if status == 422 and err.get("field") not in (field, "body"):
                self._fail(
                    "field_named", label, status, f"field {err.get('field')!r}, wanted {field!r}", request
                )
            return
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            for line in r.text.splitlines():
                if line.startswith("data:") and '"error"' in line and "internal_error" in line:
                    report.server_errors += 1
                    self._fail("server_error", label, status, line[:300], request)
                    return


def plan(spec: dict, values: list[Any]) -> tuple[list[dict], list[str]]:
    """From the OpenAPI document: the requests to send (each numeric field x each value, streaming
    and not where the operation streams) and the numeric fields without a minimum or a maximum."""
    cases: list[dict] = []
    unbounded: list[str] = []
    for path, ops in sorted(spec["paths"].items()):
        for method, op in sorted(ops.items()):
            label = f"{method.upper()} {path}"
            params = op.get("parameters") or []
            body_schema = (op.get("requestBody") or {}).get("content", {}).get("application/json", {})
            body_schema = body_schema.get("schema")
            base = _example(spec, body_schema) if body_schema else None
            path_defaults = {p["name"]: "0" for p in params if p["in"] == "path"}
            url = path.format(**path_defaults)

            def case(field, url=url, content=None, query=None, op=op, label=label, method=method.upper()):
                cases.append(
                    dict(
                        op=op, label=label, method=method, url=url, field=field, content=content, params=query
                    )
                )

            for p in params:  # integer query and path parameters
                numeric = [
                    s
                    for s in _variants(spec, p.get("schema") or {})
                    if s.get("type") in ("integer", "number")
                ]
                if not numeric:
                    continue
                if missing := bounds_missing(numeric[0]):
                    unbounded.append(f"{label} {p['name']}: no {', '.join(missing)}")
                for v in values:
                    if p["in"] == "path":
                        u = path.format(**{**path_defaults, p["name"]: _as_param(v)})
                        case(p["name"], u, _dumps(base) if base else None)
                    elif p["in"] == "query":
                        case(p["name"], query={p["name"]: _as_param(v)})
            if body_schema is None:
                continue
            props = _variants(spec, body_schema)[0].get("properties", {})
            streams = [False, True] if "stream" in props else [None]
            for fpath, schema in numeric_fields(spec, body_schema):
                name = ".".join(fpath)
                if missing := bounds_missing(schema):
                    unbounded.append(f"{label} {name}: no {', '.join(missing)}")
                for v in values:
                    for stream in streams:
                        body = _set(base or {}, fpath, v)
                        if stream is not None:
                            body["stream"] = stream
                        case(name, content=_dumps(body))
    return cases, unbounded


def run_boundary_fuzz(
    model: Path, workdir: Path, values: list[Any] | None = None
) -> tuple[FuzzReport, list[str]]:
    """Every numeric field of every operation x every value, in-process. -> (report, unbounded)."""
    from fastapi.testclient import TestClient

    from model_store import Store
    from service.app import create_app

    values = BOUNDARY_VALUES if values is None else values
    store_dir = workdir / "store"
    Store.init(store_dir, model)
    _seed_store(Store(store_dir))
    app = create_app(fuzz_settings(model, store_dir), start_runner=False)
    report = FuzzReport()
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    t0 = time.perf_counter()
    with TestClient(app, raise_server_exceptions=False, base_url="http://testserver") as client:
        spec = client.get("/openapi.json", headers=auth).json()
        cases, unbounded = plan(spec, values)
        check = _Checker(client, report, auth)
        for c in cases:
            check.send(c["op"], c["label"], c["method"], c["url"], c["field"], c["content"], c["params"])
    report.seconds = time.perf_counter() - t0
    return report, unbounded
