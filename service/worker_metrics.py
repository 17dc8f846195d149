"""Metrics of a Celery worker process, on its own small HTTP endpoint.

Celery workers are separate processes, often on other machines (GPU hosts), so they cannot share the
API's registry or a prometheus multiprocess directory. Each worker process therefore serves its own
`/metrics` on `MEMFIT_WORKER_METRICS_PORT` (default 9101, 0 = off) with the same metric names as the
API (service.metrics.Metrics); Prometheus scrapes the job `memfit-worker` (deploy/prometheus).
Workers run `--pool=solo` (one process, one job at a time), so one endpoint per worker is exact.

`memfit worker` calls `start_server(settings)` and `instrument(runtime.pipeline, store)` once per process:
from then on every job the pipeline finishes here is recorded (`observe_job`, a hook of the pipeline's
`finished_hooks`).

It lives in service/, beside the Metrics it serves, not in workers/: the pipeline knows nothing of
Prometheus, and `memfit worker` (the command line, above both) wires the two together.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from memfit.config import Settings

log = logging.getLogger("memfit.worker.metrics")

_lock = threading.Lock()
_metrics: Any = None
_server: Any = None


def metrics() -> Any:
    """This process's Metrics (created on first use)."""
    global _metrics
    with _lock:
        if _metrics is None:
            from service.metrics import Metrics

            _metrics = Metrics()
        return _metrics


def start_server(
    settings: Settings | None = None, port: int | None = None, addr: str = "0.0.0.0"
) -> int | None:
    """Serve this process's metrics over HTTP (idempotent). Returns the port, or None when disabled."""
    global _server
    if port is None:
        if settings is None:
            from memfit.config import get_settings

            settings = get_settings()
        port = settings.worker_metrics_port
        if port == 0:
            return None  # disabled (an explicit port=0 picks a free port instead)
    m = metrics()
    with _lock:
        if _server is not None:
            return _server[0].server_port
        from prometheus_client import start_http_server

        try:
            server, thread = start_http_server(port, addr=addr, registry=m.registry)
        except OSError as e:
            log.error("worker metrics: cannot listen on %s:%s (%s); metrics are not exported", addr, port, e)
            return None
        _server = (server, thread)
        log.info("worker metrics on http://%s:%d/metrics", addr, server.server_port)
        return server.server_port


def stop_server() -> None:
    global _server
    with _lock:
        if _server is not None:
            _server[0].shutdown()
            _server[0].server_close()
            _server = None


def observe_job(result: Any, store: Any = None) -> None:
    """Record a finished job (workers.pipeline.JobResult): final state, phase durations, published /
    rejected versions and slots changed."""
    from service.observability import record_job

    record_job(metrics(), result, store, durations=True)


def instrument(pipeline: Any, store: Any) -> None:
    """Record every job `pipeline.run_job` finishes in this process, through the pipeline's
    `finished_hooks` (a call that finds the job already finished, e.g. a redelivered task, calls no
    hook and records nothing). Idempotent."""
    if any(getattr(h, "_memfit_worker_metrics", False) for h in pipeline.finished_hooks):
        return

    def record(result: Any) -> None:
        observe_job(result, store)

    record._memfit_worker_metrics = True  # type: ignore[attr-defined]
    pipeline.finished_hooks.append(record)
