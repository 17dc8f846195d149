"""Versions and documents: GET /versions, GET /versions/{id}, POST /versions/{id}/activate,
POST /versions/{id}/revert, POST /documents/{id}/revert."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path
from fastapi.responses import JSONResponse

from model_store import (
    CorruptVersionError,
    DocumentNotTaught,
    RevertConflict,
    StoreError,
    UnknownVersionError,
)
from service.deps import DispatcherDep, EngineDep, SettingsDep, StoreDep
from service.errors import ApiError, validate_id
from service.schemas import (
    ActivateRequest,
    ActivateResponse,
    ErrorResponse,
    RevertRequest,
    RevertResponse,
    VersionList,
    VersionOut,
)
from service.security import Principal, require_role

router = APIRouter(prefix="/versions", tags=["versions"])
documents_router = APIRouter(prefix="/documents", tags=["versions"])
ReadDep = Annotated[Principal, Depends(require_role("read"))]
AdminDep = Annotated[Principal, Depends(require_role("admin"))]
VersionId = Annotated[int, Path(ge=0, le=10**15, description="version id (the base model is 0)")]


def version_out(m: dict[str, Any]) -> VersionOut:
    slots = m.get("slots_changed") or {}
    state = m.get("state", "retained")
    reach = (m.get("evaluation") or {}).get("reach")
    return VersionOut(
        id=int(m["id"]),
        parent=m.get("parent"),
        created_at=m.get("created_at"),
        job_id=m.get("job_id"),
        documents=list(m.get("documents") or []),
        slots_changed=int(slots.get("total", 0)) if isinstance(slots, dict) else int(slots or 0),
        reach=reach.get("share") if isinstance(reach, dict) else None,
        evaluation={k: v for k, v in (m.get("evaluation") or {}).items() if k != "probe_answered"},
        active=bool(m.get("active")),
        state=state if state in ("active", "retained", "rejected") else "rejected",  # corrupt: never served
        label=m.get("kind") if m.get("kind") not in (None, "update", "base") else None,
    )


@router.get("", response_model=VersionList, summary="Every version, oldest first")
async def list_versions(store: StoreDep, _: ReadDep) -> VersionList:
    def work() -> VersionList:
        return VersionList(active=store.active(), versions=[version_out(m) for m in store.versions()])

    return await asyncio.to_thread(work)


def _manifest_out(store, v: int) -> VersionOut:
    try:
        for m in store.versions():
            if int(m["id"]) == v:
                if m.get("state") == "corrupt":
                    raise ApiError(409, "version_corrupt", str(m.get("error")), "version_id")
                return version_out(m)
    except StoreError as e:
        raise ApiError(503, "store_unavailable", str(e), None) from None
    raise ApiError(404, "version_not_found", f"version {v} does not exist", "version_id")


@router.get("/{version_id}", response_model=VersionOut, summary="One version's manifest")
async def get_version(version_id: VersionId, store: StoreDep, _: ReadDep) -> VersionOut:
    return await asyncio.to_thread(_manifest_out, store, version_id)


@router.post(
    "/{version_id}/activate",
    response_model=ActivateResponse,
    summary="Activate a retained version (rollback / roll-forward); this replica swaps before answering",
    responses={
        404: {"model": ErrorResponse, "description": "no such version"},
        409: {"model": ErrorResponse, "description": "rejected or corrupted version"},
    },
)
async def activate_version(
    version_id: VersionId,
    store: StoreDep,
    engine: EngineDep,
    principal: AdminDep,
    body: Annotated[ActivateRequest | None, Body()] = None,
) -> ActivateResponse:
    why = (body.why if body else None) or "activated through the API"

    def work() -> ActivateResponse:
        try:
            res = store.activate(version_id, who=principal.name, why=why, force=bool(body and body.force))
        except UnknownVersionError:
            raise ApiError(
                404, "version_not_found", f"version {version_id} does not exist", "version_id"
            ) from None
        except CorruptVersionError as e:
            raise ApiError(409, "version_corrupt", str(e), "version_id") from None
        except StoreError as e:
            raise ApiError(409, "version_not_activatable", str(e), "version_id") from None
        engine.switch_to(res["to"])
        return ActivateResponse(active=res["to"], previous=res["from"])

    return await asyncio.to_thread(work)


@router.post(
    "/{version_id}/revert",
    response_model=ActivateResponse,
    summary="Undo one version of the active chain exactly (publishes a 'revert' version)",
    responses={
        409: {
            "model": ErrorResponse,
            "description": "later versions rewrote its slots, or it is not in the active chain",
        }
    },
)
async def revert_version(
    version_id: VersionId,
    store: StoreDep,
    engine: EngineDep,
    principal: AdminDep,
    body: Annotated[RevertRequest | None, Body()] = None,
) -> ActivateResponse:
    def work() -> ActivateResponse:
        prev = store.active()
        try:
            v = store.revert(version_id, who=principal.name, why=(body.why if body else None) or "")
        except UnknownVersionError:
            raise ApiError(
                404, "version_not_found", f"version {version_id} does not exist", "version_id"
            ) from None
        except (RevertConflict, StoreError) as e:
            raise ApiError(409, "revert_conflict", str(e), "version_id") from None
        engine.switch_to(v)
        return ActivateResponse(active=v, previous=prev)

    return await asyncio.to_thread(work)


@documents_router.post(
    "/{document_id}/revert",
    response_model=RevertResponse,
    summary="Undo a document: exact when it had its own version, else revert + retrain the others",
    responses={
        200: {"description": "reverted exactly"},
        202: {"description": "its version was reverted and a retrain job of the other documents queued"},
        404: {"model": ErrorResponse, "description": "the document is not taught by the active version"},
    },
)
async def revert_document(
    document_id: str,
    store: StoreDep,
    engine: EngineDep,
    dispatcher: DispatcherDep,
    settings: SettingsDep,
    principal: AdminDep,
    body: Annotated[RevertRequest | None, Body()] = None,
):
    validate_id(document_id, "document_id")
    from workers.operations import revert_document as do_revert

    def work() -> dict[str, Any]:
        try:
            return do_revert(
                store,
                document_id,
                who=principal.name,
                why=(body.why if body else None) or "",
                settings=settings,
                run=False,
            )
        except RevertConflict as e:
            raise ApiError(409, "revert_conflict", str(e), "document_id") from None
        except DocumentNotTaught as e:
            raise ApiError(404, "document_not_found", str(e), "document_id") from None
        except StoreError as e:
            raise ApiError(409, "revert_failed", str(e), "document_id") from None

    out = await asyncio.to_thread(work)
    await asyncio.to_thread(engine.switch_to, store.active())
    if out.get("job_id"):
        dispatcher.notify(out["job_id"])
    resp = RevertResponse(
        document=document_id,
        status="queued" if out.get("job_id") else "reverted",
        version=store.active(),
        job_id=out.get("job_id"),
    )
    return JSONResponse(resp.model_dump(), status_code=202 if out.get("job_id") else 200)
