"""GET /healthz (process alive), GET /readyz (model loaded, store readable, decoding threads alive),
GET /metrics."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.schemas import Health, Ready
from service.security import Principal, require_role_unless

router = APIRouter(tags=["health"])
HealthDep = Annotated[Principal, Depends(require_role_unless("public_health", "read"))]
MetricsAuthDep = Annotated[Principal, Depends(require_role_unless("public_metrics", "read"))]


@router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz(_: HealthDep) -> Health:
    return Health()


def _readiness(request: Request) -> Ready:
    state = request.app.state
    settings = state.settings
    engine = getattr(state, "engine", None)
    store = getattr(state, "store", None)
    store_ok, active, detail = False, None, getattr(state, "startup_error", None)
    if store is not None:
        try:
            active = store.active()
            store.manifest(active)
            store_ok = True
        except Exception as e:
            detail = f"store not readable: {e}"
    redis = None
    if settings.redis_url:
        try:
            import redis as redis_lib

            redis_lib.Redis.from_url(
                settings.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5
            ).ping()
            redis = "ok"
        except Exception as e:
            redis = f"unreachable: {type(e).__name__}"
    # a dead decoding thread leaves its queue untaken: not ready (check_decoders restarts it, so the
    # next probe is green again unless it keeps dying)
    dead = engine.check_decoders() if engine is not None else []
    if dead:
        detail = "decoding thread died: " + "; ".join(dead)
    if engine is not None and engine.last_follow_error and detail is None:
        detail = engine.last_follow_error
    runner_error = getattr(getattr(state, "dispatcher", None), "last_error", None)
    if runner_error and detail is None:  # serving works; updates do not (reported, not fatal)
        detail = f"update runner: {runner_error}"
    return Ready(
        ready=engine is not None and store_ok and not dead,
        model_loaded=engine is not None,
        store_readable=store_ok,
        active_version=engine.version if engine is not None else active,
        mode="distributed" if settings.redis_url else "embedded",
        redis=redis,
        device=getattr(state, "device", None),
        detail=detail,
    )


@router.get(
    "/readyz",
    response_model=Ready,
    summary="Ready to serve: model loaded, store readable, decoding threads alive (Redis reported, not required)",
    responses={503: {"description": "not ready", "model": Ready}},
)
async def readyz(request: Request, _: HealthDep):
    ready = await asyncio.to_thread(_readiness, request)
    return JSONResponse(ready.model_dump(), status_code=200 if ready.ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request, _: MetricsAuthDep) -> Response:
    body = await asyncio.to_thread(request.app.state.metrics.render)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
