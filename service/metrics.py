"""Prometheus metrics of one app instance (a per-app CollectorRegistry, so tests can build several apps).

Naming (docs/design.md item 8): `memfit_` prefix, base units (`_seconds`), `_total` on counters, explicit
buckets, and no high-cardinality labels: the `endpoint` label is the route template
(`/jobs/{job_id}`), never the raw path, and nothing is labelled by prompt, job, document or key.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.observability import KnowledgeCollector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
JOB_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
SWAP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
TOKEN_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
disable_created_metrics()  # no *_created series: they double the scrape for no dashboard use

SLOT_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 25_000, 100_000, 1_000_000)
JOB_STATES = ("queued", "running", "succeeded", "rejected", "failed", "cancelled")
FINISH_REASONS = ("stop", "length", "cancelled", "deadline", "error")


class _JobStateCollector(Collector):
    """`memfit_jobs{state}` read from the job log at scrape time (the log is the record of truth)."""

    def __init__(self) -> None:
        self.source: Any = None  # a callable returning {state: count}

    def collect(self):
        g = GaugeMetricFamily("memfit_jobs", "Jobs in the store's job log by state", labels=["state"])
        counts: dict[str, int] = {}
        if self.source is not None:
            try:
                counts = dict(self.source())
            except Exception:  # a scrape must never fail because the store is busy
                counts = {}
        for state in JOB_STATES:
            g.add_metric([state], float(counts.get(state, 0)))
        yield g


class _Spec(NamedTuple):
    kind: type[Counter] | type[Gauge] | type[Histogram]
    name: str
    doc: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None


# Metrics attribute -> the metric, in the order they are registered (and exposed)
METRICS: dict[str, _Spec] = {
    # HTTP (MetricsMiddleware)
    "requests": _Spec(Counter, "memfit_http_requests_total", "HTTP requests by route template, method and status code", ("endpoint", "method", "status")),
    "request_duration": _Spec(Histogram, "memfit_http_request_duration_seconds", "Time from request start to the end of the response body (streams included)", ("endpoint", "method"), LATENCY_BUCKETS),
    "in_flight": _Spec(Gauge, "memfit_http_requests_in_flight", "HTTP requests being served"),
    # generation
    "ttft": _Spec(Histogram, "memfit_time_to_first_token_seconds", "Generation: admission to the first generated token", (), LATENCY_BUCKETS),
    "e2e": _Spec(Histogram, "memfit_e2e_request_latency_seconds", "Generation: admission to the last generated token", (), LATENCY_BUCKETS),
    "per_token": _Spec(Histogram, "memfit_time_per_output_token_seconds", "Generation: seconds per decoded token after the first", (), TOKEN_LATENCY_BUCKETS),
    "prompt_tokens": _Spec(Counter, "memfit_prompt_tokens_total", "Prompt tokens processed"),
    "generation_tokens": _Spec(Counter, "memfit_generation_tokens_total", "Tokens generated"),
    "generation_length": _Spec(Histogram, "memfit_request_generation_tokens", "Tokens generated per request", (), TOKEN_COUNT_BUCKETS),
    "batch_size": _Spec(Histogram, "memfit_generation_batch_size", "Requests decoded together in one wave of forward passes (dynamic batching)", (), (1, 2, 4, 8, 16, 32, 64)),
    "generation_errors": _Spec(Counter, "memfit_generation_failures_total", "Generation requests that ended in an error"),
    # versions and swaps
    "active_version": _Spec(Gauge, "memfit_active_version", "Version served to new requests"),
    "swaps": _Spec(Counter, "memfit_swaps_total", "Hot swaps of the live value tables"),
    "swap_duration": _Spec(Histogram, "memfit_swap_duration_seconds", "Time to switch the live value tables to another version", (), SWAP_BUCKETS),
    "swap_rows": _Spec(Counter, "memfit_swap_rows_total", "Value rows written by hot swaps"),
    # ingest and jobs
    "ingested_documents": _Spec(Counter, "memfit_ingested_documents_total", "Documents accepted by /ingest"),
    "job_duration": _Spec(Histogram, "memfit_job_duration_seconds", "Update jobs: seconds per phase (queued, training, evaluation, publish, total)", ("phase",), JOB_BUCKETS),
    "jobs_finished": _Spec(Counter, "memfit_jobs_finished_total", "Update jobs that ended, by final state", ("state",)),
    "ingest_to_live": _Spec(Histogram, "memfit_ingest_to_live_seconds", "From the job's creation to the new version being served by this replica", (), JOB_BUCKETS),
    # serving: queueing and per-token latency (engine), readers paused by swaps
    "queue_time": _Spec(Histogram, "memfit_request_queue_time_seconds", "Generation: admission to the first decoding step (waiting for a generation thread)", (), LATENCY_BUCKETS),
    "inter_token": _Spec(Histogram, "memfit_inter_token_latency_seconds", "Generation: gap between two consecutive generated tokens", (), TOKEN_LATENCY_BUCKETS),
    # vLLM's num_requests_running / num_requests_waiting: rows in a decoding batch now, and
    # admitted requests still waiting for one (the engine sets the waiting gauge's function)
    "generation_running": _Spec(Gauge, "memfit_generation_requests_running", "Generation requests being decoded now"),
    "generation_waiting": _Spec(Gauge, "memfit_generation_requests_waiting", "Generation requests admitted and waiting for a decoding slot (MEMFIT_MAX_WAITING bounds it)"),
    "generation_finished": _Spec(
        Counter,
        "memfit_generation_finished_total",
        "Generation requests that ended, by finish reason: stop (EOS or a stop sequence), length "
        "(max tokens or the context), cancelled (client gone), deadline (MEMFIT_REQUEST_TIMEOUT_S), error",
        ("finish_reason",),
    ),
    "swap_pause": _Spec(Histogram, "memfit_swap_pause_seconds", "Time readers were blocked by a hot swap (the row copy under the write lock)", (), SWAP_BUCKETS),
    # updates: recorded by service.observability.record_job where the job ran (API or worker)
    "versions_published": _Spec(Counter, "memfit_versions_published_total", "Update versions published and activated"),
    "updates_rejected": _Spec(Counter, "memfit_updates_rejected_total", "Updates rejected by the evaluation gate, by reason (forgetting_parent, forgetting_base, perplexity)", ("reason",)),
    "slots_changed": _Spec(Counter, "memfit_slots_changed_total", "Memory slots written by published updates"),
    "update_slots": _Spec(Histogram, "memfit_update_slots_changed", "Memory slots changed per published update", (), SLOT_BUCKETS),
}  # fmt: skip


def _metric(spec: _Spec, registry: CollectorRegistry) -> Counter | Gauge | Histogram:
    if spec.kind is Histogram:
        buckets = spec.buckets or Histogram.DEFAULT_BUCKETS
        return Histogram(spec.name, spec.doc, spec.labels, registry=registry, buckets=buckets)
    return spec.kind(spec.name, spec.doc, spec.labels, registry=registry)


class Metrics:
    # one attribute per METRICS entry
    requests: Counter
    request_duration: Histogram
    in_flight: Gauge
    ttft: Histogram
    e2e: Histogram
    per_token: Histogram
    prompt_tokens: Counter
    generation_tokens: Counter
    generation_length: Histogram
    batch_size: Histogram
    generation_errors: Counter
    active_version: Gauge
    swaps: Counter
    swap_duration: Histogram
    swap_rows: Counter
    ingested_documents: Counter
    job_duration: Histogram
    jobs_finished: Counter
    ingest_to_live: Histogram
    queue_time: Histogram
    inter_token: Histogram
    generation_running: Gauge
    generation_waiting: Gauge
    generation_finished: Counter
    swap_pause: Histogram
    versions_published: Counter
    updates_rejected: Counter
    slots_changed: Counter
    update_slots: Histogram

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        for attr, spec in METRICS.items():
            setattr(self, attr, _metric(spec, r))
        for reason in FINISH_REASONS:
            self.generation_finished.labels(reason)
        # knowledge and memory capacity, read from the store at scrape time (set_knowledge_source)
        self.knowledge = KnowledgeCollector(lambda: None)
        r.register(self.knowledge)
        self._jobs = _JobStateCollector()
        r.register(self._jobs)
        self.start_time = Gauge("memfit_process_start_time_seconds", "Unix time the app started", registry=r)
        self.start_time.set(time.time())
        # prometheus_client's standard collectors (what its default registry carries): process_* (CPU
        # seconds, resident and virtual memory, open fds, start time; Linux /proc), python_info and
        # python_gc_*; standard names, so the usual node/process dashboards work unchanged
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

    def set_job_source(self, source: Any) -> None:
        self._jobs.source = source

    def set_knowledge_source(self, store: Any, settings: Any = None, live_version: Any = None) -> None:
        """Export the knowledge, capacity, versions, queue and gate gauges of `store`; `live_version()`
        is the version this replica serves (default: the store's ACTIVE)."""
        self.knowledge.store_fn = lambda: store
        self.knowledge.settings = settings
        self.knowledge.live_version_fn = live_version

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware counting requests by route template, method and status, with latency.

    Pure ASGI (not BaseHTTPMiddleware) so streaming responses pass untouched; the duration runs to the
    last body chunk.
    """

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        m = self.metrics
        status = 500
        t0 = time.perf_counter()

        async def send_wrapper(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        m.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            m.in_flight.dec()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "GET")
            m.requests.labels(endpoint, method, str(status)).inc()
            m.request_duration.labels(endpoint, method).observe(time.perf_counter() - t0)
