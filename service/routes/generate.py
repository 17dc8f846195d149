"""POST /generate: completion from the live model (JSON, or server-sent events with "stream": true)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from memfit.config import Settings
from service.deps import EngineDep, SettingsDep
from service.engine import Engine
from service.engine_errors import EngineError
from service.errors import ApiError, as_api_error, retry_after_seconds
from service.generation import Completion, Delta, Prepared, SamplingParams, cancelled_error, deadline_error
from service.schemas import ErrorResponse, GenerateRequest, GenerateResponse
from service.security import Principal, require_role

router = APIRouter(tags=["generate"])


def sse_event_schema(data: str) -> dict[str, Any]:
    """The OpenAPI schema of one event of a `text/event-stream` answer (OpenAPI < 3.2 describes an
    event stream by its event); `data` says what each event's data holds."""
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"type": "string", "description": data}, "event": {"type": "string"}},
    }


SSE_EVENT = sse_event_schema(
    'each `data` a JSON object: {"token"} events, then {"done": true, "version", "finish_reason", "usage"}'
)
ReadDep = Annotated[Principal, Depends(require_role("read"))]


def check_limits(
    settings: Settings,
    prompt: str,
    max_new_tokens: int,
    stop: list[str],
    names: tuple[str, str, str] = ("prompt", "max_new_tokens", "stop"),
) -> None:
    """The Settings bounds of a generation request, each a 4xx naming the field and the limit."""
    if len(prompt) > settings.max_prompt_chars:
        raise ApiError(
            413,
            "prompt_too_long",
            f"prompt has {len(prompt)} characters; max_prompt_chars = {settings.max_prompt_chars}",
            names[0],
        )
    if max_new_tokens > settings.max_new_tokens_limit:
        raise ApiError(
            422,
            "limit_exceeded",
            f"{max_new_tokens} new tokens requested; max_new_tokens_limit = {settings.max_new_tokens_limit}",
            names[1],
        )
    if len(stop) > settings.max_stop_sequences:
        raise ApiError(
            422,
            "limit_exceeded",
            f"{len(stop)} stop sequences; max_stop_sequences = {settings.max_stop_sequences}",
            names[2],
        )


async def wait_for_version(engine: Engine, settings: Settings, v: int, field: str = "min_version") -> None:
    """Return once `v` is in this replica's active chain; 409 at once when it was rejected or is off
    the active chain; 503 with Retry-After after settings.min_version_wait_s."""
    deadline = time.monotonic() + settings.min_version_wait_s
    delay = 0.02
    while True:
        state = await asyncio.to_thread(engine.min_version_state, v)
        if state == "ready":
            return
        if state == "rejected":
            raise ApiError(409, "version_rejected", f"version {v} was rejected by the evaluation gate", field)
        if state == "off_chain":
            raise ApiError(
                409,
                "version_not_in_active_chain",
                f"version {v} is not in the active chain (active version {engine.version}; rolled back?)",
                field,
            )
        left = deadline - time.monotonic()
        if left <= 0:
            raise ApiError(
                503,
                "version_not_ready",
                f"version {v} is not served by this replica after {settings.min_version_wait_s} s "
                f"(active version {engine.version})",
                field,
                {"Retry-After": retry_after_seconds(1.0)},
            )
        await asyncio.sleep(min(delay, left))
        delay = min(delay * 1.5, 0.2)


async def admit(
    engine: Engine,
    settings: Settings,
    prompt: str,
    params: SamplingParams,
    version: int | None,
    min_version: int | None,
    version_field: str = "version",
) -> Prepared:
    """Resolve `version` / `min_version` and tokenise: the request is then bound to one version."""
    if version is not None and min_version is not None:
        raise ApiError(422, "invalid_request", "give either version or min_version, not both", version_field)
    if engine.is_full():  # before tokenising; submit() checks again
        raise engine.overloaded()
    if version is not None:
        await asyncio.to_thread(_check_pinnable, engine, version, version_field)
    loop = asyncio.get_running_loop()
    for _ in range(3):
        if min_version is not None:
            await wait_for_version(engine, settings, min_version)
        prepared = await loop.run_in_executor(engine.executor, engine.prepare, prompt, params, version)
        if min_version is None or min_version in engine.store.chain(prepared.version):
            return prepared
        # a rollback landed between the wait and the admission: wait again (409 if it stays off-chain)
    raise ApiError(
        503,
        "version_not_ready",
        f"version {min_version} kept leaving the active chain",
        "min_version",
        {"Retry-After": "1"},
    )


def _check_pinnable(engine: Engine, version: int, field: str) -> None:
    try:
        engine.check_pinnable(version)
    except EngineError as e:
        e.field = field
        raise


_DISCONNECTED = object()  # queued by the disconnect watcher


def open_stream(
    engine: Engine, settings: Settings, prepared: Prepared, request: Request | None = None
) -> AsyncIterator[Delta]:
    """Submit `prepared` for decoding now (so that a full queue is a real 503 with Retry-After, before
    any response starts) and return the async iterator of its pieces.

    The decoding thread hands each piece to the event loop directly (no thread waits per request).
    The iterator ends the generation, and the engine stops decoding its row, when the client
    disconnects (`request` is watched for http.disconnect: 499), when settings.request_timeout_s has
    passed since admission (503 deadline_exceeded), or when the caller stops iterating."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    prepared.timeout_s = settings.request_timeout_s
    prepared.deadline = time.monotonic() + settings.request_timeout_s

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (server shutting down)
            prepared.cancelled.set()

    engine.submit(prepared, put)  # Overloaded (503) past settings.max_waiting
    return _deltas(engine, prepared, queue, request)


async def _deltas(
    engine: Engine, prepared: Prepared, queue: asyncio.Queue[Any], request: Request | None
) -> AsyncIterator[Delta]:
    m = engine.metrics
    watcher = asyncio.create_task(_watch_disconnect(request, queue)) if request is not None else None
    try:  # the decoding row counts itself as running (service.engine), not this wait
        while True:
            left = (prepared.deadline or 0) - time.monotonic()
            try:
                item = await asyncio.wait_for(queue.get(), timeout=max(left, 0.0))
            except TimeoutError:
                raise deadline_error(prepared) from None
            if item is _DISCONNECTED:
                raise cancelled_error()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.done:
                return
    except Exception as e:  # counted unless the request was at fault or its client left (4xx)
        known = as_api_error(e)
        if m is not None and not (known is not None and known.status < 500):
            m.generation_errors.inc()
        raise
    finally:  # done, client gone, deadline or caller stopped: the row stops at the next step
        engine.cancel(prepared)
        if watcher is not None:
            watcher.cancel()


async def _watch_disconnect(request: Request, queue: asyncio.Queue[Any]) -> None:
    """Queue _DISCONNECTED once the client has gone (the body was read already, so the next ASGI
    message is http.disconnect, sent when the connection closes or the response is complete)."""
    try:
        while True:
            message = await request.receive()
            if message.get("type") == "http.disconnect":
                queue.put_nowait(_DISCONNECTED)
                return
    except Exception:  # no receive channel: nothing to watch
        return


async def complete(
    engine: Engine, settings: Settings, prepared: Prepared, request: Request | None = None
) -> Completion:
    parts: list[str] = []
    async for d in open_stream(engine, settings, prepared, request):
        if d.done:
            return Completion.of(parts, prepared.version, d)
        parts.append(d.text)
    raise RuntimeError("generation ended without a final event")


def stream_error(e: BaseException) -> dict[str, Any]:
    """The in-band error event of a stream whose status line was sent already."""
    known = as_api_error(e)
    if known is not None:
        return {"code": known.code, "message": known.message, "field": known.field}
    return {"code": "internal_error", "message": f"generation failed: {type(e).__name__}", "field": None}


def sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def event_stream(
    deltas: AsyncIterator[Delta],
    render: Callable[[Delta], Iterable[Any]],
    render_error: Callable[[Exception], Any],
    headers: dict[str, str],
    end: bytes = b"",
) -> StreamingResponse:
    """The `text/event-stream` response of an open stream (`open_stream`): each piece becomes the
    events `render(delta)` returns (JSON objects); an error once the status line is sent becomes one
    in-band event, `render_error(e)`; `end` (e.g. `data: [DONE]`) closes the stream either way."""

    async def events() -> AsyncIterator[bytes]:
        try:
            async for d in deltas:
                for obj in render(d):
                    yield sse(obj)
        except Exception as e:  # the status line is sent already: report in-band
            yield sse(render_error(e))
        if end:
            yield end

    headers = {**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


@router.post(
    "/generate",
    response_model=GenerateResponse,
    summary="Generate a completion",
    responses={
        200: {
            "description": "JSON, or `text/event-stream` when stream is true",
            "headers": {"X-Memfit-Version": {"schema": {"type": "integer"}}},
            "content": {"text/event-stream": {"schema": SSE_EVENT}},
        },
        404: {"model": ErrorResponse, "description": "pinned version does not exist"},
        409: {
            "model": ErrorResponse,
            "description": "version rejected, or min_version not in the active chain",
        },
        413: {"model": ErrorResponse, "description": "prompt over max_prompt_chars or the model's context"},
        422: {"model": ErrorResponse, "description": "invalid field or limit exceeded"},
        503: {
            "model": ErrorResponse,
            "description": "min_version not served within min_version_wait_s, max_waiting requests "
            "waiting already, or the generation ran past request_timeout_s (Retry-After)",
        },
    },
)
async def generate(
    request: Request, body: GenerateRequest, engine: EngineDep, settings: SettingsDep, _: ReadDep
):
    max_new = body.max_new_tokens
    if "max_new_tokens" not in body.model_fields_set:  # the default never exceeds the server's limit
        max_new = min(max_new, settings.max_new_tokens_limit)
    check_limits(settings, body.prompt, max_new, body.stop)
    params = SamplingParams(
        max_new_tokens=max_new,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        stop=list(body.stop),
        seed=body.seed,
    )
    prepared = await admit(engine, settings, body.prompt, params, body.version, body.min_version)
    headers = {"X-Memfit-Version": str(prepared.version)}
    if not body.stream:
        c = await complete(engine, settings, prepared, request)
        out = GenerateResponse(
            text=c.text,
            version=c.version,
            finish_reason=c.finish_reason,  # type: ignore[arg-type]
            usage={"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens},  # type: ignore[arg-type]
        )
        return JSONResponse(out.model_dump(), headers=headers)

    deltas = open_stream(engine, settings, prepared, request)  # 503 here when the queue is full

    def render(d: Delta) -> list[dict[str, Any]]:
        if d.done:
            usage = {"prompt_tokens": d.prompt_tokens, "completion_tokens": d.completion_tokens}
            return [
                {"done": True, "version": prepared.version, "finish_reason": d.finish_reason, "usage": usage}
            ]
        return [{"token": d.text}] if d.text else []

    return event_stream(deltas, render, lambda e: {"error": stream_error(e)}, headers)
