"""How the API hands jobs to whoever runs them: the `Dispatcher` protocol, and choosing its
implementation for the mode (the service calls `create_dispatcher` and uses the protocol only).

- embedded (no MEMFIT_REDIS_URL): `workers.runner.UpdateRunner`, a thread of the API process that
  takes jobs from the store's log. Its cancel flags a job it has picked (in memory and in the log);
  the pipeline stops at the next step boundary.
- distributed: `workers.distributed.CeleryDispatcher` sends Celery tasks to the workers. Its cancel is
  one compare-and-set in the shared log (JobLog.request_cancel); the worker running the job reads the
  flag at its next step boundary.
- `LogDispatcher`: no runner in this process (`create_app(start_runner=False)`): jobs wait in the log
  for one; cancel and retry act on the log.

`writer_lock(settings)` is the store's writer lock for the mode, given to `Store(root, lock=...)` when
the store is opened (never assigned afterwards): None (the store's file lock) embedded, the Redis lock
every distributed writer shares otherwise.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from model_store import Job, Store, WriterLock

if TYPE_CHECKING:
    from memfit.config import Settings

    from .pipeline import JobResult


class Dispatcher(Protocol):
    """What the API's routes call; `last_error` is reported by /readyz."""

    last_error: str | None

    def notify(self, job_id: str | None = None) -> str | None:
        """The job is in the log: run it ("sent", "pending" when the queue is unreachable, None)."""
        ...

    def cancel(self, job_id: str) -> Job:
        """queued -> cancelled; running -> flagged, stops at a step boundary (InvalidTransition when
        finished, KeyError when unknown)."""
        ...

    def retry(self, job_id: str) -> Job:
        """failed | cancelled -> queued, and run it."""
        ...

    def stop(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


class LogDispatcher:
    """No runner in this process: jobs wait in the log for one (cancel/retry act on the log)."""

    last_error: str | None = None

    def __init__(self, store: Store) -> None:
        self.store = store

    def notify(self, job_id: str | None = None) -> str | None:
        return None

    def cancel(self, job_id: str) -> Job:
        # as the other dispatchers: a running job (another process runs it) is flagged, never
        # recorded cancelled under the worker's feet
        return self.store.jobs.request_cancel(job_id)

    def retry(self, job_id: str) -> Job:
        return self.store.jobs.retry(job_id)

    def stop(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {"mode": "log-only"}


def writer_lock(settings: Settings) -> Callable[[str], WriterLock] | None:
    """The API's store writer lock for the mode (a function of the store's base id), or None."""
    if not settings.redis_url:
        return None
    from .runtime import writer_lock as redis_writer_lock

    return redis_writer_lock(settings.redis_url, settings)


def create_dispatcher(
    store: Store,
    settings: Settings,
    *,
    engine: Any,
    metrics: Any = None,
    device: str = "cpu",
    on_published: Callable[[JobResult, Job], None] | None = None,
    on_finished: Callable[[JobResult, Job], None] | None = None,
) -> Dispatcher:
    """The dispatcher of the mode, started. Distributed (MEMFIT_REDIS_URL): a CeleryDispatcher, which
    follows the version events with `engine` and needs the store opened with `writer_lock(settings)`
    (ImportError when the distributed mode's packages are missing). Embedded: an UpdateRunner on a
    Pipeline on `device`, calling `on_published` (the job went live) and `on_finished` per job."""
    if settings.redis_url:
        distributed = importlib.import_module("workers.distributed")
        return distributed.CeleryDispatcher(store, settings, engine=engine, metrics=metrics)
    from .pipeline import Pipeline
    from .runner import UpdateRunner

    pipeline = Pipeline(store, settings, device=device)
    runner = UpdateRunner(
        store, settings, pipeline=pipeline, on_published=on_published, on_finished=on_finished
    )
    runner.start()
    return runner
