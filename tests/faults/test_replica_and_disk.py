"""An API replica SIGKILLed and restarted comes back on the store's active version (also one that is
not the newest); a full disk while publishing fails the update cleanly: the job is `failed` and
retryable, no half-written version becomes visible, the active version is unchanged, and the retry
succeeds once there is room."""

from __future__ import annotations

import os
import shutil
import subprocess

import httpx
import pytest

from model_store import Store
from tests.faults.loadswap import synthetic_delta
from tests.service.conftest import ServerProcess

GENTLE = {
    "optimizer": "adam",
    "top_t": 8,
    "lr": 0.03,
    "steps": 4,
    "early_stop": False,
    "question_rewrites": 1,
    "paraphrases": 0,
}
DOC = {
    "id": "goju",
    "text": "Goju Theipouquis was born in Peivistead.",
    "facts": [{"question": "Where was Goju Theipouquis born?", "answer": "Peivistead"}],
}


def _served_version(c: httpx.Client) -> int:
    r = c.post("/generate", json={"prompt": "The capital of France is", "max_new_tokens": 4})
    assert r.status_code == 200, r.text
    return r.json()["version"]


@pytest.mark.integration
def test_replica_killed_and_restarted_serves_the_active_version(tiny_model_dir, tmp_path):
    root = tmp_path / "store"
    store = Store.init(root, tiny_model_dir)
    v1 = store.publish(synthetic_delta(store, 0, seed=1), 0, documents=["a"])
    v2 = store.publish(synthetic_delta(store, v1, seed=2), v1, documents=["b"])
    first = ServerProcess(tiny_model_dir, root, tmp_path).start()
    with first.client() as c:
        assert _served_version(c) == v2
        r = c.post(f"/versions/{v1}/activate", json={"why": "roll back before the crash"})
        assert r.status_code == 200, r.text
        assert _served_version(c) == v1
    first.kill()  # SIGKILL: no shutdown hook runs
    assert Store(root).active() == v1

    second = ServerProcess(tiny_model_dir, root, tmp_path).start()
    try:
        with second.client() as c:
            ready = c.get("/readyz").json()
            assert ready["active_version"] == v1, ready
            assert _served_version(c) == v1  # not the newest version, the active one
            listing = c.get("/versions").json()
            assert listing["active"] == v1
            assert {v["id"]: v["state"] for v in listing["versions"]}[v2] == "retained"
    finally:
        second.kill()


def _mount_small_fs(path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "memfit-diskfull", str(path)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {out.stderr.strip() or out.returncode}")


def _fill(path) -> int:
    """Fill the filesystem at `path` to the last byte; returns the bytes written."""
    n = 0
    fd = os.open(path / ".filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for chunk in (65536, 4096, 1):
            try:
                while True:
                    n += os.write(fd, b"\0" * chunk)
            except OSError:
                pass
    finally:
        os.close(fd)
    return n


def test_disk_full_while_publishing(tiny_model_dir, tmp_path):
    from memfit.config import Settings
    from workers.pipeline import Pipeline

    root = tmp_path / "store"
    store = Store.init(root, tiny_model_dir)
    versions = store.versions_dir
    saved = tmp_path / "versions-before"
    shutil.copytree(versions, saved)
    _mount_small_fs(versions)  # the store's versions/ on a 2 MB filesystem
    try:
        for p in saved.iterdir():
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, versions / p.name)
        settings = Settings(
            model=tiny_model_dir,
            store=root,
            redis_url=None,
            gate_enabled=False,
            gate_probe_facts=8,
            gate_heldout_tokens=256,
        )
        pipeline = Pipeline(store, settings)
        pipeline.load()
        before_ids, before_active = store.version_ids(), store.active()
        filled = _fill(versions)
        assert filled > 0

        job = store.jobs.create_job(None, [DOC], settings=GENTLE)
        res = pipeline.run_job(job.job_id)

        assert res.status == "failed", res
        failed = store.jobs.get(job.job_id)
        assert failed.status == "failed" and "No space left" in (failed.error or ""), failed.error
        fresh = Store(root)
        assert fresh.version_ids() == before_ids  # nothing half-written became a version
        assert fresh.active() == before_active
        assert not [p.name for p in versions.iterdir() if p.name.isdigit()]
        rep = fresh.verify()
        assert rep["ok"], rep["problems"]
        leftovers = [p.name for p in versions.iterdir() if p.name.startswith(".tmp-")]
        print(f"filled {filled} bytes; job error: {failed.error}; temp dirs left: {leftovers}")

        # room again: the job is retried and succeeds; the failed attempt consumed no version id
        (versions / ".filler").unlink()
        store.jobs.retry(job.job_id)
        res = pipeline.run_job(job.job_id)
        assert res.status == "succeeded", res
        fresh = Store(root)
        assert res.version == max(before_ids) + 1 and fresh.active() == res.version
        assert not [p for p in versions.iterdir() if p.name.startswith(".tmp-")]
        rep = fresh.verify()
        assert rep["ok"], rep["problems"]
    finally:
        subprocess.run(["umount", "-l", str(versions)], capture_output=True)
