"""The operator dashboard: GET /dashboard (the page), /dashboard/static/{name} (its script and style),
GET /dashboard/data (this replica's serving figures and the store's knowledge figures as JSON).

Everything the page loads is served from here (no CDN); its charts are hand-written SVG. Viewing needs
the read role; the page's activate and revert buttons call POST /versions/{id}/activate and
/versions/{id}/revert, which need the admin role (the page sends the key typed into its key field).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse

from service.errors import ApiError
from service.observability import histogram_quantile
from service.security import Principal, require_role

STATIC = Path(__file__).resolve().parent.parent / "static"
ASSETS = {  # name -> media type; nothing else is served
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
NO_STORE = {"Cache-Control": "no-store"}

router = APIRouter(prefix="/dashboard", tags=["dashboard"])
ReadDep = Annotated[Principal, Depends(require_role("read"))]


@router.get("", summary="Operator dashboard (HTML page)", response_class=FileResponse)
async def dashboard_page(_: ReadDep) -> FileResponse:
    return FileResponse(STATIC / "dashboard.html", media_type="text/html; charset=utf-8", headers=NO_STORE)


@router.get("/static/{name}", summary="The dashboard's script and style", response_class=FileResponse)
async def dashboard_asset(name: str, _: ReadDep) -> FileResponse:
    media = ASSETS.get(name)
    if media is None:
        raise ApiError(404, "not_found", f"no dashboard asset {name!r}", "name")
    return FileResponse(STATIC / name, media_type=media, headers=NO_STORE)


def _samples(metric: Any) -> list[Any]:
    return [s for fam in metric.collect() for s in fam.samples]


def _value(metric: Any, suffix: str = "", **labels: str) -> float:
    """Sum of a metric's samples named name+suffix whose labels include `labels`."""
    total = 0.0
    for s in _samples(metric):
        if suffix and not s.name.endswith(suffix):
            continue
        if all(s.labels.get(k) == v for k, v in labels.items()):
            total += s.value
    return total


def _buckets(hist: Any) -> list[list[Any]]:
    """Cumulative [[le, count], ...] of an unlabelled histogram ("+Inf" as a string, JSON-safe)."""
    out = []
    for s in _samples(hist):
        if s.name.endswith("_bucket"):
            le = s.labels["le"]
            out.append([le if le == "+Inf" else float(le), s.value])
    return out


def serving_snapshot(metrics: Any) -> dict[str, Any]:
    m = metrics
    hists = {
        "e2e": _buckets(m.e2e),
        "ttft": _buckets(m.ttft),
        "inter_token": _buckets(m.inter_token) if hasattr(m, "inter_token") else [],
        "queue": _buckets(m.queue_time) if hasattr(m, "queue_time") else [],
    }
    server_errors = sum(
        s.value
        for s in _samples(m.requests)
        if s.name.endswith("_total") and str(s.labels.get("status", "")).startswith("5")
    )
    generation_failures = _value(m.generation_errors, "_total")

    def q(name: str) -> dict[str, float | None]:
        b = [(float("inf") if le == "+Inf" else le, c) for le, c in hists[name]]
        return {f"p{int(p * 100)}": histogram_quantile(p, b) for p in (0.5, 0.95, 0.99)}

    return {
        "started_at": _value(m.start_time),
        "generation_requests": _value(m.e2e, "_count"),
        "prompt_tokens_total": _value(m.prompt_tokens, "_total"),
        "generation_tokens_total": _value(m.generation_tokens, "_total"),
        "http_requests_total": _value(m.requests, "_total"),
        "server_errors_total": server_errors,
        "generation_failures_total": generation_failures,
        "errors_total": server_errors + generation_failures,
        "in_flight": _value(m.in_flight),
        "histograms": hists,
        "quantiles": {name: q(name) for name in ("e2e", "ttft")},
    }


@router.get("/data", summary="Serving and knowledge figures of this replica (what the dashboard plots)")
async def dashboard_data(request: Request, _: ReadDep) -> dict[str, Any]:
    state = request.app.state
    metrics = state.metrics
    engine = getattr(state, "engine", None)
    if getattr(state, "store", None) is None or engine is None:
        raise ApiError(503, "not_ready", "the server is starting", None, {"Retry-After": "1"})
    knowledge = getattr(metrics, "knowledge", None)

    def work() -> dict[str, Any]:
        out: dict[str, Any] = {
            "time": time.time(),
            "replica_version": engine.version,
            "serving": serving_snapshot(metrics),
        }
        if knowledge is not None:
            out.update(knowledge.snapshot())
        return out

    return await asyncio.to_thread(work)
