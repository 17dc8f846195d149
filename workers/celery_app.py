"""The one Celery app of distributed mode, built from Settings.

Integration points (kept small on purpose):
- `create_app(settings) -> Celery`: a new app (broker and result backend = settings.redis_url).
- `get_app(settings=None) -> Celery`: the process-wide app (built on first use from `get_settings()`
  unless given settings); `workers.tasks` registers its tasks on it.
- `app` (module attribute, lazy): for `celery -A workers.celery_app worker ...`.

Policy (docs/design.md house style item 7):
- `acks_late` + `task_reject_on_worker_lost`: a task is acknowledged only after it ran, so a worker
  killed mid-update gets its task redelivered; the task is idempotent by job id (workers.tasks).
- `worker_prefetch_multiplier=1`: a worker holds at most one unstarted update, so a pile-up of jobs
  stays in Redis where the next free worker merges them into one batched update.
- broker `visibility_timeout` above the hard task time limit (checked here): Redis redelivers an
  unacknowledged message after that long, which must never happen to a task that is still running.
- JSON only (`accept_content=["json"]`): no pickle anywhere; task arguments are job ids.
- never `task_always_eager`; this module imports neither torch nor CUDA (the worker loads the model
  lazily, in the worker process, after fork-free `--pool=solo` start).
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery

from memfit.config import Settings, get_settings, soft_limit_s

APP_NAME = "memfit"

_lock = threading.Lock()
_app: Celery | None = None


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for `settings` (a plain dict, so tests can assert on it)."""
    if not settings.redis_url:
        raise ValueError("distributed mode needs MEMFIT_REDIS_URL (e.g. redis://127.0.0.1:6379/0)")
    hard = int(settings.task_time_limit_s)
    visibility = int(settings.visibility_timeout_s)
    if visibility <= hard:
        raise ValueError(
            f"MEMFIT_VISIBILITY_TIMEOUT_S={visibility} must exceed MEMFIT_TASK_TIME_LIMIT_S={hard}: "
            "Redis would redeliver an update that is still running"
        )
    transport = {
        "visibility_timeout": visibility,
        # a dead or silent Redis fails an enqueue fast (the job stays in the log, dispatch "pending")
        "socket_connect_timeout": float(settings.redis_connect_timeout_s),
        "socket_timeout": float(settings.redis_socket_timeout_s),
        "socket_keepalive": True,
        "health_check_interval": 25,
        # look for unacknowledged messages of dead workers every few seconds (kombu: every 100 s),
        # so a short visibility timeout redelivers soon after it lapses; one ZRANGE per look
        "unacked_restore_interval": max(1, min(10, visibility // 10)),
        "unacked_restore_throttle": 1,
    }
    return {
        "broker_url": settings.redis_url,
        "result_backend": settings.redis_url,
        "broker_transport_options": dict(transport),
        "result_backend_transport_options": dict(transport),
        "redis_socket_connect_timeout": float(settings.redis_connect_timeout_s),
        "redis_socket_timeout": float(settings.redis_socket_timeout_s),
        "broker_connection_retry_on_startup": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_always_eager": False,
        "task_default_queue": settings.celery_queue,
        "task_create_missing_queues": True,
        "task_time_limit": hard,
        "task_soft_time_limit": soft_limit_s(hard),
        "task_track_started": True,
        "result_expires": 24 * 3600,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        # Redis lost mid-update: the (solo-pool) update runs to its end; its unacknowledged message is
        # redelivered later and is then a no-op (the task is idempotent by job id)
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "enable_utc": True,
    }


def create_app(settings: Settings) -> Celery:
    app = Celery(APP_NAME, set_as_current=False)
    app.conf.update(celery_config(settings))
    app.conf.memfit_settings = settings  # read back by workers.tasks (store dir, batching, queue)
    app.conf.task_routes = {"memfit.*": {"queue": settings.celery_queue}}
    # tasks are registered by importing workers.tasks, which decorates on this app
    from workers import tasks as _tasks

    _tasks.register(app)
    return app


def get_app(settings: Settings | None = None) -> Celery:
    """The process-wide app. The first call fixes its settings (later `settings` are ignored)."""
    global _app
    with _lock:
        if _app is None:
            if settings is None:
                settings = get_settings()
            _app = create_app(settings)
        return _app


def reset_app() -> None:
    """Forget the process-wide app (tests that build apps for several Redis servers)."""
    global _app
    with _lock:
        _app = None


def __getattr__(name: str) -> Any:  # PEP 562: `celery -A workers.celery_app` finds `app` lazily
    if name == "app":
        return get_app()
    raise AttributeError(name)
