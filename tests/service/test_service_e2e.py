"""End to end against a live `memfit serve` (uvicorn subprocess, real HTTP, real files).

A fact the tiny model cannot know is absent before ingest, answered once the job succeeded, gone after
a rollback, back after a roll-forward; the same through the official `openai` client (plain and
streaming); concurrent Idempotency-Key retries make one job; a document revert removes the fact.
"""

from __future__ import annotations

import threading

import openai
import pytest

from memlm.evaluation import is_answered
from tests.service.conftest import FACT_ANSWER, FACT_DOC, FACT_PROMPT, ask, wait_job

pytestmark = pytest.mark.integration


def answers(resp) -> bool:
    assert resp.status_code == 200, resp.text
    return is_answered(resp.json()["text"], FACT_ANSWER)


def test_fact_learned_rolled_back_and_forward(live_server):
    with live_server.client() as c:
        before = ask(c)
        assert not answers(before), before.json()
        base = before.json()["version"]

        r = c.post("/ingest", json={"documents": [FACT_DOC]}, headers={"Idempotency-Key": "e2e-fact"})
        assert r.status_code == 202, r.text
        job = wait_job(c, r.json()["job_id"])
        assert job["status"] == "succeeded", job
        v = job["version"]
        assert job["parent"] == base and job["documents"] == [FACT_DOC["id"]]
        assert {"queued", "training", "evaluation", "publish", "total"} <= set(job["timings"])
        assert job["evaluation"]["learning"] == 1.0

        after = ask(c, min_version=v)  # waits until this replica serves v
        assert after.headers["X-Memfit-Version"] == str(v)
        assert answers(after), after.json()
        assert not answers(ask(c, version=base))  # pinned to the base: still unknown there

        assert c.post(f"/versions/{base}/activate", json={"why": "e2e rollback"}).status_code == 200
        rolled = ask(c)
        assert rolled.json()["version"] == base and not answers(rolled)
        r = ask(c, min_version=v)
        assert r.status_code == 409 and r.json()["error"]["code"] == "version_not_in_active_chain"

        assert c.post(f"/versions/{v}/activate").status_code == 200
        assert answers(ask(c))

        # the OpenAI client, plain and streaming
        client = openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()][0] == "memfit"
        comp = client.completions.create(
            model="memfit", prompt=FACT_PROMPT, max_tokens=12, temperature=0, stop=["\n"]
        )
        assert is_answered(comp.choices[0].text, FACT_ANSWER), comp
        assert comp.system_fingerprint == f"memfit-v{v}"
        assert comp.usage.completion_tokens > 0
        chunks = list(
            client.completions.create(
                model="memfit", prompt=FACT_PROMPT, max_tokens=12, temperature=0, stop=["\n"], stream=True
            )
        )
        streamed = "".join(ch.choices[0].text for ch in chunks)
        assert streamed == comp.choices[0].text
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        pinned = client.completions.create(
            model=f"memfit@{base}", prompt=FACT_PROMPT, max_tokens=12, temperature=0
        )
        assert not is_answered(pinned.choices[0].text, FACT_ANSWER)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
        with pytest.raises(openai.UnprocessableEntityError):
            client.completions.create(model="memfit", prompt="x", max_tokens=100_000)

        # revert the document: its version is undone (a new "revert" version), the fact is gone
        r = c.post(f"/documents/{FACT_DOC['id']}/revert")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "reverted"
        assert not answers(ask(c, min_version=r.json()["version"]))


def test_concurrent_idempotent_retries_make_one_job(live_server):
    body = {
        "documents": [{"id": "conc", "text": "Redrir Broky works as a violinist."}],
        "settings": {"steps": 2},
    }
    ids: list[str] = []
    errors: list[str] = []

    def post() -> None:
        with live_server.client() as c:
            r = c.post("/ingest", json=body, headers={"Idempotency-Key": "concurrent-key"})
            (ids if r.status_code == 202 else errors).append(r.json().get("job_id") or r.text)

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(ids) == 8
    assert len(set(ids)) == 1
    with live_server.client() as c:
        listed = [
            j for j in c.get("/jobs", params={"limit": 1000}).json()["jobs"] if j["documents"] == ["conc"]
        ]
        assert len(listed) == 1
        wait_job(c, ids[0])


def test_cli_ingest_over_http_and_into_the_store(live_server, tmp_path):
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(
        json.dumps({"id": "cli-doc", "text": "Prei Motors was founded by Prysa Prigibrair."}) + "\n"
    )
    cmd = [sys.executable, "-m", "memfit.cli", "ingest", "--url", live_server.url, str(jsonl), "--steps", "3"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "succeeded" in out.stdout

    text = tmp_path / "notes about taia.txt"
    text.write_text("The official language of Taia is Mohiese.")
    cmd = [
        sys.executable,
        "-m",
        "memfit.cli",
        "ingest",
        "--store",
        str(live_server.store),
        str(text),
        "--no-wait",
    ]
    cmd += ["--steps", "3"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = out.stdout.strip().splitlines()[-1]
    with live_server.client() as c:
        job = wait_job(c, job_id)  # the server's runner picked it up from the log
        assert job["status"] == "succeeded", job
        assert job["documents"] == ["notes-about-taia"]
