"""Celery tasks of the distributed mode: thin, named, JSON arguments (a job id and the
ingest's request id, also sent as the `memfit_request_id` header, for the logs), idempotent.

Integration points: `register(app)` (called by workers.celery_app.create_app) defines the tasks on an
app; the API sends them by name (`memfit.update`, see workers.distributed.TASK_NAME) with
`send_task`, so an API process never imports the pipeline or torch.

The body is one call: `workers.runtime.worker_runtime(settings).handle(job_id)`, which runs the update
pipeline (workers.pipeline) for the job, or merges it with other queued jobs into one batched
update, and does nothing for a job that is already finished or published. A redelivered task
(acks_late: the worker died before acknowledging) is therefore harmless: it never publishes twice.
This module imports neither torch nor the pipeline at import time.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

log = logging.getLogger("memfit.worker")

UPDATE_TASK = "memfit.update"


def register(app: Celery) -> None:
    from memfit.config import soft_limit_s

    settings = app.conf.memfit_settings
    hard = int(settings.task_time_limit_s)

    @app.task(
        name=UPDATE_TASK,
        queue=settings.celery_queue,
        acks_late=True,
        reject_on_worker_lost=True,
        time_limit=hard,
        soft_time_limit=soft_limit_s(hard),
        ignore_result=True,
        typing=True,
        shared=False,  # one app per Settings (tests build several): keep each task on its own app
    )
    def update(job_id: str, request_id: str | None = None) -> dict[str, Any]:
        """Run or finish the update job `job_id` (see workers.runtime.WorkerRuntime.handle)."""
        from memfit.logs import log_context
        from workers.runtime import worker_runtime

        runtime = worker_runtime(settings)
        rid = request_id or task_request_id(update.request) or _recorded_request_id(runtime, job_id)
        with log_context(job_id=str(job_id), request_id=rid):  # the ingest's X-Request-ID (memfit/logs.py)
            out = runtime.handle(str(job_id))
            log.info("update task %s: %s", job_id, out.get("outcome"), extra={"version": out.get("version")})
            return out


def task_request_id(request: Any) -> str | None:
    """The `memfit_request_id` header of a task message (Celery puts custom headers on the request)."""
    rid = getattr(request, "memfit_request_id", None)
    if rid is None:
        rid = (getattr(request, "headers", None) or {}).get("memfit_request_id")
    return str(rid) if rid else None


def _recorded_request_id(runtime: Any, job_id: str) -> str | None:
    """The request id recorded in the job (a task re-sent by the sweep carries none)."""
    try:
        job = runtime.store.jobs.get(str(job_id))
    except Exception:
        return None
    return getattr(job, "request_id", None) if job is not None else None
