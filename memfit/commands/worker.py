"""`memfit worker [--model DIR] [--store DIR]`: a Celery worker of the distributed mode.

Needs MEMFIT_REDIS_URL. Opens the shared store (seeding an empty one from --model), takes the store's
Redis writer lock for every publish, ensures the background table in Redis (seeded from the store's
base when absent; a table of another base is refused), loads the model at the store's active version
and then consumes `settings.celery_queue` with the solo pool: one update at a time in this very
process (so the model is loaded once, and no CUDA context crosses a fork). Run more worker processes
(or machines) for more throughput; `--concurrency` > 1 is refused for that reason.

Device: `MEMFIT_DEVICE` (cpu, cuda, cuda:N, or auto: CUDA when available; memfit.config.resolve_device), read
through Settings; a CUDA device asked for and absent stops the worker with a clear error.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from memfit.commands import settings_from_args


def _open_store(settings, model_given: bool):
    from model_store import BaseMismatchError, Store
    from model_store.tables import has_weights
    from workers.runtime import worker_lock  # the Redis writer lock, retrying through a blip

    root, model = Path(settings.store).expanduser(), Path(settings.model).expanduser()
    if (root / "store.json").exists():
        if model_given:
            Store.init(root, model)  # checks the base is this model
        return Store.open(root, lock=worker_lock(settings))
    if not has_weights(model):
        raise SystemExit(
            f"memfit worker: no store at {root} and no model at {model}: pass --store of the API's store, "
            "or --model DIR to seed it"
        )
    try:
        Store.init(root, model)
    except BaseMismatchError as e:  # another process seeded it meanwhile with another base
        raise SystemExit(f"memfit worker: {e}") from None
    return Store.open(root, lock=worker_lock(settings))


def run(args) -> int:
    from memfit.logs import configure_logging

    settings = settings_from_args(args)
    configure_logging(settings.log_level, settings.log_format)  # JSON lines (docs/observability.md)
    problem = _settings_problem(settings, args)
    if problem:
        return _refuse(problem)

    from memfit.config import DeviceUnavailable, resolve_device

    try:
        device = resolve_device(settings.device)
    except DeviceUnavailable as e:
        return _refuse(str(e))

    store = _open_store(settings, "model" in settings.model_fields_set)
    problem = _redis_problem(settings)
    if problem:
        return _refuse(problem)

    from workers.background_redis import BackgroundMismatch
    from workers.runtime import WorkerRuntime, set_worker_runtime

    runtime = WorkerRuntime(settings, store, device=device)
    try:
        runtime.load()
    except (BackgroundMismatch, FileNotFoundError) as e:
        return _refuse(str(e))
    set_worker_runtime(runtime)
    _consume(settings, runtime, store, device)
    return 0


def _refuse(problem: str) -> int:
    print(f"memfit worker: {problem}", file=sys.stderr)
    return 2


def _settings_problem(settings, args) -> str | None:
    """Why this worker cannot start with these settings (checked before anything loads), or None."""
    if not settings.redis_url:
        return (
            "MEMFIT_REDIS_URL is not set. The worker runs the distributed mode's updates "
            "from a Redis queue, e.g.\n  MEMFIT_REDIS_URL=redis://127.0.0.1:6379/0 memfit worker --store DIR\n"
            "(embedded mode needs no worker: `memfit serve` runs updates in-process)."
        )
    if getattr(args, "concurrency", 1) not in (None, 1):
        return (
            "--concurrency must be 1 (solo pool, one model per process); "
            "start more worker processes for more throughput"
        )
    try:
        from workers.celery_app import celery_config

        celery_config(settings)  # validates the time limits before anything loads
    except ValueError as e:
        return str(e)
    return None


def _redis_problem(settings) -> str | None:
    import redis

    try:
        redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3).ping()
    except redis.RedisError as e:
        from memfit.config import redacted

        return f"Redis at {redacted(settings.redis_url)} is unreachable ({e})"
    return None


def _consume(settings, runtime, store, device) -> None:
    """Serve this worker's metrics and consume the queue with the solo pool until the worker stops."""
    from service.worker_metrics import instrument, start_server
    from workers.celery_app import get_app

    instrument(runtime.pipeline, runtime.store)  # job metrics on this worker's own /metrics
    start_server(settings)  # MEMFIT_WORKER_METRICS_PORT (docs/observability.md)
    print(
        f"memfit worker pid {os.getpid()}: store {store.root} at version {store.active()} on {device}, "
        f"queue {settings.celery_queue} on {settings.redis_url}",
        flush=True,
    )
    app = get_app(settings)
    argv = [
        "worker",
        "--pool=solo",
        "--concurrency=1",
        f"--queues={settings.celery_queue}",
        f"--hostname=memfit-{os.getpid()}@{socket.gethostname()}",
        f"--loglevel={settings.log_level.upper()}",
        "--without-gossip",
        "--without-mingle",
    ]
    try:
        app.worker_main(argv)
    finally:
        runtime.close()
