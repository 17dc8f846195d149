"""The FastAPI application: `create_app(settings)`.

The lifespan opens (or seeds) the store with the mode's writer lock, loads the live engine, starts the
job dispatcher (`workers.dispatch.create_dispatcher`: the embedded update runner, or the distributed
mode's Celery dispatcher when MEMFIT_REDIS_URL is set, imported lazily),
and a task that follows the store's ACTIVE pointer every `settings.follow_interval_s`, so a rollback
made with the CLI on the store reaches this server within a second. Handlers live on `app.state`
(`settings`, `store`, `engine`, `dispatcher`, `metrics`) and reach routes through the `Annotated`
dependencies of service/deps.py.

Routes use the dispatcher through its protocol, `workers.dispatch.Dispatcher` (`notify(job_id)`,
`cancel(job_id) -> Job`, `retry(job_id) -> Job`, `stop()`, `status()`), whatever the mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from memfit.config import Settings, resolve_device
from memfit.logs import RequestIdMiddleware
from model_store import Store
from service.engine import Engine
from service.errors import install_error_handlers
from service.metrics import Metrics, MetricsMiddleware
from service.observability import record_job
from service.routes import dashboard, generate, health, ingest, jobs, openai, versions
from service.schemas import ErrorResponse, OpenAIErrorResponse
from workers.dispatch import Dispatcher, LogDispatcher, create_dispatcher, writer_lock

log = logging.getLogger("memfit.service")

API_DESCRIPTION = """\
Online knowledge updates for a memory-layer language model.

`POST /ingest` queues documents; an update job teaches them to the model by sparse memory
finetuning and publishes an immutable version; `POST /generate` (or the OpenAI-compatible
`/v1/chat/completions`, `/v1/completions`) answers from the active version. Versions can be pinned,
awaited (`min_version`), rolled back and forward. Errors are `{"error": {"code", "message", "field"}}`;
under `/v1` OpenAI's `{"error": {"message", "type", "param", "code"}}`.
"""


def _errors(*statuses: int, model: type = ErrorResponse) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error answers (the error bodies of service/errors.py)."""
    what = {
        400: "invalid JSON or a bad id",
        401: "no or unknown API key (keys configured)",
        403: "the key's role is too low for this endpoint",
        404: "unknown job, version, document, model or asset",
        413: "body over max_request_bytes (or another size limit, named)",
        422: "a missing, unknown or out-of-range field (named in `field`)",
        429: "rate limit of the key, or queue over max_queue_depth (Retry-After)",
        503: "still starting, or a dependency unavailable (Retry-After)",
    }
    return {s: {"model": model, "description": what[s]} for s in statuses}


# What any route can answer (auth, rate limit, body size, validation, start-up); routes with ids add 404.
ERROR_RESPONSES = _errors(400, 401, 403, 413, 422, 429, 503)
WITH_NOT_FOUND = {**ERROR_RESPONSES, **_errors(404)}
OPENAI_ERRORS = _errors(400, 401, 403, 404, 413, 422, 429, 503, model=OpenAIErrorResponse)


class StoreSetupError(RuntimeError):
    """The store cannot be opened or seeded (message says why and what to do)."""


def open_store(settings: Settings, lock: Any = None) -> Store:
    """Open the store, seeding an empty one from `settings.model`, with the writer lock `lock` (a
    WriterLock or a function of the base id, workers.dispatch.writer_lock; None: the file lock).

    A store whose base differs from an explicitly given model (--model / MEMFIT_MODEL) is an error.
    """
    from model_store import BaseMismatchError
    from model_store.tables import has_weights

    root, model = Path(settings.store).expanduser(), Path(settings.model).expanduser()
    explicit = "model" in settings.model_fields_set
    try:
        if (root / "store.json").exists():
            if explicit:
                return Store.init(root, model, lock=lock)  # checks that the base is this model
            return Store(root, lock=lock)
        if not has_weights(model):
            raise StoreSetupError(
                f"no store at {root} and no model at {model}: build one with `memfit pretrain` or pass --model DIR"
            )
        log.info("seeding store %s from %s", root, model)
        return Store.init(root, model, lock=lock)
    except BaseMismatchError as e:
        raise StoreSetupError(f"{e}; use another --store, or the model this store was built from") from None
    except FileNotFoundError as e:
        raise StoreSetupError(str(e)) from None


def _job_counts(store: Store) -> dict[str, int]:
    return store.jobs.counts()  # finished jobs are not decoded for it


def _make_dispatcher(
    app: FastAPI, store: Store, engine: Engine, settings: Settings, metrics: Metrics
) -> Dispatcher:
    """The mode's dispatcher (workers.dispatch); the embedded runner's callbacks swap the engine and
    record the job's metrics."""

    def on_published(result, job) -> None:
        engine.switch_to(store.active())
        if job.created_at:
            metrics.ingest_to_live.observe(max(0.0, time.time() - job.created_at))

    def on_finished(result, job) -> None:
        metrics.jobs_finished.labels(result.status).inc()
        for phase in ("queued", "training", "evaluation", "publish", "total"):
            value = (result.timings or {}).get(phase)
            if isinstance(value, int | float):
                metrics.job_duration.labels(phase).observe(float(value))
        record_job(metrics, result, store, durations=False)  # published / rejected / slots changed

    try:
        return create_dispatcher(
            store,
            settings,
            engine=engine,
            metrics=metrics,
            device=app.state.device,  # MEMFIT_DEVICE, like serving
            on_published=on_published,
            on_finished=on_finished,
        )
    except ImportError as e:
        raise StoreSetupError(
            f"MEMFIT_REDIS_URL is set but the distributed mode is not available ({e}); unset it to run embedded"
        ) from None


async def _follow(app: FastAPI, engine: Engine, interval: float) -> None:
    """Poll the store's ACTIVE pointer; swap when it moved (off the event loop, on its own thread)."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memfit-follow")
    loop = asyncio.get_running_loop()
    try:
        while True:
            await asyncio.sleep(interval)
            try:
                await loop.run_in_executor(pool, engine.follow_active)
            except Exception:
                log.exception("following the active version failed")
    finally:
        pool.shutdown(wait=False)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    device = resolve_device(settings.device)  # DeviceUnavailable: MEMFIT_DEVICE=cuda without a GPU
    app.state.device = device
    # the mode's writer lock is given at open (a Redis lock shared by every distributed writer)
    lock = writer_lock(settings) if app.state.start_runner else None
    store = await asyncio.to_thread(open_store, settings, lock)
    app.state.store = store
    engine = await asyncio.to_thread(Engine.from_store, store, settings, metrics, device)
    app.state.engine = engine
    metrics.set_job_source(lambda: _job_counts(store))
    metrics.set_knowledge_source(store, settings, lambda: engine.version)
    if app.state.start_runner:
        dispatcher = await asyncio.to_thread(_make_dispatcher, app, store, engine, settings, metrics)
    else:
        dispatcher = LogDispatcher(store)
    app.state.dispatcher = dispatcher
    follower = asyncio.create_task(_follow(app, engine, settings.follow_interval_s))
    log.info("memfit ready: store %s, active version %d, device %s", store.root, engine.version, device)
    try:
        yield
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        await asyncio.to_thread(dispatcher.stop)
        # uvicorn waited MEMFIT_SHUTDOWN_GRACE_S for in-flight requests already; another server (or
        # a request admitted late) gets the same bound here before decoding stops
        await asyncio.to_thread(engine.close, settings.shutdown_grace_s)


def create_app(settings: Settings | None = None, *, start_runner: bool = True) -> FastAPI:
    """The API app for `settings` (default: from the environment). `start_runner=False` serves
    without running update jobs (they stay queued in the log), for tests and read-only replicas."""
    settings = settings or Settings()
    app = FastAPI(
        title="memfit",
        version="0.1.0",
        description=API_DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.start_runner = start_runner
    app.state.store = None
    app.state.engine = None
    app.state.dispatcher = None
    app.state.device = None  # resolved from settings.device at start-up
    install_error_handlers(app, settings.max_request_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(RequestIdMiddleware)  # outermost of ours: every line of a request carries its id
    app.include_router(generate.router, responses=ERROR_RESPONSES)
    app.include_router(openai.router, responses=OPENAI_ERRORS)
    app.include_router(ingest.router, responses=ERROR_RESPONSES)
    app.include_router(jobs.router, responses=WITH_NOT_FOUND)
    app.include_router(versions.router, responses=WITH_NOT_FOUND)
    app.include_router(versions.documents_router, responses=WITH_NOT_FOUND)
    app.include_router(health.router, responses=ERROR_RESPONSES)
    app.include_router(dashboard.router, responses=WITH_NOT_FOUND)
    return app
