"""Two API replicas of one store (distributed mode: a private redis-server, no worker) racing on one
Idempotency-Key create one job (issue 17). Before, each replica checked the key under its own
threading lock and appended to the shared job log: concurrent retries sent to both replicas could
create the job twice. The job log's file lock now spans the check and the append.
"""

from __future__ import annotations

import threading

import pytest

from tests.workers.test_distributed import FAST_ENV, Server

pytestmark = pytest.mark.integration


def test_two_replicas_racing_on_one_key_create_one_job(redis_server, tiny_model_dir, tmp_path):
    from model_store import Store

    root = tmp_path / "store"
    store = Store.init(root, tiny_model_dir)
    env = {**FAST_ENV, "MEMFIT_HOME": str(tmp_path / "home"), "MEMFIT_REDIS_URL": redis_server.url}
    a = Server("api-a", tiny_model_dir, root, env, tmp_path)
    b = Server("api-b", tiny_model_dir, root, env, tmp_path)
    rounds, per_replica = 8, 3
    try:
        a.wait_ready(180)
        b.wait_ready(180)
        for r in range(rounds):
            barrier = threading.Barrier(2 * per_replica)
            answers: list = []

            def send(server: Server, r: int = r, barrier=barrier, answers=answers) -> None:
                doc = {"id": f"race-{r}", "text": f"Round {r}: Taia exports glass."}
                barrier.wait()
                answers.append(server.ingest([doc], key=f"race-key-{r}"))

            threads = [threading.Thread(target=send, args=(s,)) for s in (a, b) * per_replica]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert all(x.status_code == 202 for x in answers), [x.text for x in answers]
            ids = {x.json()["job_id"] for x in answers}
            assert len(ids) == 1, (r, ids)  # one job, whichever replica each retry reached
            fresh = [x for x in answers if "Idempotent-Replayed" not in x.headers]
            assert len(fresh) == 1, (r, len(fresh))
        jobs = store.jobs.list(limit=None)
        assert len(jobs) == rounds and store.jobs.invalid_transitions == 0
    finally:
        a.stop()
        b.stop()
