"""Durability and the gate against live servers: a job queued when the server is SIGKILLed runs after
the restart; an Idempotency-Key retry after the restart returns the same job; a gate rejection is
published as "rejected", never activated."""

from __future__ import annotations

import httpx
import pytest

from memlm.evaluation import is_answered
from model_store import Store
from tests.service.conftest import FACT_ANSWER, FACT_DOC, ask, wait_job

pytestmark = pytest.mark.integration
GATE_OFF = {"MEMFIT_GATE_ENABLED": "false"}


def test_sigkill_with_a_queued_job_then_restart(server_factory):
    first = server_factory(GATE_OFF)
    body = {"documents": [FACT_DOC]}
    with first.client() as c:
        r = c.post("/ingest", json=body, headers={"Idempotency-Key": "survives-restart"})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
    first.kill()  # SIGKILL: no shutdown hooks run
    job = Store(first.store).jobs.get(job_id)
    assert job is not None and job.status in ("queued", "running")  # the 202 came after the fsync

    second = server_factory(GATE_OFF)
    with second.client() as c:
        again = c.post("/ingest", json=body, headers={"Idempotency-Key": "survives-restart"})
        assert again.status_code == 202 and again.json()["job_id"] == job_id
        done = wait_job(c, job_id)
        assert done["status"] == "succeeded", done
        r = ask(c, min_version=done["version"])
        assert is_answered(r.json()["text"], FACT_ANSWER), r.json()
        jobs = [j for j in c.get("/jobs").json()["jobs"] if j["documents"] == [FACT_DOC["id"]]]
        assert len(jobs) == 1
        different = {"documents": [{**FACT_DOC, "text": "Goju Theipouquis was born in Quillton."}]}
        conflict = c.post("/ingest", json=different, headers={"Idempotency-Key": "survives-restart"})
        assert conflict.status_code == 409 and conflict.json()["error"]["field"] == "Idempotency-Key"


def test_gate_rejection_is_published_but_not_activated(server_factory):
    server = server_factory({"MEMFIT_GATE_MAX_FORGETTING": "-1"})  # any update forgets "too much"
    with server.client() as c:
        base = ask(c).json()["version"]
        r = c.post("/ingest", json={"documents": [FACT_DOC], "settings": {"steps": 5}})
        job = wait_job(c, r.json()["job_id"])
        assert job["status"] == "rejected", job
        v = job["version"]
        assert v is not None and "gate_max_forgetting" in job["error"]
        assert job["evaluation"]["gate"]["passed"] is False and job["evaluation"]["gate"]["reasons"]
        assert "forgetting" in job["evaluation"] and "perplexity_change" in job["evaluation"]
        listing = c.get("/versions").json()
        assert listing["active"] == base
        assert {x["id"]: x["state"] for x in listing["versions"]}[v] == "rejected"
        r = ask(c, min_version=v)
        assert r.status_code == 409 and r.json()["error"]["code"] == "version_rejected"
        assert ask(c).json()["version"] == base


def test_serve_refuses_a_store_of_another_base(server_factory, tmp_path, tiny_model_dir):
    import shutil
    import subprocess
    import sys

    from tests.conftest import ROOT

    server_factory(GATE_OFF).kill()  # seeds tmp_path/store from the tiny model
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(str(other / "model.safetensors"))
    first = next(iter(weights))
    weights[first] = weights[first] + torch.ones_like(weights[first])
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    cmd = [
        sys.executable,
        "-m",
        "memfit.cli",
        "serve",
        "--model",
        str(other),
        "--store",
        str(tmp_path / "store"),
    ]
    out = subprocess.run(cmd + ["--port", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "base" in out.stderr
    with pytest.raises(httpx.HTTPError):
        httpx.get("http://127.0.0.1:1/healthz", timeout=0.5)
