"""Celery tasks of the distributed mode: thin, named, JSON arguments (a job id), idempotent.

Integration points: `register(app)` (called by workers.celery_app.create_app) defines the tasks on an
app; the API sends them by name (`memfit.update`, see workers.distributed.TASK_NAME) with
`send_task`, so an API process never imports the pipeline or torch.

The body is one call: `workers.distributed.worker_runtime().handle(job_id)`, which runs the update
pipeline (workers.pipeline) for the job, or merges it with other queued jobs into one batched
update, and does nothing for a job that is already finished or published. A redelivered task
(acks_late: the worker died before acknowledging) is therefore harmless: it never publishes twice.
This module imports neither torch nor the pipeline at import time.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

UPDATE_TASK = "memfit.update"


def register(app: Celery) -> None:
    from workers.celery_app import soft_limit_s

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
    def update(job_id: str) -> dict[str, Any]:
        """Run or finish the update job `job_id` (see workers.distributed.WorkerRuntime.handle)."""
        from workers.distributed import worker_runtime

        return worker_runtime().handle(str(job_id))
