"""Distributed mode, the worker side: one `WorkerRuntime` per Celery worker process, and the Redis
clients, lock and key names the worker and the API side (workers.distributed) share.

`workers/tasks.py` -> `worker_runtime(settings).handle(job_id)`; `memfit worker` builds the runtime with
`set_worker_runtime(WorkerRuntime(settings, store))` before starting Celery (the store opened with
`lock=worker_lock(settings)`). The job log on the shared store is the record of truth; Redis carries
work and leases only (workers.distributed for the API's side: sending, the re-enqueue sweep, version
events):

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
`settings.task_time_limit_s - min(60, limit / 4)` seconds (`memfit.config.soft_limit_s`). A job
that keeps killing its worker (every delivery dies with the process) fails on the delivery after
`settings.max_attempts` starts (workers.pipeline) instead of coming back forever.

Nothing here imports Celery: the runtime is what a task calls, not how it is delivered.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from model_store import Job, Store

if TYPE_CHECKING:
    from memfit.config import Settings

log = logging.getLogger("memfit.distributed")

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


def writer_lock(redis_url: str, settings: Settings, retry_unavailable_s: float = 0.0):
    """The writer lock every distributed writer uses, as the function of the store's base id that
    `Store(root, lock=...)` / `Store.open(root, lock=...)` take (the name is the one `Store.open(root,
    redis_url)` uses). Workers pass `retry_unavailable_s` (Settings.redis_retry_s): a Redis blip at
    publish is waited out instead of failing the job; API routes fail at once (503 redis_unavailable)."""
    from model_store import RedisWriterLock
    from model_store.locks import redis_lock_name

    def make(base_id: str) -> RedisWriterLock:
        return RedisWriterLock(
            redis_client(redis_url, settings),
            name=redis_lock_name(base_id),
            retry_unavailable_s=retry_unavailable_s,
        )

    return make


def worker_lock(settings: Settings):
    """The writer lock of a worker's store (`writer_lock` with Settings.redis_retry_s): what `memfit
    worker` opens the store with."""
    if not settings.redis_url:
        raise ValueError("the distributed worker needs MEMFIT_REDIS_URL")
    return writer_lock(settings.redis_url, settings, retry_unavailable_s=float(settings.redis_retry_s))


def require_redis_lock(store: Store, how: str) -> None:
    """Raise ValueError unless `store` was opened with a Redis writer lock (a file lock would let
    writers on other machines publish at the same time)."""
    from model_store import RedisWriterLock

    if not isinstance(store.lock, RedisWriterLock):
        raise ValueError(
            f"store {store.root} has a {type(store.lock).__name__}; distributed mode needs the Redis "
            f"writer lock: open it with Store.open(root, lock={how})"
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
        # the store's writer lock is the Redis one every distributed writer shares, given when the
        # store is opened (worker_lock: retrying through a Redis blip at publish)
        self.store = store if store is not None else Store.open(settings.store, lock=worker_lock(settings))
        require_redis_lock(self.store, "worker_lock(settings)")
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
        """Send the version event as `Store.publish` returns (a publish hook), instead of after the
        pipeline's job-log writes: replicas start swapping a few fsyncs earlier."""
        from workers.events import publish_active

        def announce(version: int, activated: bool, job_id: str | None) -> None:
            if activated:
                publish_active(self.r, version, version=version, job_id=job_id)

        self.store.publish_hooks.append(announce)

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
        from memfit.config import soft_limit_s
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


def worker_runtime(settings: Settings) -> WorkerRuntime:
    """The process's runtime: the one `memfit worker` set, else one built (once) from `settings`, the
    Settings of the app the task runs on (a bare `celery -A workers.celery_app worker`)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = WorkerRuntime(settings)
        return _runtime
