"""The one error format of the HTTP API, and the checks of ids that arrive in paths.

Every error body is ``{"error": {"code": "...", "message": "...", "field": "..." | null}}``
(docs/contracts.md "HTTP"). Routes raise :class:`ApiError`; the engine raises its own errors
(service/engine_errors.py), which :data:`ENGINE_STATUS` and :func:`as_api_error` map to HTTP here and
nowhere else. :func:`install_error_handlers` renders both, FastAPI's and Starlette's ``HTTPException``
(404, 405, ...), request validation errors (422, naming the field) and oversized bodies (413, naming
the limit) in that format, and never lets bad input become a 500.

Under ``/v1`` (the OpenAI-compatible routes) the same errors take OpenAI's shape, which the official
client reads into ``APIStatusError.message/.type/.param/.code``:
``{"error": {"message", "type", "param", "code", "field"}}`` -- ``param`` is the field at fault
(``field`` repeats it, so a client of the memfit shape keeps working) and ``type`` follows the status
(:func:`openai_error_type`).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import engine_errors as ee

log = logging.getLogger("memfit.service")

# Document and job ids: a letter or digit first (so never "." or ".."), then at most 127 of
# letters, digits and . _ : -  -- no slash, no backslash, no whitespace: safe as a file name.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
_ID_RE = re.compile(ID_PATTERN)

# Default codes for statuses raised without one (HTTPException from FastAPI/Starlette internals).
STATUS_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}


class ApiError(HTTPException):
    """An error the client sees as ``{"error": {"code", "message", "field"}}`` with ``status``.

    A subclass of FastAPI's HTTPException so that it also passes through places that re-raise only
    HTTPException (FastAPI's body reading), and so that code catching HTTPException still works.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=status, detail=message, headers=dict(headers) if headers else None)
        self.status = status
        self.code = code
        self.message = message
        self.field = field

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.code!r}, {self.message!r}, field={self.field!r})"


# The engine's errors (service/engine_errors.py) as HTTP: the one place they get a status.
ENGINE_STATUS: dict[type[ee.EngineError], int] = {
    ee.UnknownVersion: 404,
    ee.VersionNotServable: 409,
    ee.EmptyPrompt: 422,
    ee.PromptTooLong: 413,
    ee.ShuttingDown: 503,
    ee.Overloaded: 503,
    ee.DeadlineExceeded: 503,
    ee.ClientDisconnected: 499,  # nginx's "client closed request"
    ee.GenerationFailed: 500,
}


def as_api_error(e: BaseException) -> ApiError | None:
    """`e` as the client sees it: an ApiError as it is, an engine error mapped by ENGINE_STATUS (its
    retry_after_s becomes Retry-After), anything else None (an internal error)."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ee.EngineError):
        status = next((s for cls, s in ENGINE_STATUS.items() if isinstance(e, cls)), 500)
        headers = {"Retry-After": str(e.retry_after_s)} if e.retry_after_s is not None else None
        return ApiError(status, e.code, e.message, e.field, headers)
    return None


def retry_after_seconds(wait_s: float) -> str:
    """A Retry-After value: whole seconds, at least 1."""
    return str(max(1, math.ceil(wait_s)))


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "field": field}}


def openai_error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    if status >= 500:
        return "server_error"
    return {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error"
    )


def openai_error_body(status: int, code: str, message: str, field: str | None = None) -> dict[str, Any]:
    """OpenAI's error body (``field`` kept next to ``param``: the same value)."""
    return {
        "error": {
            "message": message,
            "type": openai_error_type(status),
            "param": field,
            "code": code,
            "field": field,
        }
    }


def is_openai_path(scope: Mapping[str, Any]) -> bool:
    """Whether an ASGI scope is a request to the OpenAI-compatible routes (``/v1`` and below)."""
    path = str(scope.get("path", ""))
    root = str(scope.get("root_path", ""))
    if root and path.startswith(root):
        path = path[len(root) :]
    return path == "/v1" or path.startswith("/v1/")


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
    *,
    openai: bool = False,
) -> JSONResponse:
    body = openai_error_body(status, code, message, field) if openai else error_body(code, message, field)
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def _respond(
    request: Request,
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The error response in the shape of the route family of ``request``."""
    return error_response(status, code, message, field, headers, openai=is_openai_path(request.scope))


# ---------------------------------------------------------------------------------------------
# ids


def validate_id(value: object, field: str = "id") -> str:
    """A document or job id, or a 422 naming ``field``. Refuses path traversal ("..", "a/b")."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        shown = repr(value) if len(repr(value)) <= 64 else repr(value)[:61] + "..."
        raise ApiError(
            422,
            "invalid_id",
            f"{field} {shown} is not a valid id: 1 to 128 characters of letters, digits and . _ : -, "
            "starting with a letter or digit",
            field=field,
        )
    return value


def validate_version_id(value: object, field: str = "version") -> int:
    """A version id (a non-negative integer; the base model is 0), or a 422 naming ``field``."""
    if isinstance(value, bool):
        value = None  # True is not version 1
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18:
        value = int(value)
    if not isinstance(value, int) or value < 0:
        raise ApiError(
            422, "invalid_version", f"{field} must be a non-negative integer, got {value!r}", field=field
        )
    return value


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


# ---------------------------------------------------------------------------------------------
# handlers


def _field_from_loc(loc: Sequence[Any]) -> str | None:
    """("body", "documents", 0, "text") -> "documents[0].text"; ("query", "limit") -> "limit"."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        source = parts.pop(0)
        if not parts:
            return source
        if source == "body" and len(parts) == 1 and isinstance(parts[0], int):
            return "body"  # a JSON decode error at a character position
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or None


async def _api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return _respond(request, exc.status, exc.code, exc.message, exc.field, exc.headers)


async def _engine_error_handler(request: Request, exc: Exception) -> JSONResponse:
    api = as_api_error(exc)
    assert api is not None
    return await _api_error_handler(request, api)


async def _http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    detail = exc.detail
    code = STATUS_CODES.get(status, "error")
    field = None
    if isinstance(detail, Mapping):  # HTTPException(detail={"code": ..., "message": ..., "field": ...})
        code = str(detail.get("code", code))
        field = detail.get("field")
        message = str(detail.get("message", ""))
    else:
        message = str(detail) if detail else ""
    if not message:
        try:
            message = HTTPStatus(status).phrase
        except ValueError:
            message = "error"
    if status == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    elif status == 405 and message == "Method Not Allowed":
        message = f"method {request.method} not allowed on {request.url.path}"
    return _respond(request, status, code, message, field, getattr(exc, "headers", None))


async def _validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if not errors:
        return _respond(request, 422, "invalid_request", "invalid request")
    first = errors[0]
    field = _field_from_loc(first.get("loc", ()))
    msg = str(first.get("msg", "invalid value"))
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        message = f"request body is not valid JSON: {ctx.get('error', msg)}"
    elif first.get("type") == "missing":
        message = f"{field} is required"
    else:
        message = f"{field}: {msg}" if field else msg
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return _respond(request, 422, "invalid_request", message, field)


async def _redis_down_handler(request: Request, exc: Exception) -> JSONResponse:
    # Distributed mode: the writer lock, the queue and the version events live in Redis. An operation
    # that needs it while it is unreachable did nothing (the lock was never taken), so it can be retried.
    return _respond(
        request,
        503,
        "redis_unavailable",
        f"Redis is unreachable ({type(exc).__name__}); nothing was changed, retry when it is back",
        "MEMFIT_REDIS_URL",
        {"Retry-After": "5"},
    )


async def _unhandled_handler(request: Request, exc: Exception) -> JSONResponse:
    # ServerErrorMiddleware still logs the traceback and re-raises after sending this response.
    return _respond(request, 500, "internal_error", "internal server error")


class BodySizeLimitMiddleware:
    """413 for request bodies above the limit: at once from Content-Length, else while streaming.

    The limit is ``app.state.settings.max_request_bytes`` when the app has settings, else
    ``max_bytes``. Pure ASGI, so streaming responses are untouched.
    """

    def __init__(self, app: ASGIApp, max_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _limit(self, scope: Scope) -> int | None:
        app = scope.get("app")
        settings = getattr(getattr(app, "state", None), "settings", None)
        limit = getattr(settings, "max_request_bytes", None)
        return int(limit) if limit is not None else self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        if limit is None:
            await self.app(scope, receive, send)
            return
        too_large = ApiError(
            413,
            "payload_too_large",
            f"request body exceeds max_request_bytes = {limit} bytes",
            field="max_request_bytes",
        )
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > limit:
                    response = error_response(
                        413,
                        too_large.code,
                        too_large.message,
                        too_large.field,
                        openai=is_openai_path(scope),
                    )
                    await response(scope, receive, send)
                    return
                break

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large
            return message

        await self.app(scope, limited_receive, send)


def install_error_handlers(app: FastAPI, max_request_bytes: int | None = None) -> None:
    """Render every error of ``app`` as the contract's JSON and add the 413 body-size limit.

    Call once in ``create_app`` before the app starts (middleware cannot be added later). The body
    limit is read per request from ``app.state.settings.max_request_bytes``; ``max_request_bytes``
    is the fallback when the app has no settings.
    """
    app.add_exception_handler(ApiError, _api_error_handler)
    app.add_exception_handler(ee.EngineError, _engine_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError
    except ImportError:  # redis is only needed in distributed mode
        pass
    else:
        app.add_exception_handler(RedisConnectionError, _redis_down_handler)
        app.add_exception_handler(RedisTimeoutError, _redis_down_handler)
    app.add_exception_handler(Exception, _unhandled_handler)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_request_bytes)
