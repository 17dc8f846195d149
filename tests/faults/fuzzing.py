"""Schema-driven fuzzing of the HTTP API (schemathesis), shared by tests/faults/test_fuzz.py and
benchmarks/fuzz_api.py.

The app runs in-process (`create_app(settings, start_runner=False)` inside a Starlette TestClient, so
its lifespan loads the tiny model and opens a store) with an admin API key configured: the real
handlers answer, not 401s. For every operation of the app's own /openapi.json, schemathesis
generates `per_op` cases valid by the schema (positive) and `per_op` that break it (negative); each
is sent with `Authorization: Bearer <admin key>` (a tenth keep the generated, mostly bogus, header:
the auth path is fuzzed too) and checked:

- no 5xx: never a 500; the one 5xx allowed is a 503 the operation declares (min_version not served in
  time, still starting) that carries Retry-After, as docs/contracts.md "HTTP" says (schemathesis'
  `not_a_server_error` would flag it too, so this check is ours);
- `response_schema_conformance`, `status_code_conformance`, `content_type_conformance`: the answer
  (body, status, content type) is one the OpenAPI document declares for that operation.

Nothing trains: the update runner is off, so /ingest records jobs in the store's log (capped by a
small `max_queue_depth`, so most ingests end in 429 queue_full once it fills, which is a declared
answer too). A few synthetic versions are published first so version ids, activations and reverts
reach their handlers' real paths, and one known job id and document id exist.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ADMIN_KEY = "fuzz-admin-key"

# checks whose failure is a bug: 5xx, or an answer the OpenAPI document does not declare
ASSERTED_CHECKS = (
    "server_error",
    "response_schema_conformance",
    "status_code_conformance",
    "content_type_conformance",
)


@dataclass
class FuzzReport:
    cases: int = 0
    by_operation: Counter = field(default_factory=Counter)
    by_status: Counter = field(default_factory=Counter)
    server_errors: int = 0
    retry_later: int = 0  # declared 503s with Retry-After (contract answers, not failures)
    failures: list[dict[str, Any]] = field(default_factory=list)
    unsatisfiable: list[str] = field(default_factory=list)  # "mode METHOD path" with no case to generate
    seconds: float = 0.0

    def failure_kinds(self) -> Counter:
        return Counter(f["check"] for f in self.failures)

    def summary(self) -> str:
        lines = [
            f"{self.cases} cases in {self.seconds:.1f} s over {len(self.by_operation)} operations; "
            f"server errors: {self.server_errors}; declared 503 + Retry-After: {self.retry_later}; "
            f"check failures: {len(self.failures)} {dict(self.failure_kinds())}; "
            f"no case could be generated for: {self.unsatisfiable or 'none'}",
            "status codes: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.by_status.items())),
        ]
        for f in self.failures[:10]:
            lines.append(f"  FAIL {f['check']} {f['operation']} -> {f['status']}: {f['message'][:300]}")
            lines.append(f"       request: {f['request'][:300]}")
        return "\n".join(lines)


def fuzz_settings(model: Path, store: Path, **overrides: Any):
    from memfit.config import Settings

    base: dict[str, Any] = dict(
        model=model,
        store=store,
        redis_url=None,
        api_keys=json.dumps({ADMIN_KEY: "admin"}),
        api_keys_file=None,
        rate_limit_per_minute=0,
        max_queue_depth=8,
        min_version_wait_s=0.2,
        max_new_tokens_limit=24,  # keeps each generated /generate case short on CPU
        follow_interval_s=0.25,
    )
    base.update(overrides)
    return Settings(**base)


def _seed_store(store) -> dict[str, Any]:
    """Two synthetic versions on top of the base (no training), one job and one document."""
    import torch

    from memlm.delta import LayerDelta, SlotDelta

    tables = store.materialize()
    ids: list[int] = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        layers = {}
        for layer, table in tables.items():
            idx = torch.randperm(table.shape[0], generator=g)[:4].sort().values
            old = table[idx].clone()
            new = old + 0.01 * torch.randn(old.shape, generator=g, dtype=old.dtype)
            layers[layer] = LayerDelta(indices=idx, new_rows=new, old_rows=old)
            table[idx] = new
        ids.append(store.publish(SlotDelta(layers=layers), store.active(), documents=[f"seed-{seed}"]))
    job = store.jobs.create_job(
        None, [{"id": "seed-doc", "text": "Goju Theipouquis was born in Peivistead."}]
    )
    return {"versions": ids, "job_id": job.job_id}


def run_fuzz(
    model: Path, workdir: Path, per_op: int, seed: int = 0, modes=("positive", "negative")
) -> FuzzReport:
    import schemathesis
    from fastapi.testclient import TestClient
    from hypothesis import HealthCheck, Phase, given
    from hypothesis import settings as hsettings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    from model_store import Store
    from service.app import create_app

    checks = [response_schema_conformance, status_code_conformance, content_type_conformance]
    store_dir = workdir / "store"
    Store.init(store_dir, model)
    seeded = _seed_store(Store(store_dir))
    app = create_app(fuzz_settings(model, store_dir), start_runner=False)
    report = FuzzReport()
    rng = random.Random(seed)
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    t0 = time.perf_counter()
    # a 303 is the operation's own answer (the log-in routes redirect): checked as such, not followed
    with TestClient(
        app, raise_server_exceptions=False, follow_redirects=False, base_url="http://testserver"
    ) as client:
        spec = client.get("/openapi.json", headers=auth).json()
        schema = schemathesis.openapi.from_dict(spec)
        fuzz = _Fuzzer(client, report, rng, seeded, auth, checks)
        for op in [r.ok() for r in schema.get_all_operations()]:
            for mode in modes:
                strategy = op.as_strategy(generation_mode=GenerationMode(mode))
                run = given(case=strategy)(fuzz.send)
                try:
                    hsettings(
                        max_examples=per_op,
                        database=None,
                        deadline=None,
                        derandomize=True,
                        suppress_health_check=list(HealthCheck),
                        phases=(Phase.generate,),
                    )(run)()
                except Unsatisfiable:
                    # nothing in this operation's schema can be broken (e.g. a form of free strings):
                    # recorded, and the test requires it to stay a negative-mode-only gap
                    report.unsatisfiable.append(f"{mode} {op.method.upper()} {op.path}")
    report.seconds = time.perf_counter() - t0
    return report


class _Fuzzer:
    """Sends one generated case through the app and records what the checks say."""

    def __init__(
        self, client, report: FuzzReport, rng: random.Random, seeded: dict, auth: dict, checks
    ) -> None:
        self.client, self.report, self.rng = client, report, rng
        self.seeded, self.auth, self.checks = seeded, auth, checks

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

    def send(self, case) -> None:
        op, report, rng = case.operation, self.report, self.rng
        label = f"{op.method.upper()} {op.path}"
        # now and then a path id that exists, so handlers run past their 404
        if case.path_parameters and rng.random() < 0.3:
            for name in case.path_parameters:
                if "version" in name:
                    case.path_parameters[name] = rng.choice([0, *self.seeded["versions"]])
                elif "job" in name:
                    case.path_parameters[name] = self.seeded["job_id"]
                elif "document" in name:
                    case.path_parameters[name] = "seed-doc"
        kwargs = case.as_transport_kwargs(base_url="http://testserver")
        headers = dict(kwargs.pop("headers", {}) or {})
        if rng.random() < 0.9:  # else the generated (mostly bogus) Authorization header: 401s
            headers.update(self.auth)
        method, url = kwargs.pop("method"), kwargs.pop("url")
        body = {k: kwargs[k] for k in ("json", "data", "files", "content") if k in kwargs}
        request = f"{method} {url} params={kwargs.get('params')} {body}"
        report.cases += 1
        report.by_operation[label] += 1
        try:
            response = self.client.request(method, url, headers=headers, params=kwargs.get("params"), **body)
        except Exception as e:  # the app raised through the transport: a server error
            report.server_errors += 1
            self._fail("server_error", label, None, f"{type(e).__name__}: {e}", request)
            return
        report.by_status[response.status_code] += 1
        if response.status_code >= 500:
            declared = "503" in (op.definition.raw.get("responses") or {})
            if response.status_code == 503 and declared and response.headers.get("retry-after"):
                report.retry_later += 1
            else:
                report.server_errors += 1
                self._fail("server_error", label, response.status_code, response.text[:500], request)
        try:
            case.validate_response(response, checks=self.checks)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # schemathesis' FailureGroup or a single Failure
            for exc in getattr(e, "exceptions", [e]):
                title = getattr(exc, "title", None) or type(exc).__name__
                self._fail(_check_name(exc, title), label, response.status_code, str(exc), request)


def _check_name(exc: BaseException, title: str) -> str:
    t = title.lower()
    if "server error" in t:
        return "not_a_server_error"
    if "schema" in t and "response" in t:
        return "response_schema_conformance"
    if "status code" in t:
        return "status_code_conformance"
    if "content-type" in t or "content type" in t or "media type" in t:
        return "content_type_conformance"
    return title
