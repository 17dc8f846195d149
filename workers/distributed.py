"""Distributed mode (MEMFIT_REDIS_URL set): Celery workers run the update pipeline, API replicas enqueue.

The pieces, lowest first: `workers/runtime.py` (the worker side: `WorkerRuntime`, claims, the Redis
clients and writer lock), `workers/tasks.py` (the one task, which calls the runtime),
`workers/celery_app.py` (the app; it registers the task) and this module (the API side, which sends
the task by name through the app).

Integration points (what other modules call):
- API side, `service/app.py` -> `workers.dispatch.create_dispatcher(...)` returns a `CeleryDispatcher`,
  an implementation of `workers.dispatch.Dispatcher` (`notify(job_id)`, `cancel(job_id) -> Job`,
  `retry(job_id) -> Job`, `stop()`, `status()`). It
    * needs the store opened with the Redis writer lock (`workers.dispatch.writer_lock(settings)`,
      the lock `Store.open(root, redis_url)` names too), so rollbacks on any replica and publishes
      on any worker exclude each other;
    * starts a `workers.events.VersionSubscriber` that calls `engine.follow_active()` on each version
      event and after every (re)connect (the app's own poll of ACTIVE stays on as the fallback);
    * adds an engine swap listener that broadcasts a version event when this replica switched for a
      reason other than an event (an API rollback/activate/revert here, or a CLI change it polled);
    * runs a re-enqueue sweep (below).
- Worker side: workers/runtime.py (claims, batching, idempotency, time limits).

The job log on the shared store is the record of truth; Redis carries work and leases only:
- `notify(job_id)` runs after the API has fsynced the job to the log. It sends the Celery task and
  then sets `memfit:job:{id}:enqueued` (TTL = visibility timeout). When Redis is down (or does not
  answer within `redis_socket_timeout_s`) it returns "pending" and the API still answers 202 with
  `"dispatch": "pending"`: the job is durably queued in the log and the sweep sends it later.
- The sweep (every `sweep_s`, in each replica) re-sends every queued or running job that has neither
  a live claim nor an enqueued marker and has not changed for `sweep_grace_s`: jobs refused while
  Redis was down, jobs whose worker died, everything after a Redis restart without persistence.
  `SET NX` on the marker keeps two replicas from sending the same job twice (a duplicate would be
  harmless anyway: the task is idempotent).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from model_store import Job, Store
from workers.runtime import claim_key, marker_key, redis_client, require_redis_lock
from workers.tasks import UPDATE_TASK

if TYPE_CHECKING:
    from memfit.config import Settings

log = logging.getLogger("memfit.distributed")

TASK_NAME = UPDATE_TASK  # the one task (workers.tasks)


# ==== API side ===================================================================================


class CeleryDispatcher:
    """The API replica's side of the distributed mode (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        engine: Any = None,
        metrics: Any = None,
        sweep_s: float = 5.0,
        sweep_grace_s: float = 5.0,
        subscribe: bool = True,
    ) -> None:
        if not settings.redis_url:
            raise ValueError("CeleryDispatcher needs MEMFIT_REDIS_URL")
        from workers.celery_app import get_app

        self.store = store
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.url: str = settings.redis_url
        self.app = get_app(settings)
        self.queue = settings.celery_queue
        self.r = redis_client(self.url, settings)
        self.sweep_s = sweep_s
        self.sweep_grace_s = sweep_grace_s
        self.marker_ttl_s = int(settings.visibility_timeout_s) + 60
        self.last_error: str | None = None
        self.enqueued = 0
        self._stop = threading.Event()
        self._from_event = threading.local()
        self._seen_jobs: set[str] = set()
        require_redis_lock(store, "workers.dispatch.writer_lock(settings)")  # given at open
        self.subscriber = None
        if engine is not None and subscribe:
            from workers.events import VersionSubscriber

            engine.add_swap_listener(self._on_swap)
            self.subscriber = VersionSubscriber(self.url, self._on_event, current_active=store.active).start()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="memfit-resend", daemon=True)
        self._sweeper.start()

    # -- the app's dispatcher interface ----------------------------------------------------------
    def notify(self, job_id: str | None = None) -> str | None:
        """Send job `job_id` to the workers: "sent", or "pending" when Redis is unreachable (the job
        is in the log already; the sweep sends it once Redis answers). Never raises: the ingest is
        accepted either way, so a client retrying without an Idempotency-Key cannot double it."""
        if job_id is None:
            return None
        try:
            self.send(job_id)
        except Exception as e:
            self.last_error = f"{type(e).__name__}: {e}"
            log.warning("job %s stays queued in the log, dispatch pending: Redis unreachable (%s)", job_id, e)
            return "pending"
        return "sent"

    def send(self, job_id: str) -> None:
        """Publish the task, then mark the job as enqueued (raises when Redis is unreachable)."""
        from memfit.logs import current_request_id

        rid = current_request_id()  # the ingest's X-Request-ID: the worker logs the job under it
        self.app.send_task(
            TASK_NAME,
            args=[job_id],
            kwargs={"request_id": rid} if rid else {},
            headers={"memfit_request_id": rid} if rid else None,
            queue=self.queue,
            retry=False,
            ignore_result=True,
            task_id=None,
        )
        self.r.set(marker_key(job_id), str(time.time()), ex=self.marker_ttl_s)
        self.enqueued += 1
        self.last_error = None

    def cancel(self, job_id: str) -> Job:
        """queued -> cancelled at once; running -> flagged in the log, stops at a step boundary."""
        return self.store.jobs.request_cancel(job_id)  # one compare-and-set under the log's lock

    def retry(self, job_id: str) -> Job:
        job = self.store.jobs.retry(job_id)
        try:
            self.send(job_id)
        except Exception as e:  # the sweep sends it when Redis is back
            self.last_error = f"{type(e).__name__}: {e}"
        return job

    def stop(self) -> None:
        self._stop.set()
        if self.subscriber is not None:
            self.subscriber.stop()
        self._sweeper.join(timeout=2)

    def status(self) -> dict[str, Any]:
        return {
            "mode": "distributed",
            "queue": self.queue,
            "enqueued": self.enqueued,
            "events_connected": bool(self.subscriber and self.subscriber.connected),
            "events_received": self.subscriber.messages if self.subscriber else 0,
            "last_error": self.last_error,
        }

    # -- version events --------------------------------------------------------------------------
    def _on_event(self, version: int) -> None:
        """A version event (or a reconnect): move this replica to the store's ACTIVE."""
        self._from_event.active = True
        try:
            result = self.engine.follow_active()
        finally:
            self._from_event.active = False
        if result is not None:
            self._observe_ingest_to_live()

    def _on_swap(self, result: Any) -> None:
        """Broadcast switches this replica made on its own (API activate/rollback/revert, a polled
        CLI change); switches caused by an event are not echoed."""
        if getattr(self._from_event, "active", False):
            return
        try:
            if result.to_version != self.store.active():
                return  # a pinned or transient switch, not the store's active version
        except Exception:
            return
        from workers.events import publish_active

        publish_active(self.r, result.to_version, previous=result.from_version, reason="replica switch")

    def _observe_ingest_to_live(self) -> None:
        """memfit_ingest_to_live_seconds for the jobs of the version this replica now serves."""
        if self.metrics is None or self.engine is None:
            return
        try:
            m = self.store.manifest(self.engine.version)
            job_id = m.get("job_id")
            if not job_id or job_id in self._seen_jobs:
                return
            self._seen_jobs.add(job_id)
            job = self.store.jobs.get(job_id)
            ids = [str(x) for x in ((job.report or {}).get("batch_of") or [job_id])] if job else []
            now = time.time()
            for jid in ids:
                j = self.store.jobs.get(jid)
                if j is not None and j.created_at:
                    self.metrics.ingest_to_live.observe(max(0.0, now - j.created_at))
        except Exception:
            log.debug("ingest_to_live not recorded", exc_info=True)

    # -- re-enqueue sweep ------------------------------------------------------------------------
    def sweep_once(self) -> list[str]:
        """Send every queued/running job with no claim and no enqueued marker (see module docstring)."""
        sent: list[str] = []
        now = time.time()
        for job in self.store.jobs.queued(include_running=True):
            if now - (job.updated_at or job.created_at) < self.sweep_grace_s:
                continue
            if self.r.exists(claim_key(job.job_id)):
                continue
            if not self.r.set(marker_key(job.job_id), str(now), nx=True, ex=self.marker_ttl_s):
                continue  # sent already (by us or another replica)
            try:
                self.app.send_task(
                    TASK_NAME, args=[job.job_id], queue=self.queue, retry=False, ignore_result=True
                )
            except Exception:
                self.r.delete(marker_key(job.job_id))
                raise
            sent.append(job.job_id)
        if sent:
            log.info("re-enqueued %d jobs from the log: %s", len(sent), ", ".join(sent[:10]))
        return sent

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.sweep_s):
            try:
                self.sweep_once()
                self.last_error = None
            except Exception as e:
                msg = f"{type(e).__name__}: {e}"
                if msg != self.last_error:
                    log.warning("re-enqueue sweep: %s", msg)
                self.last_error = msg
