"""Operator flows on top of the pipeline: undo one document (`memfit revert --document`,
POST /documents/{id}/revert) and re-teach a store's documents to a new base (`memfit replay`).

Each is a store operation plus, where it needs training, jobs run through `workers.pipeline.Pipeline`
like any update; nothing here trains by itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from memfit.config import Settings
from model_store import NeedsRetrain, Store

from .pipeline import Pipeline
from .update_settings import update_settings_fields


def default_settings() -> Settings:
    """Settings from the environment (MEMFIT_*), for callers that give none (the CLI)."""
    return Settings()


def revert_document(
    store: Store,
    doc_id: str,
    who: str = "operator",
    why: str = "",
    settings: Settings | None = None,
    pipeline: Pipeline | None = None,
    run: bool = True,
) -> dict[str, Any]:
    """Undo document `doc_id` on the active version.

    Exact when the document was alone in its version(s): those versions are reverted (new active
    versions labelled "revert"). Otherwise its version is reverted exactly and the other documents of
    that version are queued as a new job (trained on top; `run=True` runs it here with `pipeline`, or
    a fresh Pipeline). Returns {"document", "status": "reverted"|"queued"|"succeeded"|..., "versions",
    "job_id"}.
    """
    settings = settings if settings is not None else default_settings()
    try:
        versions = store.revert_document(doc_id, who=who, why=why)
        return {"document": doc_id, "status": "reverted", "versions": versions, "job_id": None}
    except NeedsRetrain as e:
        v_rev = store.revert(e.version, who=who, why=why or f"revert document {doc_id} (version {e.version})")
        remaining = [
            {
                "id": r["id"],
                "text": r["text"],
                "facts": r.get("facts") or [],
                "metadata": r.get("metadata") or {},
            }
            for r in e.remaining_documents
        ]
        out: dict[str, Any] = {"document": doc_id, "versions": [v_rev], "job_id": None, "status": "reverted"}
        if not remaining:
            return out
        overrides = {k: v for k, v in (e.settings or {}).items() if k in update_settings_fields()}
        job = store.jobs.create_job(None, remaining, settings=overrides)
        out.update(job_id=job.job_id, status="queued")
        if run:
            p = pipeline or Pipeline(store, settings)
            res = p.run_job(job.job_id)
            out.update(
                status=res.status, versions=[v_rev] + ([res.version] if res.version is not None else [])
            )
        return out


def replay(
    store: Store,
    onto_dir: str | Path,
    out_dir: str | Path,
    settings: Settings | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Re-teach the active chain's documents, version by version, to a new base model.

    Creates a store at `out_dir` whose base is `onto_dir` (its background statistics are computed
    when missing), then one job per version of the active chain (same documents, same settings), run
    in order through the pipeline. Returns {"store", "jobs": [{"from_version", "job_id", "status",
    "version"}], "active"}.
    """
    from memlm.background import BACKGROUND_FILE

    say = progress or (lambda msg: None)
    settings = settings if settings is not None else default_settings()
    onto = Path(onto_dir)
    if not (onto / BACKGROUND_FILE).exists():
        from memlm.background import compute_for_model_dir

        say(f"computing background statistics for {onto}")
        compute_for_model_dir(onto, progress=False)
    new = Store.init(out_dir, onto)
    known = update_settings_fields()
    by_version: dict[int, list[dict]] = {}
    order: list[int] = []
    for rec in store.active_chain_documents():
        v = int(rec["version"])
        if v not in by_version:
            by_version[v] = []
            order.append(v)
        by_version[v].append(rec)
    pipe = Pipeline(new, settings)
    results = []
    for v in order:
        recs = by_version[v]
        docs = [
            {
                "id": r["id"],
                "text": r["text"],
                "facts": r.get("facts") or [],
                "metadata": r.get("metadata") or {},
            }
            for r in recs
        ]
        overrides = {k: val for k, val in (recs[0].get("settings") or {}).items() if k in known}
        job = new.jobs.create_job(
            None, docs, settings=overrides, idempotency_key=f"replay:{store.base_id[:12]}:{v}"
        )
        say(f"version {v}: {len(docs)} documents -> job {job.job_id}")
        res = pipe.run_job(job.job_id)
        results.append(
            {"from_version": v, "job_id": job.job_id, "status": res.status, "version": res.version}
        )
    return {"store": str(Path(out_dir)), "jobs": results, "active": new.active()}
