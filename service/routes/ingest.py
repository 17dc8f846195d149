"""POST /ingest: record documents and an update job durably, then hand the job to the runner.

202 only after the documents and the job are fsynced to the store's log (model_store.JobLog), also
when the update queue (Redis, distributed mode) is unreachable: then `"dispatch": "pending"` and the
replicas' sweep sends the job once Redis answers (a 503 there made clients retry, doubling jobs that
were recorded already).
Idempotency-Key: the same key with the same body returns the same job (also after a restart and for
concurrent retries on any replica of the store: the check and the create are one step under the job
log's file lock); the same key with a different body is a 409. Keys are scoped to the caller's API
key: two clients using the same Idempotency-Key get two jobs. A key recorded before that scoping
(the raw key, no `idempotency_scope` in the job) still answers a keyed caller's replay with its job,
so a retry across the upgrade is not doubled.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import threading
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse

from memfit.config import Settings
from memfit.logs import current_request_id
from model_store import IdempotencyConflict, Job, Store
from model_store.joblog import new_job_id
from service.deps import DispatcherDep, EngineDep, MetricsDep, SettingsDep, StoreDep
from service.errors import ApiError
from service.schemas import ErrorResponse, IngestRequest, IngestResponse
from service.security import Principal, RateLimiter, require_role

router = APIRouter(tags=["ingest"])
WriteDep = Annotated[Principal, Depends(require_role("write"))]
MAX_KEY_CHARS = 200


def check_ingest_limits(body: IngestRequest, settings: Settings, memory_size: int | None) -> dict:
    """Settings limits of an ingest request (413/422 naming the limit); returns the settings overrides."""
    docs = body.documents
    if len(docs) > settings.max_documents_per_request:
        raise ApiError(
            413,
            "too_many_documents",
            f"{len(docs)} documents; max_documents_per_request = {settings.max_documents_per_request}",
            "documents",
        )
    seen: set[str] = set()
    for i, d in enumerate(docs):
        if len(d.text) > settings.max_document_chars:
            raise ApiError(
                413,
                "document_too_long",
                f"document {i} has {len(d.text)} characters; max_document_chars = {settings.max_document_chars}",
                f"documents[{i}].text",
            )
        if len(d.facts) > settings.max_facts_per_document:
            raise ApiError(
                422,
                "limit_exceeded",
                f"document {i} has {len(d.facts)} facts; max_facts_per_document = {settings.max_facts_per_document}",
                f"documents[{i}].facts",
            )
        if d.id is not None:
            if d.id in seen:
                raise ApiError(
                    422,
                    "duplicate_id",
                    f"document id {d.id!r} appears twice in this request",
                    f"documents[{i}].id",
                )
            seen.add(d.id)
    overrides = body.settings.model_dump(exclude_none=True) if body.settings is not None else {}
    if overrides:
        from workers.update_settings import build_update_settings, update_settings_fields

        known = update_settings_fields()
        for k in overrides:
            if k not in known:
                raise ApiError(
                    422,
                    "unknown_field",
                    f"unknown update setting {k!r}; known: {sorted(known)}",
                    f"settings.{k}",
                )
        try:
            build_update_settings(None, overrides)
        except (TypeError, ValueError) as e:
            raise ApiError(422, "invalid_request", f"settings: {e}", "settings") from None
        top_t = overrides.get("top_t")
        if memory_size is not None and isinstance(top_t, int) and top_t > memory_size:
            raise ApiError(
                422,
                "limit_exceeded",
                f"top_t {top_t} exceeds the memory's {memory_size} slots",
                "settings.top_t",
            )
    return overrides


def body_hash(body: IngestRequest) -> str:
    canonical = json.dumps(
        body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


_budget_lock = threading.Lock()


def ingest_budget(request: Request, settings: Settings) -> RateLimiter:
    """This replica's per-key byte buckets (kept on the app, made on first use)."""
    with _budget_lock:
        limiter = getattr(request.app.state, "ingest_budget", None)
        if limiter is None or limiter.per_minute != settings.ingest_bytes_per_minute:
            limiter = request.app.state.ingest_budget = RateLimiter(settings.ingest_bytes_per_minute)
        return limiter


def document_bytes(documents: list[dict]) -> int:
    """UTF-8 bytes of the documents' text and facts: what the byte budget counts."""
    total = 0
    for d in documents:
        total += len((d.get("text") or "").encode())
        for f in d.get("facts", []):
            total += sum(len(str(v).encode()) for v in f.values())
    return total


@dataclass
class Claim:
    """The caller's Idempotency-Key as recorded: scoped to its API key (another client's same key is
    another job, never its job), with the raw key of records made before scoping (`legacy`,
    model_store.JobLog.find_by_idempotency_key) and the body's hash."""

    key: str | None  # the header as sent
    claim: str | None  # what the log records
    scope: str
    legacy: str | None
    digest: str


def idempotency_claim(idempotency_key: str | None, principal: Principal, body: IngestRequest) -> Claim:
    if idempotency_key is not None:
        if not idempotency_key or len(idempotency_key) > MAX_KEY_CHARS or not idempotency_key.isprintable():
            raise ApiError(
                422,
                "invalid_request",
                f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} printable characters",
                "Idempotency-Key",
            )
    claim, legacy = idempotency_key, None
    if idempotency_key is not None and principal.key_id:
        claim, legacy = f"{principal.key_id}:{idempotency_key}", idempotency_key
    scope = f"key:{principal.key_id}" if principal.key_id else "anonymous"
    return Claim(idempotency_key, claim, scope, legacy, body_hash(body))


def request_documents(body: IngestRequest, settings: Settings) -> tuple[list[dict], int]:
    """The documents as the log records them, and their bytes (413 over the per-minute budget)."""
    documents = [d.model_dump(exclude_none=True) for d in body.documents]
    for d in documents:
        d["facts"] = [{k: v for k, v in f.items() if v is not None} for f in d.get("facts", [])]
    cost = document_bytes(documents)
    if settings.ingest_bytes_per_minute and cost > settings.ingest_bytes_per_minute:
        raise ApiError(
            413,
            "too_large",
            f"{cost} document bytes in one request; ingest_bytes_per_minute = {settings.ingest_bytes_per_minute}",
            "ingest_bytes_per_minute",
        )
    return documents, cost


def create_job(
    request: Request,
    store: Store,
    settings: Settings,
    principal: Principal,
    key: Claim,
    documents: list[dict],
    cost: int,
    overrides: dict,
) -> tuple[Job, bool]:
    """(the job, whether it is a replay of the key's job); 409 / 429 as ApiError or IdempotencyConflict."""
    jobs = store.jobs
    if key.claim is not None:
        existing = jobs.find_by_idempotency_key(key.claim, key.legacy)
        if existing is not None:
            if existing.body_sha256 not in (None, key.digest):
                raise IdempotencyConflict(str(key.key), existing.job_id)  # a claim comes from a key
            return existing, True
    # a new job spends the key's byte budget (a replay above does not)
    wait = ingest_budget(request, settings).acquire(principal.key_id or "anonymous", cost)
    if wait > 0:
        retry = max(1, math.ceil(wait))
        raise ApiError(
            429,
            "rate_limited",
            f"ingest_bytes_per_minute = {settings.ingest_bytes_per_minute} spent for this key; retry in {retry} s",
            "ingest_bytes_per_minute",
            {"Retry-After": str(retry)},
        )
    depth = len(jobs.queued(include_running=False))
    if depth >= settings.max_queue_depth:
        raise ApiError(
            429,
            "queue_full",
            f"{depth} jobs queued; max_queue_depth = {settings.max_queue_depth}",
            "max_queue_depth",
            {"Retry-After": "5"},
        )
    # create_job repeats the key lookup under the job log's file lock: concurrent retries, on
    # this replica or another one of the store, get one job
    mine = new_job_id()
    job = jobs.create_job(
        mine,
        documents,
        settings=overrides,
        idempotency_key=key.claim,
        body_sha256=key.digest,
        request_id=current_request_id(),  # the worker logs under the ingest's X-Request-ID
        idempotency_scope=key.scope if key.claim is not None else None,
        legacy_key=key.legacy,
    )
    return job, job.job_id != mine


@router.post(
    "/ingest",
    status_code=202,
    response_model=IngestResponse,
    summary="Queue documents for a knowledge update",
    responses={
        409: {"model": ErrorResponse, "description": "Idempotency-Key reused with a different body"},
        413: {
            "model": ErrorResponse,
            "description": "too many documents, or a document too long (names the limit)",
        },
        422: {"model": ErrorResponse, "description": "invalid field or limit exceeded"},
        429: {
            "model": ErrorResponse,
            "description": "queue over max_queue_depth, or the key's ingest_bytes_per_minute spent (Retry-After)",
        },
    },
)
async def ingest(
    request: Request,
    body: IngestRequest,
    store: StoreDep,
    engine: EngineDep,
    dispatcher: DispatcherDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    principal: WriteDep,
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", description="same key + same body -> the same job"),
    ] = None,
):
    memory_size = getattr(engine.model.config, "memory_size", None)
    overrides = check_ingest_limits(body, settings, memory_size)
    key = idempotency_claim(idempotency_key, principal, body)
    documents, cost = request_documents(body, settings)
    try:
        job, replayed = await asyncio.to_thread(
            create_job, request, store, settings, principal, key, documents, cost, overrides
        )
    except IdempotencyConflict as e:
        raise ApiError(
            409,
            "idempotency_conflict",
            f"Idempotency-Key {e.key!r} was used by job {e.job_id} with a different body",
            "Idempotency-Key",
        ) from None
    dispatch = None
    if not replayed:
        metrics.ingested_documents.inc(len(documents))
        # off the event loop: the distributed dispatcher talks to Redis; "pending" when it is
        # unreachable (the job is in the log already, the sweep sends it later)
        dispatch = await asyncio.to_thread(dispatcher.notify, job.job_id) or "sent"
    headers = {"Location": f"/jobs/{job.job_id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    out = IngestResponse(
        job_id=job.job_id,
        status=job.status,  # type: ignore[arg-type]
        documents=list(job.documents),
        dispatch=dispatch,
    )
    return JSONResponse(out.model_dump(), status_code=202, headers=headers)
