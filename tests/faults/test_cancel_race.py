"""Distributed mode: cancels racing a worker (issue 17: "a cancel racing a worker never leaves a
'cancelled' job whose version is live").

A private redis-server, one real `memfit worker` (Celery, solo pool) and one `memfit serve` replica
on one store. Jobs are ingested one at a time through the replica; each is cancelled through
`POST /jobs/{id}/cancel` at another moment of its life: at once (queued, or just picked by the
worker), as soon as it is running, when the worker reports the phase training, evaluation or
publish, or after it finished. The replica's answer is recorded, and at the end the store and its job log are checked:

- every job is finished; no job published more than one version;
- a `cancelled` job published nothing and its `version` is empty (never "cancelled but live");
- a `succeeded` job's version is on the active chain;
- a cancel the log shows before the worker's `publish` phase was honoured: the job is cancelled
  (a flag written while the pipeline read-modified-wrote its progress used to be overwritten);
- a cancel answered `cancelled` ends cancelled; one after the job finished is a 409;
- `verify` is ok.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.workers.test_distributed import FAST_ENV, Proc, Server

pytestmark = pytest.mark.integration

SETTINGS = {"optimizer": "adam", "top_t": 8, "lr": 0.03, "steps": 14, "early_stop": False}
WHEN = ["at_once", "running", "training", "evaluation", "publish", "after"]


def _wait_phase(api: Server, job_id: str, phase: str, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = api.job(job_id)
        if job["status"] not in ("queued", "running") or (job.get("progress") or {}).get("phase") == phase:
            return job
        if phase == "running" and job["status"] == "running":
            return job
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} never reached phase {phase}: {job}")


def _events(log_path, job_id: str) -> list[dict]:
    out = []
    for line in log_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("job_id") == job_id and rec.get("event") == "update":
            out.append(rec.get("fields") or {})
    return out


def test_cancels_racing_a_worker_never_leave_a_cancelled_job_live(redis_server, tiny_model_dir, tmp_path):
    from memlm.data.invented import invented_facts
    from model_store import Store

    root = tmp_path / "store"
    Store.init(root, tiny_model_dir)
    env = {
        **FAST_ENV,
        "MEMFIT_HOME": str(tmp_path / "home"),
        "MEMFIT_REDIS_URL": redis_server.url,
        "MEMFIT_MAX_BATCH_JOBS": "1",  # a member's cancel counts only when every member asks: singles here
    }
    worker = Proc("worker", ["worker", "--model", str(tiny_model_dir), "--store", str(root)], env, tmp_path)
    api = Server("api", tiny_model_dir, root, env, tmp_path)
    facts = invented_facts(2 * len(WHEN), seed=23)
    answers: dict[str, tuple[str, int, dict]] = {}
    try:
        worker.wait_log(" ready.", timeout=180)
        api.wait_ready(180)
        for i, f in enumerate(facts):
            when = WHEN[i % len(WHEN)]
            doc = {
                "id": f"race-{i}",
                "text": f["text"],
                "facts": [{"question": f["question"], "answer": f["answer"]}],
            }
            r = api.ingest([doc], settings=SETTINGS)
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            if when == "after":
                api.wait_jobs([job_id], timeout=120)
            elif when != "at_once":
                _wait_phase(api, job_id, when)
            c = api.http.post(f"/jobs/{job_id}/cancel")
            answers[job_id] = (when, c.status_code, c.json())
            api.wait_jobs([job_id], timeout=120)
    finally:
        api.stop()
        worker.stop()

    store = Store(root)
    chain = set(store.chain(store.active()))
    owners: dict[str, list[int]] = {}
    for v in store.version_ids():
        if v:
            owners.setdefault(str(store.manifest(v).get("job_id")), []).append(v)
    outcomes = []
    for job_id, (when, code, body) in answers.items():
        job = store.jobs.get(job_id)
        mine = owners.get(job_id, [])
        outcomes.append(f"{when}: cancel {code} {body.get('status')} -> {job.status} {mine}")
        assert job.status in ("succeeded", "cancelled"), (when, job)
        assert len(mine) <= 1, (when, mine)
        if job.status == "cancelled":
            assert job.version is None and not mine, (when, job.version, mine)  # never cancelled but live
        else:
            assert mine == [job.version] and job.version in chain, (when, job.version, mine, chain)
        if code == 200 and body["status"] == "cancelled":
            assert job.status == "cancelled", when
        if when == "after":
            assert code == 409, (code, body)
        events = _events(store.jobs.jobs_path, job_id)
        flagged = [k for k, e in enumerate(events) if (e.get("progress") or {}).get("cancel_requested")]
        publish = [k for k, e in enumerate(events) if (e.get("progress") or {}).get("phase") == "publish"]
        if flagged and (not publish or flagged[0] < publish[0]):
            assert job.status == "cancelled", (
                when,
                "a cancel logged before the publish phase was lost",
                events,
            )
    print("\n".join(outcomes))
    assert any(o.split(" -> ")[1].startswith("cancelled") for o in outcomes)
    assert any(o.split(" -> ")[1].startswith("succeeded") for o in outcomes)
    rep = store.verify()
    assert rep["ok"], rep["problems"]
