"""Merging queued jobs into one update: shared by the embedded runner and the distributed worker.

When single-document ingests pile up, one update of many documents costs far less than one update
each (one access count, one selection, one evaluation, one publish, one hot swap). The leader job and
up to `max_batch_jobs - 1` other queued jobs (oldest first, the same update settings, no document id
in common, no cancel asked, still queued when the batch is recorded) become one *batch job* in the log: `report.batch_of` = the member ids, its
documents = the members' documents. Each member is marked `running` with `report.batch` = the batch
id; the pipeline runs the batch job once; `finish_members` copies its outcome (status, version,
parent, evaluation, timings, error) to every member. The version's manifest names the batch job and
lists every member document.

Crash safety: every step is recorded in the durable job log before the next one. A process that dies
mid-batch leaves the batch job and its members `running`; the next process finds either (the
runner takes the oldest queued-or-running job), re-runs the batch if it has not finished and then
finishes the members. The pipeline never publishes a job twice (workers.pipeline.find_version_of_job).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from model_store import InvalidTransition, Job, Store

log = logging.getLogger("memfit.batching")


def gather(
    store: Store, leader: Job, limit: int, take: Callable[[Job], Job | None] | None = None
) -> list[Job]:
    """Other queued jobs to merge with `leader`, oldest first, at most `limit`.

    `take(job)` may veto or claim a candidate (the distributed worker takes a Redis claim there and
    re-reads the job); it returns the job to use, or None to skip it."""
    if limit <= 0:
        return []
    taken: list[Job] = []
    docs = set(leader.documents)
    for j in store.jobs.queued(include_running=False):
        if len(taken) >= limit:
            break
        if j.job_id == leader.job_id or (j.report or {}).get("batch_of"):
            continue
        if (j.settings or {}) != (leader.settings or {}) or docs & set(j.documents):
            continue
        if (j.progress or {}).get("cancel_requested"):
            continue
        current = take(j) if take is not None else j
        if current is None:
            continue
        taken.append(current)
        docs |= set(current.documents)
    return taken


def create_batch(
    store: Store, members: list[Job], batch_id: str | None = None
) -> tuple[str, list[str]] | None:
    """Record the batch job of `members` and mark each member running under it.

    Returns (the job to run, its member ids): a batch of the members still queued when the batch is
    recorded. Between `gather` picking them and this, another process may have cancelled some (or
    asked to): those are dropped (a queued one with cancel_requested is cancelled here, as the
    pipeline would), so a cancelled job's documents never reach the batch. One member left: (its id,
    []), it runs on its own, no batch recorded; none left: None. The check and the writes happen
    under the job log's file lock (JobLog.transaction), so no cancel lands in between.
    """
    from model_store.joblog import new_job_id

    jobs = store.jobs
    with jobs.transaction():
        keep: list[Job] = []
        for m in members:
            current = jobs.get(m.job_id)
            if current is None or current.status != "queued":
                log.info("batch: job %s is %s now, left out", m.job_id, current and current.status)
                continue
            if (current.progress or {}).get("cancel_requested"):
                jobs.update(m.job_id, status="cancelled", error="cancelled before it started")
                continue
            keep.append(current)
        if not keep:
            return None
        if len(keep) == 1:
            return keep[0].job_id, []
        batch_id = batch_id or new_job_id()
        member_ids = [m.job_id for m in keep]
        documents: list[dict[str, Any]] = [
            {str(k): r[k] for k in ("id", "text", "facts", "metadata") if k in r}
            for m in keep
            for r in jobs.documents(m.documents, job_id=m.job_id)
        ]
        request_ids = ",".join(dict.fromkeys(str(m.request_id) for m in keep if m.request_id))
        jobs.create_job(
            batch_id, documents, settings=dict(keep[0].settings or {}), request_id=request_ids or None
        )
        jobs.update(batch_id, report={"batch_of": member_ids})
        for m in keep:
            jobs.update(
                m.job_id,
                status="running",
                report={**(m.report or {}), "batch": batch_id},
                progress={"phase": "batched", "batch": batch_id, "batch_size": len(keep)},
            )
    log.info("batch %s: %d jobs, %d documents", batch_id, len(keep), len(documents))
    return batch_id, member_ids


def members_of(batch: Job) -> list[str]:
    return [str(x) for x in (batch.report or {}).get("batch_of", [])]


def all_cancelled(store: Store, member_ids: list[str]) -> bool:
    """True when every member of a batch was cancelled or asked to be (then the batch stops)."""
    ms = [store.jobs.get(mid) for mid in member_ids]
    return bool(ms) and all(
        m is not None and (m.status == "cancelled" or bool((m.progress or {}).get("cancel_requested")))
        for m in ms
    )


def finish_members(store: Store, batch: Job, member_ids: list[str]) -> list[Job]:
    """Copy the finished batch's outcome to its members still running under it; returns them."""
    if not batch.terminal:
        return []
    jobs = store.jobs
    done: list[Job] = []
    for mid in member_ids:
        m = jobs.get(mid)
        if m is None or m.terminal or (m.report or {}).get("batch") != batch.job_id:
            continue
        try:
            if m.status != "running":
                jobs.update(mid, status="running")
            done.append(
                jobs.update(
                    mid,
                    status=batch.status,
                    version=batch.version,
                    parent=batch.parent,
                    evaluation=batch.evaluation or {},
                    timings={**(batch.timings or {}), "batch": batch.job_id},
                    error=batch.error,
                    progress={"phase": "done", "batch": batch.job_id},
                )
            )
        except InvalidTransition as e:  # cancelled meanwhile by an operator
            log.warning("batch %s: member %s: %s", batch.job_id, mid, e)
    return done
