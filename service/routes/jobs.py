"""Jobs: GET /jobs, GET /jobs/{job_id}, POST /jobs/{job_id}/cancel, POST /jobs/{job_id}/retry."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query

from model_store import InvalidTransition, Job
from service.deps import DispatcherDep, StoreDep
from service.errors import ApiError, validate_id
from service.schemas import ErrorResponse, JobList, JobOut
from service.security import Principal, require_role

router = APIRouter(prefix="/jobs", tags=["jobs"])
ReadDep = Annotated[Principal, Depends(require_role("read"))]
WriteDep = Annotated[Principal, Depends(require_role("write"))]
AdminDep = Annotated[Principal, Depends(require_role("admin"))]
StatusFilter = Literal["queued", "running", "succeeded", "rejected", "failed", "cancelled"]


def job_out(job: Job) -> JobOut:
    return JobOut(
        job_id=job.job_id,
        status=job.status,  # type: ignore[arg-type]
        version=job.version,
        parent=job.parent,
        documents=list(job.documents),
        settings=dict(job.settings or {}),
        timings=dict(job.timings or {}),
        evaluation=dict(job.evaluation or {}),
        progress=dict(job.progress or {}),
        error=job.error,
        created_at=job.created_at,
        updated_at=job.updated_at,
        attempts=job.attempts,
        request_id=getattr(job, "request_id", None),
    )


def _get(store, job_id: str) -> Job:
    validate_id(job_id, "job_id")
    job = store.jobs.get(job_id)
    if job is None:
        raise ApiError(404, "job_not_found", f"job {job_id} not found", "job_id")
    return job


@router.get("", response_model=JobList, summary="Recent jobs, newest first")
async def list_jobs(
    store: StoreDep,
    _: ReadDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="at most this many")] = 50,
    status: Annotated[StatusFilter | None, Query(description="only jobs in this state")] = None,
) -> JobList:
    jobs = await asyncio.to_thread(store.jobs.list, limit, status)  # filtered, then the newest `limit`
    return JobList(jobs=[job_out(j) for j in jobs])


@router.get("/{job_id}", response_model=JobOut, summary="One job: status, version, timings, evaluation")
async def get_job(job_id: str, store: StoreDep, _: ReadDep) -> JobOut:
    return job_out(await asyncio.to_thread(_get, store, job_id))


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    summary="Cancel: queued -> cancelled; running -> cancelled at the next step boundary",
    responses={409: {"model": ErrorResponse, "description": "the job already finished"}},
)
async def cancel_job(job_id: str, store: StoreDep, dispatcher: DispatcherDep, _: WriteDep) -> JobOut:
    def work() -> Job:
        _get(store, job_id)
        try:
            return dispatcher.cancel(job_id)
        except InvalidTransition as e:
            raise ApiError(409, "invalid_transition", str(e), "job_id") from None

    return job_out(await asyncio.to_thread(work))


@router.post(
    "/{job_id}/retry",
    response_model=JobOut,
    summary="Retry a failed or cancelled job (-> queued)",
    responses={409: {"model": ErrorResponse, "description": "the job is not failed or cancelled"}},
)
async def retry_job(job_id: str, store: StoreDep, dispatcher: DispatcherDep, _: WriteDep) -> JobOut:
    def work() -> Job:
        job = _get(store, job_id)
        if job.status not in ("failed", "cancelled"):
            raise ApiError(
                409,
                "invalid_transition",
                f"job {job_id} is {job.status}: only failed or cancelled jobs can be retried",
                "job_id",
            )
        try:
            return dispatcher.retry(job_id)
        except InvalidTransition as e:
            raise ApiError(409, "invalid_transition", str(e), "job_id") from None

    return job_out(await asyncio.to_thread(work))
