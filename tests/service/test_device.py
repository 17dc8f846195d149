"""MEMFIT_DEVICE (memfit/config.py resolve_device) read through Settings and used by serving and embedded updates.

On a CPU-only machine: `auto` resolves to the CPU (engine and update pipeline), `cuda` is a clear
start-up error for the app, `memfit serve` and `memfit worker`. With a GPU (the `gpu` marker, run by
the device check): serving and one update run on CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

from memfit.config import DeviceUnavailable, Settings, resolve_device
from service.app import create_app
from tests.conftest import ROOT

CUDA = torch.cuda.is_available()
no_cuda = pytest.mark.skipif(CUDA, reason="checks the error for a missing GPU; this machine has one")
GENTLE = {"optimizer": "adam", "top_t": 8, "lr": 0.03, "steps": 3, "question_rewrites": 1, "paraphrases": 0}
DOC = {
    "id": "dev-doc",
    "text": "Zorvath Quellingmar was born in Brindlemoor.",
    "facts": [{"question": "Which town is the birthplace of Zorvath Quellingmar?", "answer": "Brindlemoor"}],
}


def test_settings_read_memfit_device(monkeypatch):
    monkeypatch.delenv("MEMFIT_DEVICE", raising=False)
    assert Settings().device == "auto"
    monkeypatch.setenv("MEMFIT_DEVICE", "cpu")
    assert Settings().device == "cpu"
    monkeypatch.setenv("MEMFIT_DEVICE", "cuda:1")
    assert Settings().device == "cuda:1"
    monkeypatch.setenv("MEMFIT_DEVICE", "gpu")
    with pytest.raises(ValidationError, match="device"):
        Settings()


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    for asked in ("cuda", "cuda:0"):
        with pytest.raises(DeviceUnavailable, match=rf"MEMFIT_DEVICE={asked} but .*MEMFIT_DEVICE=cpu"):
            resolve_device(asked)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(DeviceUnavailable, match="only 1 CUDA device"):
        resolve_device("cuda:1")
    with pytest.raises(ValueError, match="cpu, cuda, cuda:N or auto"):
        resolve_device("tpu")


def wait_job(client, job_id: str, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


@pytest.mark.skipif(CUDA, reason="auto picks CUDA on this machine (the gpu test covers it)")
def test_auto_serves_and_updates_on_the_cpu(tiny_model_dir, tmp_path):
    settings = Settings(
        model=tiny_model_dir, store=tmp_path / "store", device="auto", gate_enabled=False, gate_probe_facts=4
    )
    app = create_app(settings)
    with TestClient(app) as client:
        ready = client.get("/readyz").json()
        assert ready["device"] == "cpu"
        assert next(app.state.engine.model.parameters()).device.type == "cpu"
        assert app.state.dispatcher.pipeline.device == "cpu"  # embedded updates use the same setting


@no_cuda
def test_cuda_without_a_gpu_is_a_clear_startup_error(tiny_model_dir, tmp_path):
    app = create_app(Settings(model=tiny_model_dir, store=tmp_path / "store", device="cuda"))
    with pytest.raises(DeviceUnavailable, match="MEMFIT_DEVICE=cuda but"):
        with TestClient(app):
            pass
    assert app.state.engine is None  # nothing was loaded


@no_cuda
@pytest.mark.parametrize("command", ["serve", "worker"])
def test_memfit_commands_refuse_cuda_without_a_gpu(command, tiny_model_dir, tmp_path):
    env = {
        **os.environ,
        "MEMFIT_DEVICE": "cuda",
        "MEMFIT_HOME": str(tmp_path),
        "MEMFIT_REDIS_URL": "redis://127.0.0.1:1/0",  # the worker needs one; serve is refused first
    }
    if command == "serve":
        env.pop("MEMFIT_REDIS_URL")
    args = [command, "--model", str(tiny_model_dir), "--store", str(tmp_path / "store")]
    t0 = time.time()
    res = subprocess.run(
        [sys.executable, "-m", "memfit.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert f"memfit {command}: MEMFIT_DEVICE=cuda but" in res.stderr
    assert "MEMFIT_DEVICE=cpu" in res.stderr
    assert not (tmp_path / "store").exists()  # refused before the store was touched
    assert time.time() - t0 < 60


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_serving_and_an_update_run_on_cuda(tiny_model_dir, tmp_path):
    settings = Settings(
        model=tiny_model_dir, store=tmp_path / "store", device="cuda", gate_enabled=False, gate_probe_facts=4
    )
    app = create_app(settings)
    with TestClient(app) as client:
        assert client.get("/readyz").json()["device"] == "cuda"
        assert next(app.state.engine.model.parameters()).device.type == "cuda"
        prompt = "Question: Which town is the birthplace of Zorvath Quellingmar?\nAnswer:"
        for body in (
            {"prompt": prompt, "max_new_tokens": 6},
            {"prompt": prompt, "max_new_tokens": 6, "temperature": 0.8, "seed": 3},
        ):
            r = client.post("/generate", json=body)
            assert r.status_code == 200, r.text
        r = client.post("/ingest", json={"documents": [DOC], "settings": GENTLE})
        assert r.status_code == 202, r.text
        job = wait_job(client, r.json()["job_id"])
        assert job["status"] == "succeeded", job
        assert app.state.dispatcher.pipeline.device == "cuda"
        # the engine swapped to the new version on the GPU and answers from it
        r = client.post(
            "/generate", json={"prompt": prompt, "max_new_tokens": 6, "min_version": job["version"]}
        )
        assert r.status_code == 200 and r.json()["version"] == job["version"], r.text
        print("cuda answer after the update:", r.json()["text"], job["timings"])
