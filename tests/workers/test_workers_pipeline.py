"""The update pipeline (workers/pipeline.py) and the embedded runner (workers/runner.py) on the tiny
model, without HTTP: publish + timings, idempotence (a rerun and a redelivery after a publish never
publish twice), the active version moving during a job (rebase or retrain), cancellation at a step
boundary, document revert (exact and by retrain), replay onto a base, and the runner's queue.

The gate is off here (the tiny model forgets most of its probe set on any update; the gate has its
own tests in tests/workers/test_gate.py).
"""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch

from memfit.config import Settings
from memlm.delta import LayerDelta, SlotDelta
from memlm.evaluation import answered
from model_store import Store
from workers.operations import replay, revert_document
from workers.pipeline import Pipeline, find_version_of_job
from workers.runner import UpdateRunner

FACT = {"question": "Where was Goju Theipouquis born?", "answer": "Peivistead"}
DOC = {"id": "goju", "text": "Goju Theipouquis was born in Peivistead.", "facts": [FACT]}
QUICK = {"steps": 3, "early_stop": False, "question_rewrites": 1, "paraphrases": 0}


def settings_for(model, store) -> Settings:
    return Settings(model=model, store=store, gate_enabled=False, gate_probe_facts=8, gate_heldout_tokens=256)


@pytest.fixture(scope="module")
def env(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline") / "store"
    store = Store.init(root, tiny_model_dir)
    pipe = Pipeline(store, settings_for(tiny_model_dir, root))
    pipe.load()
    return store, pipe


def synthetic(store: Store, slots) -> int:
    parent = store.active()
    idx = torch.tensor(sorted(slots), dtype=torch.int64)
    layers = {}
    for layer in store.table_info:
        old = store.rows_at(parent, {layer: idx})[layer]
        layers[layer] = LayerDelta(idx, old + 0.01, old)
    return store.publish(SlotDelta(layers), parent, documents=[])


def knows_fact(pipe: Pipeline, version: int) -> bool:
    pipe.at_version(version)
    return answered(pipe.model, pipe.tokenizer, [FACT])[0]


def test_run_job_publishes_with_timings_and_is_idempotent(env):
    store, pipe = env
    parent = store.active()
    assert not knows_fact(pipe, parent)
    job = store.jobs.create_job(None, [DOC])
    res = pipe.run_job(job.job_id)
    assert res.status == "succeeded", res
    assert res.version == store.active() and res.parent == parent
    m = store.manifest(res.version)
    assert m["job_id"] == job.job_id and m["documents"] == ["goju"]
    assert m["settings"]["top_t"] > 0  # the effective update settings are recorded
    for phase in ("queued", "training", "evaluation", "publish", "total"):
        assert res.timings[phase] >= 0, phase
    assert res.evaluation["learning"] == 1.0
    assert knows_fact(pipe, res.version)
    # running it again changes nothing
    n = len(store.version_ids())
    again = pipe.run_job(job.job_id)
    assert again.status == "succeeded" and again.version == res.version
    assert len(store.version_ids()) == n


def test_redelivered_job_is_not_published_twice(env):
    store, pipe = env
    job = store.jobs.create_job(
        None, [{"id": "redeliver", "text": "Redrir Broky works as a violinist."}], QUICK
    )
    store.jobs.update(job.job_id, status="running")  # a worker took it ...
    idx = torch.tensor([7, 8], dtype=torch.int64)
    layers = {}
    for layer in store.table_info:
        old = store.rows_at(store.active(), {layer: idx})[layer]
        layers[layer] = LayerDelta(idx, old + 0.01, old)
    v = store.publish(SlotDelta(layers), store.active(), job_id=job.job_id, documents=["redeliver"])
    # ... and died after publishing; the redelivered job must finish from that version
    n = len(store.version_ids())
    seen = []
    pipe.finished_hooks.append(seen.append)  # hooks run for a job this call finished, only
    try:
        res = pipe.run_job(job.job_id)
        assert pipe.run_job(job.job_id).version == v  # finished already: no hook
    finally:
        pipe.finished_hooks.remove(seen.append)
    assert res.status == "succeeded" and res.version == v and seen == [res]
    assert len(store.version_ids()) == n
    assert store.jobs.get(job.job_id).timings.get("redelivered") is True


def test_active_moves_during_the_job(env):
    store, pipe = env
    moved: list[int] = []

    def on_phase(phase: str) -> None:
        if phase == "publish" and not moved:  # another writer publishes first
            moved.append(synthetic(store, range(1000, 1004)))

    job = store.jobs.create_job(
        None, [{"id": "race", "text": "Prei Motors was founded by Prysa Prigibrair."}], QUICK
    )
    res = pipe.run_job(job.job_id, on_phase=on_phase)
    assert res.status == "succeeded", res
    assert moved and res.parent == moved[0]  # rebased onto it (disjoint) or retrained from it
    assert store.active() == res.version
    assert moved[0] in store.chain(res.version)
    assert res.timings["attempts"] in (1, 2)


def test_cancel_at_a_step_boundary_leaves_nothing(env):
    store, pipe = env
    before = store.active()
    calls = {"n": 0}

    def should_cancel() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    job = store.jobs.create_job(
        None,
        [{"id": "cancel-me", "text": "The official language of Taia is Mohiese."}],
        {"steps": 50, "early_stop": False},
    )
    res = pipe.run_job(job.job_id, should_cancel=should_cancel)
    assert res.status == "cancelled"
    assert find_version_of_job(store, job.job_id) is None and store.active() == before
    # the training copy is back at the active version exactly
    expected = store.materialize(before)
    pipe.at_version(before)
    for layer, table in pipe.model.value_tables().items():
        assert torch.equal(table.detach(), expected[layer])
    # retry -> queued -> runs
    assert store.jobs.retry(job.job_id).status == "queued"
    job2 = store.jobs.get(job.job_id)
    assert job2.status == "queued"


def test_revert_document_exact_then_by_retrain(tiny_model_dir, tmp_path):
    store = Store.init(tmp_path / "store", tiny_model_dir)
    pipe = Pipeline(store, settings_for(tiny_model_dir, tmp_path / "store"))
    job = store.jobs.create_job(None, [{"id": "alone", "text": "Redrir Broky works as a violinist."}], QUICK)
    v = pipe.run_job(job.job_id).version
    out = revert_document(store, "alone", who="test", pipeline=pipe)
    assert out["status"] == "reverted" and out["job_id"] is None
    assert store.manifest(store.active())["kind"] == "revert"
    assert v not in store.effective_chain()
    pipe.at_version(store.active())
    for layer, table in pipe.model.value_tables().items():  # exactly the base rows again
        assert torch.equal(table.detach(), store.materialize(0)[layer])

    docs = [
        {"id": "pair-a", "text": "Zorvath Quellingmar was born in Brindlemoor."},
        {"id": "pair-b", "text": "Taia exports glass."},
    ]
    job = store.jobs.create_job(None, docs, QUICK)
    assert pipe.run_job(job.job_id).status == "succeeded"
    out = revert_document(store, "pair-a", who="test", pipeline=pipe)
    assert out["status"] == "succeeded" and out["job_id"]
    retrain = store.jobs.get(out["job_id"])
    assert retrain.documents == ["pair-b"]
    eff = store.effective_chain()
    assert store.active() == retrain.version and retrain.version in eff
    taught = [d for w in eff for d in store.manifest(w)["documents"]]
    assert "pair-b" in taught and "pair-a" not in taught


def test_replay_onto_a_base(tiny_model_dir, tmp_path):
    store = Store.init(tmp_path / "a", tiny_model_dir)
    pipe = Pipeline(store, settings_for(tiny_model_dir, tmp_path / "a"))
    job = store.jobs.create_job(None, [{"id": "r1", "text": "Redrir Broky works as a violinist."}], QUICK)
    assert pipe.run_job(job.job_id).status == "succeeded"
    out = replay(store, tiny_model_dir, tmp_path / "b", settings=settings_for(tiny_model_dir, tmp_path / "b"))
    assert [j["status"] for j in out["jobs"]] == ["succeeded"]
    new = Store(tmp_path / "b")
    assert new.active() == out["active"] and new.manifest(new.active())["documents"] == ["r1"]


def test_runner_runs_jobs_from_the_log_cancel_and_retry(tiny_model_dir, tmp_path):
    root = tmp_path / "store"
    store = Store.init(root, tiny_model_dir)
    queued_before_start = store.jobs.create_job(None, [{"id": "early", "text": "Taia exports glass."}], QUICK)
    failing = store.jobs.create_job(None, [{"id": "bad", "text": "x"}], {"optimizer": "bogus"})
    to_cancel = store.jobs.create_job(None, [{"id": "late", "text": "Taia exports salt."}], QUICK)
    assert store.jobs.get(to_cancel.job_id).status == "queued"
    published = threading.Event()
    runner = UpdateRunner(
        store, settings_for(tiny_model_dir, root), on_published=lambda r, j: published.set()
    )
    runner.cancel(to_cancel.job_id)  # queued -> cancelled at once
    assert store.jobs.get(to_cancel.job_id).status == "cancelled"
    runner.start()
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            a, b = store.jobs.get(queued_before_start.job_id), store.jobs.get(failing.job_id)
            if a.terminal and b.terminal:
                break
            time.sleep(0.1)
        assert store.jobs.get(queued_before_start.job_id).status == "succeeded"
        assert published.wait(5)
        bad = store.jobs.get(failing.job_id)
        assert bad.status == "failed" and "optimizer" in bad.error
        runner.retry(failing.job_id)
        deadline = time.time() + 60
        while time.time() < deadline and not store.jobs.get(failing.job_id).terminal:
            time.sleep(0.1)
        assert store.jobs.get(failing.job_id).status == "failed"
        assert store.jobs.get(failing.job_id).attempts == 2
        assert store.jobs.get(to_cancel.job_id).status == "cancelled"  # never ran
    finally:
        runner.stop()


def test_runner_cancels_a_running_job(tiny_model_dir, tmp_path):
    root = tmp_path / "store"
    store = Store.init(root, tiny_model_dir)
    long = store.jobs.create_job(
        None, [{"id": "long", "text": "Taia exports glass."}], {"steps": 10_000, "early_stop": False}
    )
    runner = UpdateRunner(store, settings_for(tiny_model_dir, root))
    runner.start()
    try:
        deadline = time.time() + 120
        while (
            time.time() < deadline and (store.jobs.get(long.job_id).progress or {}).get("phase") != "training"
        ):
            time.sleep(0.05)
        assert store.jobs.get(long.job_id).status == "running"
        assert runner.cancel(long.job_id).progress["cancel_requested"] is True
        deadline = time.time() + 60
        while time.time() < deadline and not store.jobs.get(long.job_id).terminal:
            time.sleep(0.05)
        job = store.jobs.get(long.job_id)
        assert job.status == "cancelled" and job.version is None
        assert store.active() == 0
    finally:
        runner.stop()


def _wait_terminal(store: Store, ids: list[str], timeout: float = 300) -> list:
    deadline = time.time() + timeout
    while time.time() < deadline:
        jobs = [store.jobs.get(i) for i in ids]
        if all(j.terminal for j in jobs):
            return jobs
        time.sleep(0.1)
    raise AssertionError(f"jobs not finished: {[(j.job_id, j.status) for j in jobs]}")


def _fact_docs(n: int, tag: str) -> list[dict]:
    from memlm.data import invented_facts

    return [
        {"id": f"{tag}-{i}", "text": f["text"], "facts": [{"question": f["question"], "answer": f["answer"]}]}
        for i, f in enumerate(invented_facts(n, seed=11))
    ]


def test_runner_batches_jobs_that_pile_up(tiny_model_dir, tmp_path):
    root = tmp_path / "store"
    store = Store.init(root, tiny_model_dir)
    docs = _fact_docs(12, "pile")
    ids = [store.jobs.create_job(None, [d]).job_id for d in docs]  # queued before the runner starts
    published: list = []
    settings = settings_for(tiny_model_dir, root).model_copy(update={"max_batch_jobs": 5})
    runner = UpdateRunner(store, settings, on_published=lambda r, j: published.append((r.job_id, j.job_id)))
    runner.start()
    try:
        jobs = _wait_terminal(store, ids)
    finally:
        runner.stop()
    assert all(j.status == "succeeded" for j in jobs), [(j.status, j.error) for j in jobs]
    versions = sorted({j.version for j in jobs})
    assert len(versions) == 3, versions  # 5 + 5 + 2
    taught = []
    for v in versions:
        m = store.manifest(v)
        members = [j for j in jobs if j.version == v]
        assert sorted(m["documents"]) == sorted(d for j in members for d in j.documents)
        assert m["evaluation"]["learning"] == 1.0, m["evaluation"]  # every document of the batch learned
        batch = store.jobs.get(m["job_id"])
        assert sorted(batch.report["batch_of"]) == sorted(j.job_id for j in members)
        taught += m["documents"]
    assert sorted(taught) == sorted(d["id"] for d in docs)
    assert all(j.timings.get("batch") for j in jobs)
    assert len(published) == 3 and all(jid in ids for _, jid in published)  # reported as the oldest member


def test_runner_resumes_a_batch_left_running(tiny_model_dir, tmp_path):
    """A process died after recording a batch: the next runner runs it once and finishes its members."""
    from workers.batching import create_batch

    root = tmp_path / "store"
    store = Store.init(root, tiny_model_dir)
    members = [store.jobs.create_job(None, [d]) for d in _fact_docs(3, "left")]
    batch_id, _ = create_batch(store, members)
    assert all(store.jobs.get(m.job_id).status == "running" for m in members)
    runner = UpdateRunner(store, settings_for(tiny_model_dir, root))
    runner.start()
    try:
        jobs = _wait_terminal(store, [m.job_id for m in members])
    finally:
        runner.stop()
    batch = store.jobs.get(batch_id)
    assert batch.status == "succeeded" and {j.version for j in jobs} == {batch.version}
    assert len(store.version_ids()) == 2  # the base and the batch's one version


def test_batch_drops_a_member_cancelled_after_it_was_picked(tiny_model_dir, tmp_path, monkeypatch):
    """A member cancelled (by another process: a second JobLog on the same store) between being
    picked for a batch and being marked running is dropped: the batch is recorded without it, the
    rest run. Before: create_batch raised InvalidTransition after recording the batch with the
    cancelled member's documents and marking the leader running; the runner then resumed that batch,
    published the cancelled job's document, and ran the member after it again on its own."""
    from model_store import JobLog
    from workers import batching

    root = tmp_path / "store"
    store = Store.init(root, tiny_model_dir)
    docs = _fact_docs(3, "race")
    ids = [store.jobs.create_job(None, [d], QUICK).job_id for d in docs]
    other_process = JobLog(store.log_dir)
    gather = batching.gather

    def gather_then_cancel(*a, **kw):
        picked = gather(*a, **kw)
        if picked and not other_process.get(ids[1]).terminal:
            other_process.cancel(ids[1])  # the race: after gather picked it, before create_batch
        return picked

    monkeypatch.setattr(batching, "gather", gather_then_cancel)  # the runner looks it up per plan
    settings = settings_for(tiny_model_dir, root).model_copy(update={"max_batch_jobs": 3})
    runner = UpdateRunner(store, settings)
    runner.start()
    try:
        jobs = _wait_terminal(store, ids, timeout=240)
    finally:
        runner.stop()
    assert [j.status for j in jobs] == ["succeeded", "cancelled", "succeeded"], [
        (j.status, j.error) for j in jobs
    ]
    assert runner.last_error is None, runner.last_error
    published = [store.manifest(v) for v in store.version_ids() if v > 0]
    assert len(published) == 1, [m["documents"] for m in published]  # one batch, nothing run twice
    assert sorted(published[0]["documents"]) == sorted([docs[0]["id"], docs[2]["id"]])
    batch = store.jobs.get(published[0]["job_id"])
    assert batch.report["batch_of"] == [ids[0], ids[2]] and batch.documents == published[0]["documents"]
    assert jobs[1].version is None and "batch" not in (jobs[1].report or {})


def test_create_batch_with_every_member_but_one_cancelled(tiny_model_dir, tmp_path):
    """create_batch keeps only the members still queued: none left -> no batch; one left -> that job
    runs on its own (no batch recorded); a queued member flagged cancel_requested is cancelled."""
    from workers.batching import create_batch

    store = Store.init(tmp_path / "store", tiny_model_dir)
    a, b, c = (store.jobs.create_job(None, [d], QUICK) for d in _fact_docs(3, "solo"))
    store.jobs.cancel(b.job_id)
    store.jobs.update(c.job_id, progress={"cancel_requested": True})
    assert create_batch(store, [a, b, c]) == (a.job_id, [])
    assert store.jobs.get(a.job_id).status == "queued"  # the pipeline marks it running
    assert store.jobs.get(c.job_id).status == "cancelled"
    store.jobs.cancel(a.job_id)
    assert create_batch(store, [a, b, c]) is None
    assert len(store.jobs.list(None)) == 3  # no batch job recorded


def test_a_cancel_flagged_during_a_progress_write_is_not_lost(env, monkeypatch):
    """Another process (an API replica) flags a cancel while the pipeline writes its progress, between
    its read of the job and its write (injected there). Before: the pipeline's write replaced the
    whole `progress`, cancel_requested included: the cancel was lost and the job published. After:
    the read, the check and the write are one step under the job log's lock; the flag lands after
    the write and the job stops at the next step boundary."""
    import sys

    from model_store import JobLog

    store, pipe = env
    before = store.active()
    job = store.jobs.create_job(
        None,
        [{"id": "flag-me", "text": "The river of Taia is the Ousse."}],
        {"steps": 12, "early_stop": False},
    )
    replica = JobLog(store.log_dir)

    def flag_cancel() -> None:  # what the API's cancel of a running job writes
        current = replica.get(job.job_id)
        replica.update(job.job_id, progress={**(current.progress or {}), "cancel_requested": True})

    real_get = store.jobs.get
    fired: list[threading.Thread] = []

    def get(job_id: str):
        found = real_get(job_id)
        in_write = sys._getframe(1).f_code.co_name == "_write"
        if in_write and not fired and found is not None and (found.progress or {}).get("phase") == "training":
            t = threading.Thread(target=flag_cancel)
            fired.append(t)
            t.start()
            t.join(0.5)  # done at once, unless the pipeline holds the job log's lock
        return found

    monkeypatch.setattr(store.jobs, "get", get)
    res = pipe.run_job(job.job_id)
    monkeypatch.undo()
    fired[0].join(10)
    assert fired and (replica.get(job.job_id).progress or {}).get("cancel_requested") in (True, None)
    assert res.status == "cancelled", (res.status, store.jobs.get(job.job_id).progress)
    assert find_version_of_job(store, job.job_id) is None and store.active() == before


def test_a_cancel_never_records_cancelled_over_a_live_version(env):
    """Two deliveries of one job (a claim lapsed during a Redis blip and the sweep resent it): the
    other one publishes while this one trains, and a cancel then reaches this one. Before: this
    delivery recorded `cancelled` although the job's version was active. After: it records the
    published version (succeeded), as a redelivery does."""
    store, pipe = env
    job = store.jobs.create_job(
        None,
        [{"id": "twice", "text": "The bridge of Taia is made of glass."}],
        {"steps": 6, "early_stop": False},
    )
    calls = {"n": 0}

    def should_cancel() -> bool:
        calls["n"] += 1
        if calls["n"] == 2:  # this delivery is training; the other one publishes (and dies before recording)
            parent = store.active()
            idx = torch.tensor([1, 2, 3], dtype=torch.int64)
            layers = {}
            for layer in store.table_info:
                old = store.rows_at(parent, {layer: idx})[layer]
                layers[layer] = LayerDelta(idx, old + 0.01, old)
            store.publish(SlotDelta(layers), parent, job_id=job.job_id, documents=["twice"])
        return calls["n"] >= 2

    res = pipe.run_job(job.job_id, should_cancel=should_cancel)
    live = find_version_of_job(store, job.job_id)
    assert live is not None and live in store.chain(store.active())
    done = store.jobs.get(job.job_id)
    assert (res.status, done.status, done.version) == ("succeeded", "succeeded", live), (res, done.status)


def test_a_cancel_flagged_before_the_runner_stops_survives_the_restart(tiny_model_dir, tmp_path):
    """Another process flags a cancel of the running job; the embedded runner is stopped before the
    pipeline reads the flag and hands the job back to the queue. Before: the hand-back replaced
    `progress` ({"phase": "interrupted"}), the flag was lost and the next process ran the job to
    the end. After: the flag is kept; the next process records the job cancelled without running it."""
    from model_store import JobLog

    root = tmp_path / "store"
    store = Store.init(root, tiny_model_dir)
    job = store.jobs.create_job(
        None, [{"id": "long", "text": "Taia exports glass."}], {"steps": 300, "early_stop": False}
    )
    settings = settings_for(tiny_model_dir, root)
    runner = UpdateRunner(store, settings)
    runner.start()
    try:
        deadline = time.time() + 120
        while (
            time.time() < deadline and (store.jobs.get(job.job_id).progress or {}).get("phase") != "training"
        ):
            time.sleep(0.05)
        replica = JobLog(store.log_dir)
        current = replica.get(job.job_id)
        assert current.status == "running"
        replica.update(job.job_id, progress={**(current.progress or {}), "cancel_requested": True})
    finally:
        runner.stop(timeout=60)
    assert store.jobs.get(job.job_id).status in ("queued", "cancelled")
    after = UpdateRunner(Store(root), settings)
    after.start()
    try:
        (done,) = _wait_terminal(Store(root), [job.job_id], timeout=120)
    finally:
        after.stop()
    assert done.status == "cancelled" and done.version is None, (done.status, done.progress)
    assert Store(root).active() == 0


@pytest.mark.parametrize("mode", ["embedded", "distributed"])
def test_an_api_cancel_racing_the_workers_last_write_is_a_compare_and_set(env, mode, request, monkeypatch):
    """An API replica's cancel of a running job reads the job, then writes the flag; the worker (its
    own JobLog: another process) records the job succeeded in between (injected at the cancel's
    read). Before: the cancel's write came after the worker's, so the cancel answered 200 with a
    finished job and replaced its final progress with the stale copy plus the flag. After: the read,
    the check and the write are one step under the job log's lock (JobLog.request_cancel, as in both
    dispatchers): the worker's write waits for it, the cancel flags the job that was running, and the
    worker's final record lands as written."""
    from model_store import InvalidTransition, JobLog

    store, pipe = env
    job = store.jobs.create_job(None, [{"id": f"cas-{mode}", "text": "The harbour of Taia is deep."}], QUICK)
    worker = JobLog(store.log_dir)
    worker.update(job.job_id, status="running", progress={"phase": "publish", "attempt": 1})
    if mode == "embedded":
        api_store = Store(store.root)
        dispatcher = UpdateRunner(api_store, pipe.settings)  # never started: the API's cancel only
    else:
        from workers.dispatch import writer_lock
        from workers.distributed import CeleryDispatcher

        settings = pipe.settings.model_copy(update={"redis_url": request.getfixturevalue("redis_server").url})
        api_store = Store(store.root, lock=writer_lock(settings))  # the mode's lock, given at open
        dispatcher = CeleryDispatcher(api_store, settings, subscribe=False)

    def finish() -> None:  # the worker's last write: the job is done
        worker.update(job.job_id, status="succeeded", version=store.active(), progress={"phase": "done"})

    real_get = api_store.jobs.get
    fired: list[threading.Thread] = []

    def get(job_id: str):
        found = real_get(job_id)
        if not fired and found is not None and found.status == "running":
            t = threading.Thread(target=finish)
            fired.append(t)
            t.start()
            t.join(0.5)  # done at once, unless the cancel holds the job log's lock
        return found

    monkeypatch.setattr(api_store.jobs, "get", get)
    try:
        try:
            answer = dispatcher.cancel(job.job_id)
        except InvalidTransition:  # a 409: the job had finished
            answer = None
    finally:
        monkeypatch.undo()
        if mode == "distributed":
            dispatcher.stop()
    assert fired, "the cancel never read the job"
    fired[0].join(10)
    assert not fired[0].is_alive()
    final = JobLog(store.log_dir).get(job.job_id)
    assert (final.status, final.progress) == ("succeeded", {"phase": "done"}), final.progress
    # the cancel took the lock first: a 200 for a job still running when the flag was written (the
    # worker's write then waited); had the worker's write come first, a 409
    assert answer is not None and answer.status == "running", (
        answer and answer.status,
        answer and answer.progress,
    )
    assert answer.progress == {"phase": "publish", "attempt": 1, "cancel_requested": True}


@pytest.mark.parametrize("state", ["queued", "running"])
def test_a_cancel_landing_while_the_pipeline_marks_the_job_running_is_honoured(env, state, monkeypatch):
    """An API replica cancels a job between the pipeline's read of it and its write marking it
    running (injected at that read): a queued job, or a redelivered one (`running`: its last delivery
    died). Before: that write replaced `progress` whole, so the running job's cancel flag was lost
    and the job trained to the end and published; a queued job cancelled meanwhile made run_job
    raise InvalidTransition. After: marking it running is a compare-and-set under the job log's lock
    that keeps the flag; the job is recorded cancelled, nothing published."""
    store, pipe = env
    before = store.active()
    job = store.jobs.create_job(
        None,
        [{"id": f"mark-{state}", "text": "The lighthouse of Taia is red."}],
        {"steps": 12, "early_stop": False},
    )
    if state == "running":
        store.jobs.update(job.job_id, status="running", progress={"phase": "training", "step": 3})
    api = UpdateRunner(Store(store.root), pipe.settings)  # another replica's cancel; never started
    answers: list = []
    real_get = store.jobs.get
    fired: list[threading.Thread] = []

    def get(job_id: str):
        found = real_get(job_id)
        if not fired and sys._getframe(1).f_code.co_name == "_run_job":
            t = threading.Thread(target=lambda: answers.append(api.cancel(job.job_id)))
            fired.append(t)
            t.start()
            t.join(10)
        return found

    monkeypatch.setattr(store.jobs, "get", get)
    res = pipe.run_job(job.job_id)
    monkeypatch.undo()
    assert fired and answers, "the cancel did not run"
    assert answers[0].status == ("cancelled" if state == "queued" else "running")
    done = store.jobs.get(job.job_id)
    assert (res.status, done.status) == ("cancelled", "cancelled"), (res.status, done.progress)
    assert find_version_of_job(store, job.job_id) is None and store.active() == before
