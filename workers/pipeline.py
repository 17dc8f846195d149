"""The update pipeline: plain, idempotent functions keyed by job id.

One code path for both modes: the embedded runner (workers/runner.py) and the Celery tasks of the
distributed mode call `Pipeline.run_job(job_id)`. A job runs

    load the active version   a private training copy of the model (kept warm between jobs), moved
                              to the active version by writing only the rows that differ
    train                     memlm.updater.learn_documents (sparse memory finetuning) -> SlotDelta
    evaluate                  memlm.evaluation on the update's facts, the probe facts the base
                              answers and the held-out text that ship in the base's probe.json,
                              within the budget from Settings; the gate compares with the parent and
                              the base
    publish                   model_store compare-and-set on the active version; when the active
                              moved meanwhile: rebase exactly when the slot sets are disjoint, else
                              retrain from the new active version. Gate failures are published with
                              state "rejected" (kept for audit, never activated)

and records the phase timings (queued, training, evaluation, publish, total) in the job.

Idempotence: a job whose id already has a published version (a redelivered task, or a crash between
publishing and recording the result) is finished from that version, never published twice; the check
and the publish run under the store's writer lock. A job found `running` (its process died) starts
again from the active version: training is deterministic in its inputs and nothing was published.

Cancellation happens at step boundaries: between optimizer steps, before evaluation, before publish.
A cancel is recorded under the store's writer lock and only when no delivery of the job has
published (else the published version is recorded, as for a redelivery): a `cancelled` job never
has a live version. Marking the job running and every progress write read the cancel flag and
write under the job log's lock, so a flag another process writes meanwhile is never overwritten (the
API's cancel is a compare-and-set under that lock too: JobLog.request_cancel). So does the time limit (`time_limited`: past it the job fails with JobTimedOut). A job is started at
most `settings.max_attempts` times in a row (`Job.deliveries`, reset when it is queued again): a job
whose every start died with its process is failed on the next delivery instead of run again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from memfit.config import Settings
from model_store import (
    ActiveMovedError,
    Job,
    LiveTables,
    RebaseConflict,
    Store,
    StoreError,
)
from model_store.fsutil import crash_point

from .gate import Reference, load_probe, measure
from .preservation import preservation_mask
from .repairing import TaughtFacts, repairing
from .update_settings import build_update_settings

log = logging.getLogger("memfit.pipeline")

MAX_PUBLISH_ATTEMPTS = 4  # retrain/rebase rounds when other writers keep moving the active version
PROGRESS_EVERY_S = 0.5  # progress events written to the job log at most this often


CRASH_POINTS = ("pipeline:before_training", "pipeline:training", "pipeline:published", "pipeline:finished")


class JobCancelled(Exception):
    """Raised at a step boundary when the job was cancelled."""


class JobTimedOut(Exception):
    """Raised at a step boundary when the job ran past its time limit (the job is then `failed`)."""


def time_limited(
    limit_s: float, should_cancel: Callable[[], bool] | None = None, why: str = ""
) -> Callable[[], bool]:
    """A `should_cancel` for `Pipeline.run_job` that raises JobTimedOut once `limit_s` seconds have
    passed (checked at step boundaries: between optimizer steps, before evaluation, before publish);
    `why` names the setting in the error."""
    deadline = time.monotonic() + float(limit_s)
    why = why or f"MEMFIT_TASK_TIME_LIMIT_S={limit_s:g}"

    def check() -> bool:
        if time.monotonic() > deadline:
            raise JobTimedOut(f"the update ran past its time limit of {limit_s:g} s ({why})")
        return bool(should_cancel and should_cancel())

    return check


def find_version_of_job(store: Store, job_id: str) -> int | None:
    """The version published for `job_id` (newest first), or None (the store's job index)."""
    return store.version_of_job(job_id)


@dataclass
class JobResult:
    job_id: str
    status: str
    version: int | None = None
    parent: int | None = None
    evaluation: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None


class Pipeline:
    """Holds the warm training copy of the model for one store; `run_job` is the unit of work."""

    def __init__(self, store: Store, settings: Settings, device: str = "cpu") -> None:
        self.store = store
        self.settings = settings
        self.device = device
        self._lock = threading.Lock()  # one job at a time per pipeline (one training copy)
        self.model: Any = None
        self.tokenizer: Any = None
        self.background: Any = None
        self.live: LiveTables | None = None
        self.probe: list[dict] = []  # probe facts the base answers (within the budget)
        self.heldout: list[str] = []
        # {memory layer: bool mask} of slots no update selects (workers/preservation.py); None: none
        self.protected: dict[int, Any] | None = None
        self.model_defaults: dict[str, Any] = {}  # the base model's update_defaults.json
        self._refs: dict[int, Reference] = {}
        self.taught = TaughtFacts(store)  # per version, the facts its chain taught (update_repair)
        # called as hook(result) after each run_job that brought an unfinished job to a final state,
        # outside the pipeline's lock (the worker's job metrics: service.worker_metrics.instrument)
        self.finished_hooks: list[Callable[[JobResult], None]] = []

    # -- setup -----------------------------------------------------------------------------------
    def budget(self):
        from memlm.evaluation import EvalBudget

        s = self.settings
        return EvalBudget(probe_facts=s.gate_probe_facts, heldout_tokens=s.gate_heldout_tokens)

    def load(self) -> None:
        """Load the training copy at version 0, measure the base reference, move to the active version."""
        if self.model is not None:
            return
        import memlm
        from memlm.background import BackgroundStats
        from memlm.evaluation import answered, perplexity_with_overlay

        base = self.store.base_dir
        model, tok = memlm.load(base, self.device)
        self.model, self.tokenizer = model, tok
        self.background = BackgroundStats.load(base)
        facts, texts = load_probe(self.settings.probe_file or base)
        budget = self.budget()
        self.heldout = texts
        candidates = facts[: budget.probe_facts]
        hits = answered(model, tok, candidates) if candidates else []
        self.probe = [f for f, h in zip(candidates, hits) if h]
        self.model_defaults = memlm.update_defaults(base)  # the model's update_defaults.json ({} when absent)
        self.protected = preservation_mask(model, tok, facts, self.settings, self.model_defaults)  # once
        ppl = perplexity_with_overlay(model, tok, texts, budget.heldout_tokens) if texts else float("nan")
        self._refs[0] = Reference([True] * len(self.probe), ppl)
        self.live = LiveTables(self.store, model.value_tables(), 0)
        log.info(
            "pipeline loaded: %d of %d probe facts answered by the base, held-out perplexity %.2f",
            len(self.probe),
            len(candidates),
            ppl,
        )

    def at_version(self, v: int) -> None:
        """Move the training copy's value tables to version `v` (only differing rows are written)."""
        self.load()
        assert self.live is not None
        self.live.switch_to(v)

    def reference(self, v: int) -> Reference:
        """Probe answers and perplexity of version `v` (cached; measured on the training copy)."""
        ref = self._refs.get(v)
        if ref is not None:
            return ref
        from memlm.evaluation import answered, perplexity_with_overlay

        self.at_version(v)
        ans = answered(self.model, self.tokenizer, self.probe) if self.probe else []
        ppl = (
            perplexity_with_overlay(self.model, self.tokenizer, self.heldout, self.budget().heldout_tokens)
            if self.heldout
            else float("nan")
        )
        ref = Reference(list(ans), ppl)
        self._refs[v] = ref
        return ref

    def probe_reads(self, v: int) -> list:
        """The memory reads of every probe text under version `v` (cached with its Reference)."""
        ref = self.reference(v)
        if ref.reads is None:
            from memlm.reach import probe_reads

            self.at_version(v)
            ref.reads = probe_reads(self.model, self.tokenizer, self.probe) if self.probe else []
        return ref.reads

    # -- one job ---------------------------------------------------------------------------------
    def run_job(
        self,
        job_id: str,
        should_cancel: Callable[[], bool] | None = None,
        on_phase: Callable[[str], None] | None = None,
    ) -> JobResult:
        """Run job `job_id` to a final state; idempotent (see the module docstring). Then, when the
        job was not finished already, each of `finished_hooks` is called with the result."""
        with self._lock:
            before = self.store.jobs.get(job_id)
            # finished already (a redelivered task): no hook. Read now: the Job the log holds for an
            # unfinished job is updated in place as the run records its states
            finished_before = before is None or before.terminal
            result = self._run_job(job_id, should_cancel or (lambda: False), on_phase)
        if not finished_before:
            for hook in self.finished_hooks:
                hook(result)
        return result

    def _run_job(self, job_id: str, should_cancel: Callable[[], bool], on_phase) -> JobResult:
        jobs = self.store.jobs
        job = jobs.get(job_id)
        if job is None:
            raise KeyError(f"job {job_id} not found")
        if job.terminal:
            return _result(job)

        t_start = time.time()
        timings: dict[str, float] = {"queued": round(max(0.0, t_start - job.created_at), 4)}
        if job.status == "queued" and _cancel_requested(job):
            return self._record_cancelled(job, timings, "cancelled before it started", {})

        done = self._finish_if_published(job, timings)
        if done is not None:
            return done

        max_attempts = self.settings.max_attempts
        if job.deliveries >= max_attempts:
            # every earlier start died with its process (a kill, an OOM): starting it again would
            # take the next worker down too
            log.error("job %s started %d times without finishing: failing it", job_id, job.deliveries)
            return _result(
                jobs.update(
                    job_id,
                    status="failed",
                    error=(
                        f"started {job.deliveries} times without finishing (the process running it died "
                        f"each time); gave up after MEMFIT_MAX_ATTEMPTS={max_attempts}. "
                        "POST /jobs/{id}/retry runs it again"
                    ),
                    progress={"phase": "failed"},
                )
            )

        # compare-and-set under the job log's lock, as the API's cancel is (JobLog.request_cancel):
        # a cancel recorded since the read above is honoured, and a cancel flag is kept (writing
        # `progress` whole lost a flag written meanwhile: the job then ran to the end)
        with jobs.transaction():
            current = jobs.get(job_id)
            if current is not None and current.terminal:
                return _result(current)  # cancelled since the read above (queued -> cancelled)
            flagged = current is not None and _cancel_requested(current)
            jobs.update(
                job_id,
                status="running",
                progress={"phase": "loading", **({"cancel_requested": True} if flagged else {})},
                timings=timings,
            )
        phase = _PhaseReporter(jobs, job_id, should_cancel, on_phase)
        try:
            return self._train_evaluate_publish(job, timings, phase, t_start)
        except JobCancelled:
            timings["total"] = round(time.time() - t_start, 4)
            return self._record_cancelled(
                job,
                timings,
                "cancelled while running",
                {"timings": timings, "progress": {"phase": "cancelled"}},
            )
        except Exception as e:  # a failed job is recorded; the runner keeps going
            log.exception("job %s failed", job_id)
            timings["total"] = round(time.time() - t_start, 4)
            current = jobs.get(job_id)
            if current is not None and current.terminal:
                return _result(current)
            return _result(
                jobs.update(
                    job_id,
                    status="failed",
                    error=f"{type(e).__name__}: {e}",
                    timings=timings,
                    progress={"phase": "failed"},
                )
            )

    def _record_cancelled(self, job: Job, timings: dict[str, float], error: str, extra: dict) -> JobResult:
        """Record the job `cancelled`, unless a delivery of it published meanwhile (two deliveries of
        one job run at once when its claim lapsed): then record that version instead. Under the
        store's writer lock, which every publish holds from its find_version_of_job check on, so no
        publish of this job lands between the check here and the record."""
        jobs = self.store.jobs
        with self.store.lock:
            current = jobs.get(job.job_id) or job
            if current.terminal:
                return _result(current)
            done = self._finish_if_published(current, timings)
            if done is not None:
                log.info("job %s: cancel came after its version was published; recorded that", job.job_id)
                return done
            log.info("job %s %s", job.job_id, error)
            return _result(jobs.update(job.job_id, status="cancelled", error=error, **extra))

    def _finish_if_published(self, job: Job, timings: dict[str, float]) -> JobResult | None:
        v = find_version_of_job(self.store, job.job_id)
        if v is None:
            return None
        m = self.store.manifest(v)
        status = "rejected" if m.get("state") == "rejected" else "succeeded"
        log.info("job %s was already published as version %d: recording it", job.job_id, v)
        if job.status == "queued":
            self.store.jobs.update(job.job_id, status="running")
        return _result(
            self.store.jobs.update(
                job.job_id,
                status=status,
                version=v,
                parent=m.get("parent"),
                evaluation=m.get("evaluation") or {},
                timings={**(job.timings or {}), **timings, "redelivered": True},
                progress={"phase": "done"},
            )
        )

    def _train_evaluate_publish(
        self, job: Job, timings: dict[str, float], phase, t_start: float
    ) -> JobResult:
        """Train on the active version, evaluate, publish (retraining when a rebase conflicts)."""
        store = self.store
        documents = store.jobs.documents(job.documents, job_id=job.job_id)
        us = build_update_settings(self.settings, job.settings, self.model_defaults)
        spent = {"training": 0.0, "evaluation": 0.0, "publish": 0.0}
        self.load()
        for attempt in range(1, MAX_PUBLISH_ATTEMPTS + 1):
            phase.check()
            parent = store.active()
            delta, evaluation = self._candidate(job, documents, us, parent, attempt, phase, spent)
            state = "active" if evaluation["gate"]["passed"] else "rejected"
            t0 = time.perf_counter()
            phase.set("publish", parent=parent, attempt=attempt)
            try:
                published = self._publish_once(job, delta, parent, documents, us, evaluation, state, timings)
            except RebaseConflict as e:
                spent["publish"] += time.perf_counter() - t0
                log.info("job %s: %s; retraining from the new active version", job.job_id, e)
                continue
            spent["publish"] += time.perf_counter() - t0
            if isinstance(published, JobResult):  # published by another delivery of this job meanwhile
                return published
            v, parent = published
            crash_point("pipeline:published", job.job_id)  # published, the job not yet recorded
            timings.update(
                {k: round(t, 4) for k, t in spent.items()},
                total=round(time.time() - t_start, 4),
                attempts=attempt,
            )
            return self._record_published(job, v, parent, evaluation, timings)
        raise StoreError(
            f"the active version kept moving: gave up after {MAX_PUBLISH_ATTEMPTS} retrain attempts"
        )

    def _candidate(
        self, job: Job, documents, us, parent: int, attempt: int, phase, spent
    ) -> tuple[Any, dict]:
        """Train the update on `parent` and evaluate it; the training copy is back at `parent` after."""
        from memlm.updater import learn_documents

        phase.set("loading", parent=parent, attempt=attempt)
        ref = self.reference(parent)  # also moves the training copy to the parent
        parent_reads = self.probe_reads(parent)
        self.at_version(parent)  # a cached Reference does not move the copy: train on the parent
        phase.check()

        t0 = time.perf_counter()
        phase.set("training", parent=parent, attempt=attempt, step=0, steps=us.steps)
        crash_point("pipeline:before_training", job.job_id)

        def progress(info: dict, _job: str = job.job_id) -> None:
            phase.step(info)
            if int(info.get("step") or 0) >= 2:
                crash_point("pipeline:training", _job)

        delta = learn_documents(
            self.model,
            self.tokenizer,
            documents,
            self.background,
            us,
            progress=progress,
            protected=self.protected,
        )
        taught = None
        if repairing(self.settings, self.model_defaults):  # workers/repairing.py
            delta, taught = self._repair(documents, us, delta, parent)
        spent["training"] += time.perf_counter() - t0
        tables = self.model.value_tables()
        try:
            phase.check()
            t0 = time.perf_counter()
            phase.set("evaluation", parent=parent, attempt=attempt)
            evaluation = self._evaluate(documents, ref, parent, delta, parent_reads)
            evaluation["_taught"] = taught
            spent["evaluation"] += time.perf_counter() - t0
        finally:
            delta.revert(tables)  # the training copy is back at `parent` exactly
        phase.check()
        return delta, evaluation

    def _repair(self, documents, us, delta, parent: int):
        """memlm.repair on the training copy (parent + delta): (the delta to publish, the one-fact
        documents this update taught, with their reads, for TaughtFacts.published)."""
        from memlm.repair import Learned, repair_update

        learned = self.taught.at(parent, self.model, self.tokenizer)
        delta = repair_update(
            self.model, self.tokenizer, documents, self.background, us, delta, learned, self.protected
        )
        taught = Learned()
        taught.add_taught(self.model, self.tokenizer, documents)
        return delta, taught

    def _publish_once(self, job, delta, parent, documents, us, evaluation, state, timings):
        """Publish under the writer lock: (version, parent), or the JobResult of another delivery of
        this job that published meanwhile. An active version that moved is rebased onto (raises
        RebaseConflict when the slots overlap: the caller retrains)."""
        store = self.store
        with store.lock:
            if find_version_of_job(store, job.job_id) is not None:
                return self._finish_if_published(job, timings)
            try:
                v = self._publish(job, delta, parent, documents, us, evaluation, state, rebase=False)
            except ActiveMovedError:
                v = self._publish(job, delta, parent, documents, us, evaluation, state, rebase=True)
                evaluation["rebased"] = {"from": parent, "onto": store.manifest(v)["parent"]}
                parent = store.manifest(v)["parent"]
                evaluation["_answered"] = None  # figures measured on the old parent: not a reference
                evaluation["_reads"] = None
        return v, parent

    def _record_published(self, job: Job, v: int, parent: int, evaluation: dict, timings: dict) -> JobResult:
        """Record the published version in the job (and, when it went live, its reference figures)."""
        gate = evaluation["gate"]
        status = "succeeded" if gate["passed"] else "rejected"
        answered_after = evaluation.pop("_answered", None)
        reads_after = evaluation.pop("_reads", None)
        taught = evaluation.pop("_taught", None)
        if status == "succeeded" and answered_after is not None and evaluation["perplexity"] is not None:
            self._refs[v] = Reference(answered_after, evaluation["perplexity"], reads_after)
        if status == "succeeded" and taught is not None:
            self.taught.published(v, parent, taught, self.model, self.tokenizer)
        error = None if gate["passed"] else "rejected by the evaluation gate: " + "; ".join(gate["reasons"])
        log.info(
            "job %s %s as version %d (parent %d) in %.2f s",
            job.job_id,
            status,
            v,
            parent,
            timings["total"],
            extra={"version": v},
        )
        done = self.store.jobs.update(
            job.job_id,
            status=status,
            version=v,
            parent=parent,
            evaluation=evaluation,
            timings=timings,
            error=error,
            progress={"phase": "done"},
        )
        crash_point("pipeline:finished", job.job_id)  # recorded, the task not yet acknowledged
        return _result(done)

    def _publish(self, job, delta, parent, documents, us, evaluation, state, rebase: bool) -> int:
        ev = {k: v for k, v in evaluation.items() if not k.startswith("_")}  # _answered, _reads: caches
        ev["probe_answered"] = evaluation.get("_answered")
        return self.store.publish(
            delta,
            parent,
            job_id=job.job_id,
            documents=[d["id"] for d in documents],
            settings=us.to_dict(),
            evaluation=ev,
            activate=state == "active",
            state=state,
            who="pipeline",
            why=f"job {job.job_id}",
            rebase=rebase and state == "active",
        )

    def _evaluate(
        self,
        documents: list[dict],
        parent_ref: Reference,
        parent: int,
        delta=None,
        parent_reads=None,
        reach_only: bool = True,
    ) -> dict[str, Any]:
        """Evaluate the training copy (parent + delta applied) and gate it (workers.gate.measure;
        `reach_only` False: every probe fact decoded, the full evaluation)."""
        return measure(
            self.model,
            self.tokenizer,
            documents,
            probe=self.probe,
            heldout=self.heldout,
            budget=self.budget(),
            settings=self.settings,
            refs=(parent_ref, self._refs[0]),
            parent=parent,
            delta=delta,
            parent_reads=parent_reads,
            reach_only=reach_only,
            model_defaults=self.model_defaults,
        )


def _cancel_requested(job: Job) -> bool:
    return bool((job.progress or {}).get("cancel_requested"))


def _result(job: Job) -> JobResult:
    return JobResult(
        job_id=job.job_id,
        status=job.status,
        version=job.version,
        parent=job.parent,
        evaluation=job.evaluation or {},
        timings=job.timings or {},
        error=job.error,
    )


class _PhaseReporter:
    """Writes progress to the job log (throttled) and raises JobCancelled at step boundaries."""

    def __init__(self, jobs, job_id: str, should_cancel: Callable[[], bool], on_phase) -> None:
        self.jobs = jobs
        self.job_id = job_id
        self.should_cancel = should_cancel
        self.on_phase = on_phase
        self.progress: dict[str, Any] = {}
        self._last_write = 0.0
        self._last_log_check = 0.0

    def check(self) -> None:
        if self.should_cancel():
            raise JobCancelled
        now = time.monotonic()
        if now - self._last_log_check >= PROGRESS_EVERY_S:  # a cancel written by another process
            self._last_log_check = now
            job = self.jobs.get(self.job_id)
            if job is not None and (_cancel_requested(job) or job.status == "cancelled"):
                raise JobCancelled

    def set(self, phase: str, **info: Any) -> None:
        self.progress = {"phase": phase, **info}
        if self.on_phase is not None:
            self.on_phase(phase)
        self._write(force=True)

    def step(self, info: dict) -> None:
        self.progress.update(
            step=info.get("step"), steps=info.get("steps"), loss=round(float(info.get("loss", 0.0)), 4)
        )
        self._write()
        self.check()

    def _write(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_write < PROGRESS_EVERY_S:
            return
        self._last_write = now
        # read, check and write in one step under the job log's lock: `progress` is replaced whole,
        # so a cancel flag another process wrote between a read and the write would be lost
        with self.jobs.transaction():
            job = self.jobs.get(self.job_id)
            if job is not None and _cancel_requested(job):
                raise JobCancelled
            self.jobs.update(self.job_id, progress=dict(self.progress))
