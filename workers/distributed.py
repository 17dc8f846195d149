"""Distributed mode (MEMFIT_REDIS_URL set): Celery workers run the update pipeline, API replicas enqueue.

Integration points (what other modules call):
- API side, `service/app.py` -> `create_dispatcher(store=, engine=, settings=, metrics=)` returns a
  `CeleryDispatcher` with the dispatcher interface of the app (`notify(job_id)`, `cancel(job_id) -> Job`,
  `retry(job_id) -> Job`, `stop()`), plus `status()`. It also
    * switches the store's writer lock to model_store's RedisWriterLock (the one `Store.open(root,
      redis_url)` uses), so rollbacks on any replica and publishes on any worker exclude each other;
    * starts a `workers.events.VersionSubscriber` that calls `engine.follow_active()` on each version
      event and after every (re)connect (the app's own poll of ACTIVE stays on as the fallback);
    * adds an engine swap listener that broadcasts a version event when this replica switched for a
      reason other than an event (an API rollback/activate/revert here, or a CLI change it polled);
    * runs a re-enqueue sweep (below).
- Worker side, `workers/tasks.py` -> `worker_runtime().handle(job_id)`; `memfit worker` builds the
  runtime with `set_worker_runtime(WorkerRuntime(settings, store))` before starting Celery.

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
- A worker claims a job with `memfit:job:{id}:claim` (`SET NX PX`, extended by a heartbeat thread
  while it runs, so a dead worker's claims lapse within `claim_ttl_s`).

Batching: when the delivered job's claim succeeds, the worker also claims up to
`settings.max_batch_jobs - 1` other queued jobs (oldest first, same update settings, no document id in
common). With more than one, it records a batch job in the log (`report.batch_of` = the member ids;
its documents are the members' documents, re-recorded under the batch job's id), marks each member
`running` with `report.batch` = the batch id, runs the pipeline once on the batch job and copies the
result (status, version, parent, evaluation, timings, error) to every member. The version's manifest
names the batch job (`job_id`) and lists every member document. A cancel of a running batch takes
effect when every member asked for it.

Idempotency: a delivered task for a finished job does nothing; for a batch member it finishes or
re-runs its batch; the pipeline itself finishes (never re-publishes) a job whose id already has a
version in the store (`workers.pipeline.find_version_of_job`), checked under the writer lock.

Every job a worker finishes gets `timings.worker_pid` and `timings.worker_host` (written right after
the pipeline's final update): the update ran in that process. Celery's hard/soft time limits are not
enforced by the solo pool, so the runtime fails a job at a step boundary after
`settings.task_time_limit_s - min(60, limit / 4)` seconds (`workers.celery_app.soft_limit_s`). A job
that keeps killing its worker (every delivery dies with the process) fails on the delivery after
`settings.max_attempts` starts (workers.pipeline) instead of coming back forever.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from model_store import InvalidTransition, Job, Store
from workers.tasks import UPDATE_TASK

if TYPE_CHECKING:
    from memfit.config import Settings

log = logging.getLogger("memfit.distributed")

TASK_NAME = UPDATE_TASK  # the one task (workers.tasks)
KEY_PREFIX = "memfit:job"


def claim_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:{job_id}:claim"


def marker_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:{job_id}:enqueued"


def redis_timeouts(settings: Settings) -> dict[str, float]:
    """Connect and reply timeouts of every Redis client (Settings.redis_*_timeout_s): a Redis that
    accepts connections but never answers raises redis' TimeoutError instead of hanging a route."""
    return {
        "socket_connect_timeout": float(settings.redis_connect_timeout_s),
        "socket_timeout": float(settings.redis_socket_timeout_s),
    }


def redis_client(url: str, settings: Settings):
    import redis

    return redis.Redis.from_url(url, **redis_timeouts(settings))


def store_lock(store: Store, redis_url: str, settings: Settings, retry_unavailable_s: float = 0.0):
    """The writer lock every distributed writer uses (same name as `Store.open(root, redis_url)`).
    Workers pass `retry_unavailable_s` (Settings.redis_retry_s): a Redis blip at publish is waited
    out instead of failing the job; API routes fail at once (503 redis_unavailable)."""
    from model_store import RedisWriterLock

    return RedisWriterLock(
        redis_client(redis_url, settings),
        name=f"memfit:store:{store.base_id[:16]}:writer",
        retry_unavailable_s=retry_unavailable_s,
    )


# ==== worker side ================================================================================


class Claims:
    """Leases on job ids in Redis, extended by a heartbeat thread while held."""

    _EXTEND = """
    if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
    return 0
    """
    _RELEASE = """
    if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
    return 0
    """

    def __init__(self, client: Any, ttl_s: float = 60.0) -> None:
        self.r = client
        self.ttl_ms = int(ttl_s * 1000)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.held: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="memfit-claims", daemon=True)
        self._thread.start()

    def take(self, job_id: str) -> bool:
        ok = bool(self.r.set(claim_key(job_id), self.token, nx=True, px=self.ttl_ms))
        if ok:
            with self._lock:
                self.held.add(job_id)
        return ok

    def release(self, job_id: str) -> None:
        with self._lock:
            self.held.discard(job_id)
        try:
            self.r.eval(self._RELEASE, 1, claim_key(job_id), self.token)
        except Exception as e:  # the lease lapses by itself
            log.warning("releasing claim of %s failed: %s", job_id, e)

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            with self._lock:
                ids = list(self.held)
            for job_id in ids:
                try:
                    self.r.eval(self._EXTEND, 1, claim_key(job_id), self.token, self.ttl_ms)
                except Exception as e:
                    log.warning("extending claim of %s failed: %s", job_id, e)

    def close(self) -> None:
        self._stop.set()


class WorkerRuntime:
    """One per worker process: the store (Redis writer lock), the warm pipeline, claims, events."""

    def __init__(
        self, settings: Settings, store: Store | None = None, pipeline: Any = None, device: str | None = None
    ):
        if not settings.redis_url:
            raise ValueError("the distributed worker needs MEMFIT_REDIS_URL")
        self.settings = settings
        self.url: str = settings.redis_url
        self.store = store if store is not None else Store.open(settings.store, settings.redis_url)
        self.store.lock = store_lock(
            self.store,
            self.url,
            settings,
            retry_unavailable_s=float(settings.redis_retry_s),
        )
        self._announce_on_publish()
        self.device = device
        self._pipeline = pipeline
        self.r = redis_client(self.url, settings)
        self.claims = Claims(self.r, ttl_s=settings.claim_ttl_s)
        self.pid = os.getpid()
        self.host = socket.gethostname()
        self._loaded = False

    # -- setup -----------------------------------------------------------------------------------
    @property
    def pipeline(self):
        if self._pipeline is None:
            from memfit.config import resolve_device
            from workers.pipeline import Pipeline

            # `memfit worker` resolved the device; a bare `celery -A workers.celery_app worker` resolves
            # MEMFIT_DEVICE here, in the worker process (never at import time)
            device = self.device or resolve_device(self.settings.device)
            self._pipeline = Pipeline(self.store, self.settings, device=device)
        return self._pipeline

    def load(self) -> None:
        """Background table from Redis (seeded from the store's base when absent), model at ACTIVE."""
        if self._loaded:
            return
        from memlm.background import model_base_id
        from workers import background_redis

        base_id = model_base_id(self.store.base_dir)
        if base_id != self.store.base_id:
            raise RuntimeError(f"store base {self.store.base_id[:12]} != base files {base_id[:12]}")
        stats = background_redis.ensure(self.r, self.store.base_dir)
        p = self.pipeline
        p.load()
        p.background = stats  # the shared table in Redis, not a per-host file
        p.at_version(self.store.active())
        self._loaded = True
        log.info(
            "worker %s:%d ready: store %s at version %d, background of base %s (%d docs)",
            self.host,
            self.pid,
            self.store.root,
            self.store.active(),
            base_id[:12],
            stats.num_docs,
        )

    def close(self) -> None:
        self.claims.close()

    def _announce_on_publish(self) -> None:
        """Send the version event right after the ACTIVE flip, inside `Store.publish`, instead of
        after the pipeline's job-log writes: replicas start swapping a few fsyncs earlier."""
        from workers.events import publish_active

        publish = self.store.publish

        def publish_and_announce(*args: Any, **kw: Any) -> int:
            v = publish(*args, **kw)
            if kw.get("activate", True):
                publish_active(self.r, v, version=v, job_id=kw.get("job_id"))
            return v

        self.store.publish = publish_and_announce  # type: ignore[method-assign]

    # -- one delivered task ----------------------------------------------------------------------
    def _get(self, job_id: str, wait_s: float = 5.0) -> Job | None:
        """The job from the shared log; waits briefly (another host's append may be in flight)."""
        deadline = time.monotonic() + wait_s
        while True:
            job = self.store.jobs.get(job_id)
            if job is not None or time.monotonic() >= deadline:
                return job
            time.sleep(0.2)

    def handle(self, job_id: str) -> dict[str, Any]:
        """Run (or finish) job `job_id`; safe to call any number of times for the same id."""
        self.load()
        job = self._get(job_id)
        if job is None:
            log.error("task for job %s, which is not in the job log of %s", job_id, self.store.root)
            return {"job_id": job_id, "outcome": "unknown_job"}
        if job.terminal:
            self._unmark(job_id)
            return {"job_id": job_id, "outcome": "already_" + job.status}
        report = job.report or {}
        if report.get("batch_of"):
            return self._run_batch(job_id)
        if job.status == "running" and report.get("batch"):
            return self._run_batch(str(report["batch"]))
        if not self.claims.take(job_id):
            self._unmark(job_id)  # its holder runs it; if that holder dies, the sweep resends it
            return {"job_id": job_id, "outcome": "claimed_elsewhere"}
        members: list[Job] = [job]
        try:
            self._unmark(job_id)
            members += self._gather(job)
            if len(members) == 1:
                return self._run_single(job_id)
            return self._start_batch(members)
        finally:
            for m in members:
                self.claims.release(m.job_id)

    def _unmark(self, job_id: str) -> None:
        try:
            self.r.delete(marker_key(job_id))
        except Exception:
            pass

    def _gather(self, leader: Job) -> list[Job]:
        """Other queued jobs to merge with `leader` (claimed here), oldest first."""
        from workers.batching import gather

        def take(j: Job) -> Job | None:
            if not self.claims.take(j.job_id):
                return None
            current = self.store.jobs.get(j.job_id)
            if current is None or current.status != "queued":
                self.claims.release(j.job_id)
                return None
            self._unmark(j.job_id)
            return current

        return gather(self.store, leader, max(1, int(self.settings.max_batch_jobs)) - 1, take)

    def _deadline_cancel(self, extra=None):
        """Past the soft limit the job fails (workers.pipeline.JobTimedOut) at a step boundary, before
        Celery's hard limit would kill the process (the solo pool enforces neither)."""
        from workers.celery_app import soft_limit_s
        from workers.pipeline import time_limited

        hard = int(self.settings.task_time_limit_s)
        soft = soft_limit_s(hard)
        return time_limited(soft, extra, f"MEMFIT_TASK_TIME_LIMIT_S={hard} less a {hard - soft} s margin")

    def _stamp(self, job_id: str, extra: dict[str, Any] | None = None) -> None:
        """Record this worker's pid/host in the finished job's timings."""
        job = self.store.jobs.get(job_id)
        if job is None:
            return
        timings = {**(job.timings or {}), "worker_pid": self.pid, "worker_host": self.host, **(extra or {})}
        self.store.jobs.update(job_id, timings=timings)

    def _announce(self, version: int | None, job_ids: list[str]) -> None:
        from workers.events import publish_active

        publish_active(self.r, self.store.active(), version=version, jobs=job_ids)

    def _run_single(self, job_id: str) -> dict[str, Any]:
        res = self.pipeline.run_job(job_id, should_cancel=self._deadline_cancel())
        self._stamp(job_id)
        if res.status == "succeeded":
            self._announce(res.version, [job_id])
        return {"job_id": job_id, "outcome": res.status, "version": res.version}

    def _start_batch(self, members: list[Job]) -> dict[str, Any]:
        from model_store.joblog import new_job_id
        from workers.batching import create_batch

        batch_id = new_job_id()
        if not self.claims.take(batch_id):  # a fresh random id: only fails when Redis does
            raise RuntimeError(f"cannot claim batch job {batch_id}")
        try:
            planned = create_batch(self.store, members, batch_id)  # drops members cancelled meanwhile
            if planned is None:
                return {"job_id": members[0].job_id, "outcome": "cancelled"}
            if not planned[1]:
                return self._run_single(planned[0])
            return self._run_batch(batch_id, claimed=True)
        finally:
            self.claims.release(batch_id)

    def _run_batch(self, batch_id: str, claimed: bool = False) -> dict[str, Any]:
        from workers.batching import all_cancelled, finish_members

        jobs = self.store.jobs
        batch = jobs.get(batch_id)
        if batch is None:
            return {"job_id": batch_id, "outcome": "unknown_batch"}
        member_ids = [str(x) for x in (batch.report or {}).get("batch_of", [])]
        took = False
        try:
            if not batch.terminal:
                if not claimed:
                    if not self.claims.take(batch_id):
                        return {"job_id": batch_id, "outcome": "claimed_elsewhere"}
                    took = True
                    for mid in member_ids:  # keep the sweep off the members while this runs
                        self.claims.take(mid)

                def cancelled() -> bool:
                    return all_cancelled(self.store, member_ids)

                self.pipeline.run_job(batch_id, should_cancel=self._deadline_cancel(cancelled))
                self._stamp(batch_id, {"batch_size": len(member_ids)})
            batch = jobs.get(batch_id)
            assert batch is not None
            finished = len(finish_members(self.store, batch, member_ids))
            if batch.status == "succeeded" and finished:
                self._announce(batch.version, [batch_id, *member_ids])
            return {
                "job_id": batch_id,
                "outcome": batch.status,
                "version": batch.version,
                "members": member_ids,
            }
        finally:
            if took:
                self.claims.release(batch_id)
                for mid in member_ids:
                    self.claims.release(mid)


_runtime: WorkerRuntime | None = None
_runtime_lock = threading.Lock()


def set_worker_runtime(runtime: WorkerRuntime | None) -> None:
    global _runtime
    with _runtime_lock:
        _runtime = runtime


def worker_runtime() -> WorkerRuntime:
    """The process's runtime (built from the environment's Settings when `memfit worker` did not)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            from workers.celery_app import get_app

            _runtime = WorkerRuntime(get_app().conf.memfit_settings)
        return _runtime


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
        store.lock = store_lock(store, self.url, settings)
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
        jobs = self.store.jobs
        job = jobs.get(job_id)
        if job is None:
            raise KeyError(job_id)
        if job.status == "queued":
            try:
                return jobs.cancel(job_id)
            except InvalidTransition:
                job = jobs.get(job_id)
                assert job is not None
        if job.status in ("queued", "running"):
            return jobs.update(job_id, progress={**(job.progress or {}), "cancel_requested": True})
        raise InvalidTransition(f"job {job_id} is {job.status}: only queued or running jobs can be cancelled")

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


def create_dispatcher(store: Store, engine: Any, settings: Settings, metrics: Any = None) -> CeleryDispatcher:
    """What `service.app` calls in distributed mode."""
    return CeleryDispatcher(store, settings, engine=engine, metrics=metrics)
