"""The operator dashboard: GET /dashboard (the page), /dashboard/static/{name} (its script and style),
GET /dashboard/data (this replica's serving figures and the store's knowledge figures as JSON).

Everything the page loads is served from here (no CDN); its charts are hand-written SVG. Viewing needs
the read role; the page's activate and revert buttons call POST /versions/{id}/activate and
/versions/{id}/revert, which need the admin role (the page sends the key typed into its key field).

Log-in (when API keys are configured): GET /dashboard/login is a form; POST /dashboard/login
exchanges a key of any role for a read-only session cookie (service/sessions.py: HttpOnly,
SameSite=Strict, Secure over HTTPS) and redirects to the dashboard; POST /dashboard/logout ends it.
A browser that opens /dashboard without a key or session is redirected to the log-in page (other
clients get the usual 401).
"""

from __future__ import annotations

import asyncio
import html
import logging
import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlsplit

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from service.errors import ApiError
from service.observability import histogram_quantile
from service.security import (  # the key schemes: documented in OpenAPI like require_role's
    Principal,
    _ApiKeyDoc,
    _BearerDoc,
    authenticate,
    get_keystore,
    get_sessions,
    hash_key,
    require_role,
)
from service.sessions import COOKIE_NAME

STATIC = Path(__file__).resolve().parent.parent / "static"
ASSETS = {  # name -> media type; nothing else is served
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
NO_STORE = {"Cache-Control": "no-store"}

router = APIRouter(prefix="/dashboard", tags=["dashboard"])
ReadDep = Annotated[Principal, Depends(require_role("read"))]
log = logging.getLogger("memfit.dashboard")
MAX_LOGIN_BODY = 4096


def _page_read(request: Request, _bearer: _BearerDoc = None, _api_key: _ApiKeyDoc = None) -> Principal:
    """The read role, or a redirect to the log-in page for a browser (Accept: text/html)."""
    try:
        return authenticate(request, "read")
    except ApiError as e:
        if e.status == 401 and "text/html" in request.headers.get("accept", ""):
            raise ApiError(
                303, "login_required", "log in at /dashboard/login", None, {"Location": "/dashboard/login"}
            ) from None
        raise


_page_read.memfit_role = "read"  # type: ignore[attr-defined]  # service.security.route_role
_page_read.memfit_public_flag = None  # type: ignore[attr-defined]
PageReadDep = Annotated[Principal, Depends(_page_read)]


@router.get("", summary="Operator dashboard (HTML page)", response_class=FileResponse)
async def dashboard_page(_: PageReadDep) -> FileResponse:
    return FileResponse(STATIC / "dashboard.html", media_type="text/html; charset=utf-8", headers=NO_STORE)


def _ttl_words(seconds: int) -> str:
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"


def _login_page(request: Request, error: str = "", status: int = 200) -> HTMLResponse:
    ttl = request.app.state.settings.session_ttl_s
    text = (STATIC / "login.html").read_text(encoding="utf-8")
    text = text.replace("{error}", html.escape(error)).replace("{ttl}", _ttl_words(int(ttl)))
    return HTMLResponse(text, status_code=status, headers=NO_STORE)


def _same_origin(request: Request) -> bool:
    """A form post from another site is refused (the cookie is SameSite=Strict too)."""
    origin = request.headers.get("origin")
    if not origin or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.headers.get("host", "")


def _secure(request: Request) -> bool:
    proto = request.headers.get("x-forwarded-proto", request.url.scheme)
    return proto.split(",")[0].strip().lower() == "https"


@router.get(
    "/login",
    summary="Dashboard log-in page (exchanges an API key for a read-only session cookie)",
    response_class=HTMLResponse,
    responses={303: {"description": "No API keys configured: to the dashboard itself"}},
)
async def login_page(request: Request) -> Response:
    if not get_keystore(request).enabled:  # no keys: nothing to log in to
        return RedirectResponse("/dashboard", status_code=303)
    return _login_page(request)


@router.post(
    "/login",
    summary="Exchange an API key (form field `key`) for a read-only dashboard session cookie",
    response_class=Response,
    status_code=303,
    responses={
        303: {"description": "Logged in (the session cookie is set): to the dashboard"},
        **{
            code: {"description": why, "content": {"text/html": {}}}
            for code, why in (
                (401, "Unknown key"),
                (403, "Log-in from another site"),
                (413, "Form too large"),
                (429, "Too many attempts"),
            )
        },
    },
)
async def login(request: Request) -> Response:
    store = get_keystore(request)
    if not store.enabled:
        return RedirectResponse("/dashboard", status_code=303)
    if not _same_origin(request):
        return _login_page(request, "log-in from another site refused", 403)
    body = await request.body()
    if len(body) > MAX_LOGIN_BODY:
        return _login_page(request, "request too large", 413)
    key = (parse_qs(body.decode("utf-8", "replace")).get("key") or [""])[0].strip()
    client = request.client.host if request.client else "unknown"
    wait = store.limiter.acquire(f"login:{client}")  # guessing keys costs the rate limit
    if wait > 0:
        return _login_page(request, f"too many attempts: retry in {max(1, int(wait))} s", 429)
    store.maybe_reload()
    role = store.lookup(key) if key else None
    if role is None:
        log.warning("dashboard log-in refused: unknown key", extra={"client": client})
        return _login_page(request, "unknown API key", 401)
    key_id = hash_key(key)[:12]
    value, session = get_sessions(request).issue(key_id)
    log.info("dashboard log-in", extra={"key_id": key_id, "client": client})
    response = RedirectResponse("/dashboard", status_code=303)
    response.set_cookie(
        COOKIE_NAME,
        value,
        max_age=int(request.app.state.settings.session_ttl_s),
        path="/",
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )
    return response


@router.post(
    "/logout",
    summary="End this browser's dashboard session",
    status_code=303,
    response_class=Response,
    responses={303: {"description": "The session cookie is cleared: to the log-in page"}},
)
async def logout(request: Request) -> Response:
    signer = get_sessions(request)
    session = signer.verify(request.cookies.get(COOKIE_NAME))
    if session is not None and _same_origin(request):
        signer.revoke(session)
        log.info("dashboard log-out", extra={"key_id": session.key_id})
    target = "/dashboard/login" if get_keystore(request).enabled else "/dashboard"
    response = RedirectResponse(target, status_code=303)
    response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="strict", secure=_secure(request))
    return response


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
