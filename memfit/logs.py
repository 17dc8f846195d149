"""Structured logs: one JSON object per line, with the request id, job id and version where they apply.

- `configure_logging(level, fmt)`: the root logger writes JSON lines (`fmt="json"`, the default) or the
  classic text lines (`fmt="text"`) to stderr; `memfit serve` and `memfit worker` call it
  (`MEMFIT_LOG_FORMAT`, `MEMFIT_LOG_LEVEL`). uvicorn's and Celery's loggers propagate to it.
- `log_context(request_id=..., job_id=..., version=...)`: context variables that every line logged
  inside the block carries (threads started by `asyncio.to_thread` inherit them). A log call's
  `extra={"job_id": ...}` wins over the context.
- `RequestIdMiddleware`: takes `X-Request-ID` from the request (1-128 characters of
  `[A-Za-z0-9._:/+=@-]`; anything else is replaced) or generates one, returns it in the response's
  `X-Request-ID`, and logs one `memfit.access` line per request (method, route template, status,
  duration; the job id of `/jobs/{job_id}` routes and of a 202 from `/ingest`; the version of a
  generation answer).

The request id of an ingest is recorded in the job (`Job.request_id`), so the process that runs the
job, the embedded runner or a Celery worker, logs under the same id (`workers/runner.py`,
`workers/tasks.py`, which also receives it in the task's `memfit_request_id` header).

Nothing here imports the web stack (the middleware is plain ASGI), so every layer above memlm uses it:
it sits beside memfit/config.py at the bottom of the layers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
import traceback
import uuid
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

REQUEST_ID_HEADER = "X-Request-ID"
CONTEXT_FIELDS = ("request_id", "job_id", "version")
_VALID_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")

_vars: dict[str, ContextVar[Any]] = {
    name: ContextVar(f"memfit_{name}", default=None) for name in CONTEXT_FIELDS
}

# LogRecord attributes that are not `extra` fields
# (and uvicorn's `color_message`, the message with ANSI colours)
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


def clean_request_id(value: str | None) -> str:
    """`value` when it is an acceptable request id, else a new one (never log arbitrary header bytes)."""
    if value and _VALID_ID.match(value):
        return value
    return new_request_id()


def current(name: str) -> Any:
    return _vars[name].get()


def current_request_id() -> str | None:
    return _vars["request_id"].get()


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Set request_id / job_id / version for the lines logged inside the block (None: leave as is)."""
    tokens = []
    for name, value in fields.items():
        if name not in _vars:
            raise ValueError(f"unknown log context field {name!r}; one of {CONTEXT_FIELDS}")
        if value is not None:
            tokens.append((_vars[name], _vars[name].set(value)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextFilter(logging.Filter):
    """Copies the context variables onto each record (unless the call's `extra` set them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _vars.items():
            if getattr(record, name, None) is None:
                value = var.get()
                if value is not None:
                    setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message", "request_id"?, "job_id"?, "version"?, ...extra, "exc"?}`."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_") and value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The classic line, with the context fields appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ctx = [f"{n}={getattr(record, n)}" for n in CONTEXT_FIELDS if getattr(record, n, None) is not None]
        return f"{line} [{' '.join(ctx)}]" if ctx else line


def make_handler(fmt: str = "json", stream: Any = None) -> logging.Handler:
    if fmt not in ("json", "text"):
        raise ValueError(f"log format must be json or text, got {fmt!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    handler._memfit = True  # type: ignore[attr-defined]
    return handler


def configure_logging(level: str = "INFO", fmt: str = "json", stream: Any = None) -> logging.Handler:
    """Replace the root logger's handlers with one memfit handler; uvicorn's loggers propagate to it."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = make_handler(fmt, stream)
    root.addHandler(handler)
    root.setLevel(str(level).upper())
    if fmt == "json":  # keep stderr to JSON lines: no progress bars (transformers' weight loading)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.app.trace"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.propagate = True
    return handler


# ---------------------------------------------------------------------------------------------
# the request id middleware (pure ASGI, so streamed responses pass untouched)

access_log = logging.getLogger("memfit.access")


class RequestIdMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        presented = None
        for k, v in scope.get("headers") or []:
            if k == b"x-request-id":
                presented = v.decode("latin-1")
                break
        rid = clean_request_id(presented)
        status = 500
        version: str | None = None
        location: str | None = None
        t0 = time.perf_counter()

        async def send_wrapper(message: dict) -> None:
            nonlocal status, version, location
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                for k, v in headers:
                    lk = k.lower()
                    if lk == b"x-memfit-version":
                        version = v.decode("latin-1")
                    elif lk == b"location":
                        location = v.decode("latin-1")
                headers.append((b"x-request-id", rid.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        with log_context(request_id=rid):
            try:
                await self.app(scope, receive, send_wrapper)
            finally:
                route = scope.get("route")
                extra: dict[str, Any] = {
                    "method": scope.get("method", "GET"),
                    "path": scope.get("path", ""),
                    "endpoint": getattr(route, "path", None) or "unmatched",
                    "status": status,
                    "duration_s": round(time.perf_counter() - t0, 6),
                }
                job_id = (scope.get("path_params") or {}).get("job_id")
                if job_id is None and location and location.startswith("/jobs/"):
                    job_id = location.rsplit("/", 1)[-1]
                if job_id is not None:
                    extra["job_id"] = str(job_id)
                if version is not None and version.isdigit():
                    extra["version"] = int(version)
                access_log.info("%s %s %d", extra["method"], extra["path"], status, extra=extra)
