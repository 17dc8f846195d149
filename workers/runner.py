"""The embedded mode's update runner: one thread in the API process.

It takes jobs from the store's durable job log (oldest first; jobs left `queued` or `running` by a
previous process run after a restart), runs `workers.pipeline.Pipeline.run_job`, and hot-swaps the
live engine to the new active version (`on_published`). The job log is the queue: `notify()` only
wakes the thread early, a poll every `poll_s` catches jobs queued by other processes
(`memfit ingest --store`).

Batching: jobs that pile up while an update runs are merged into one update (workers.batching, at
most `settings.max_batch_jobs` jobs; same update settings, no document in common).

Time limit: a job still running `settings.task_time_limit_s` after it started fails at the next step
boundary (`workers.pipeline.JobTimedOut`), as in the distributed mode. A job left `running` by a
process that died is started again by the next one, at most `settings.max_attempts` times in a row
(then it fails); a runner that is stopped hands its job back to the queue, which resets that count.

The embedded implementation of workers.dispatch.Dispatcher. Cancel: a queued job becomes `cancelled` at once; a running one is flagged (in memory and in the job
log, so a restart does not lose it: a job handed back to the queue keeps the flag and the next
process records it cancelled) and stops at the next step boundary; a batch stops when every
member asked. Retry: failed or cancelled -> queued.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from model_store import Job, Store

from .pipeline import JobResult, Pipeline, time_limited

if TYPE_CHECKING:
    from memfit.config import Settings

log = logging.getLogger("memfit.runner")


class UpdateRunner:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        pipeline: Pipeline | None = None,
        on_published: Callable[[JobResult, Job], None] | None = None,
        on_finished: Callable[[JobResult, Job], None] | None = None,
        poll_s: float = 0.5,
    ) -> None:
        self.store = store
        self.settings = settings
        self.pipeline = pipeline or Pipeline(store, settings)
        self.on_published = on_published
        self.on_finished = on_finished
        self.poll_s = poll_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._cancel: set[str] = set()
        self._cancel_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.current_job: str | None = None
        self.current_phase: str | None = None
        self.last_error: str | None = None
        self.loaded = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="memfit-update-runner", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the current step boundary; an interrupted job stays `running` and is run again
        (from the start) by the next process."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def notify(self, job_id: str | None = None) -> None:
        self._wake.set()

    def status(self) -> dict:
        return {
            "mode": "embedded",
            "alive": self.alive,
            "current_job": self.current_job,
            "current_phase": self.current_phase,
            "last_error": self.last_error,
        }

    # -- control ---------------------------------------------------------------------------------
    def cancel(self, job_id: str) -> Job:
        """queued -> cancelled at once; running -> flagged, cancelled at the next step boundary.

        Raises KeyError for an unknown job and InvalidTransition for a finished one."""
        # one compare-and-set under the job log's lock (JobLog.request_cancel); a job this runner
        # has picked is flagged, not cancelled, even while still queued: the pipeline marks it next
        job = self.store.jobs.request_cancel(job_id, flag_queued=self.current_job == job_id)
        if not job.terminal:
            with self._cancel_lock:
                self._cancel.add(job_id)
        return job

    def retry(self, job_id: str) -> Job:
        job = self.store.jobs.retry(job_id)
        self.notify(job_id)
        return job

    def _should_cancel(self, job_id: str) -> Callable[[], bool]:
        def check() -> bool:
            if self._stop.is_set():
                raise _Stopping
            with self._cancel_lock:
                return job_id in self._cancel

        return check

    # -- the loop --------------------------------------------------------------------------------
    def _next_job(self) -> Job | None:
        for job in self.store.jobs.queued(include_running=True):
            return job
        return None

    def _loop(self) -> None:
        try:
            self.pipeline.load()
            self.loaded.set()
        except Exception as e:
            self.last_error = f"pipeline failed to load: {type(e).__name__}: {e}"
            log.exception("update runner: pipeline failed to load")
            self.loaded.set()
            return
        while not self._stop.is_set():
            try:
                job = self._next_job()
            except Exception as e:
                self.last_error = f"job log unreadable: {e}"
                log.exception("update runner: cannot read the job log")
                self._stop.wait(self.poll_s)
                continue
            if job is None:
                self._wake.wait(self.poll_s)
                self._wake.clear()
                continue
            try:
                planned = self._plan(job)
            except Exception as e:
                self.last_error = f"cannot batch job {job.job_id}: {type(e).__name__}: {e}"
                log.exception("update runner: batching job %s", job.job_id)
                self._stop.wait(self.poll_s)
                continue
            if planned is None:  # every job picked was cancelled meanwhile
                continue
            run_id, members = planned
            self.current_job = run_id
            try:
                result = self._run(run_id, members)
            except _Stopping:
                # handed back to the queue: a deliberate stop is not a start that died with its
                # process (MEMFIT_MAX_ATTEMPTS counts those); the next process runs it from the start
                try:
                    self._hand_back(run_id)
                except Exception:
                    log.exception("update runner: handing job %s back to the queue", run_id)
                log.info("update runner stopping; job %s is queued again and reruns after restart", run_id)
                return
            except Exception as e:  # run_job records failures itself; this is a bug or an IO error
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("update runner: job %s", job.job_id)
                time.sleep(self.poll_s)
                continue
            finally:
                self.current_job = None
                self.current_phase = None
                with self._cancel_lock:
                    self._cancel.discard(run_id)
                    self._cancel.difference_update(members)
            self.last_error = None
            finished = self.store.jobs.get(run_id) or job
            if members:
                from .batching import finish_members

                done = finish_members(self.store, finished, members)
                if done:  # ingest-to-live is measured from the oldest member's ingest
                    finished = min(done, key=lambda j: j.created_at or 0.0)
            if result.status == "succeeded" and self.on_published is not None:
                try:
                    self.on_published(result, finished)
                except Exception:
                    log.exception("update runner: hot swap after job %s failed", job.job_id)
            if self.on_finished is not None:
                try:
                    self.on_finished(result, finished)
                except Exception:
                    log.exception("update runner: on_finished hook failed")

    def _hand_back(self, run_id: str) -> None:
        """Queue the interrupted job again, keeping a cancel another process flagged in the log and
        the pipeline had not read yet (replacing `progress` lost it: the next process ran the job)."""
        jobs = self.store.jobs
        with jobs.transaction():
            current = jobs.get(run_id)
            flagged = current is not None and bool((current.progress or {}).get("cancel_requested"))
            progress = {"phase": "interrupted", **({"cancel_requested": True} if flagged else {})}
            jobs.update(run_id, status="queued", progress=progress)

    def _plan(self, job: Job) -> tuple[str, list[str]] | None:
        """(the job to run, the member ids when it is a batch), None when nothing is left to run. A
        queued job takes other queued jobs along (workers.batching, up to settings.max_batch_jobs;
        those cancelled before the batch is recorded are left out); a batch or batch member left
        running by a previous process resumes its batch."""
        from .batching import create_batch, gather, members_of

        report = job.report or {}
        if report.get("batch_of"):
            return job.job_id, members_of(job)
        if job.status == "running" and report.get("batch"):
            batch = self.store.jobs.get(str(report["batch"]))
            if batch is not None:
                return batch.job_id, members_of(batch)
        limit = max(1, self.settings.max_batch_jobs) - 1
        extra = gather(self.store, job, limit) if job.status == "queued" else []
        if not extra:
            return job.job_id, []
        return create_batch(self.store, [job, *extra])

    def _run(self, run_id: str, members: list[str]) -> JobResult:
        """Run job `run_id` through the pipeline (a batch stops when every member asked to cancel); a
        batch that already finished (the process died before its members were) is not run again."""
        current = self.store.jobs.get(run_id)
        if current is not None and current.terminal:
            return JobResult(
                run_id, current.status, current.version, current.parent,
                current.evaluation or {}, current.timings or {}, current.error,
            )  # fmt: skip
        own = self._should_cancel(run_id)
        # the same limit as a Celery task's: a job past it fails at a step boundary
        own = time_limited(self.settings.task_time_limit_s, own)
        if members:
            from .batching import all_cancelled

            def cancel() -> bool:
                return own() or all_cancelled(self.store, members)
        else:
            cancel = own
        from memfit.logs import log_context

        # every line logged for this job carries its id and the X-Request-ID of its ingest
        with log_context(job_id=run_id, request_id=getattr(current, "request_id", None)):
            return self.pipeline.run_job(run_id, should_cancel=cancel, on_phase=self._set_phase)

    def _set_phase(self, phase: str) -> None:
        self.current_phase = phase


class _Stopping(BaseException):
    """Raised inside the pipeline when the runner is asked to stop (not recorded as a failure)."""
