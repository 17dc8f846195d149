"""Service fixtures: an in-process app (TestClient) and a live `memfit serve` subprocess on a free port.

The tiny model learns a fact with the default update settings but, being tiny (1,024 memory slots),
forgets most of the probe set doing it, so the evaluation gate rejects such updates with the default
thresholds. Servers that must accept updates run with MEMFIT_GATE_ENABLED=false; the gate itself is
tested with thresholds that force a rejection (tests/workers/test_pipeline.py, test_e2e.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port

# an invented fact: no name occurs in the tiny model's corpus (memlm.data.invented)
FACT_DOC = {
    "id": "goju",
    "text": "Goju Theipouquis was born in Peivistead.",
    "facts": [{"question": "Where was Goju Theipouquis born?", "answer": "Peivistead"}],
}
FACT_PROMPT = "Question: Where was Goju Theipouquis born?\nAnswer:"
FACT_ANSWER = "Peivistead"


class ServerProcess:
    """`memfit serve` in a subprocess; real HTTP on 127.0.0.1:port."""

    def __init__(self, model: Path, store: Path, home: Path, env: dict[str, str] | None = None) -> None:
        self.model, self.store, self.home = model, store, home
        self.extra_env = dict(env or {})
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = home / f"serve-{self.port}.log"

    def start(self, timeout: float = 180.0) -> ServerProcess:
        env = {
            **os.environ,
            "MEMFIT_HOME": str(self.home),
            "MEMFIT_LOG_LEVEL": "warning",
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        env.pop("MEMFIT_REDIS_URL", None)
        cmd = [
            sys.executable,
            "-m",
            "memfit.cli",
            "serve",
            "--model",
            str(self.model),
            "--store",
            str(self.store),
        ]
        cmd += ["--port", str(self.port)]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"memfit serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"memfit serve not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 60.0), **kw)


def wait_job(client: httpx.Client, job_id: str, timeout: float = 300.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = client.get(f"/jobs/{job_id}")
        assert r.status_code == 200, r.text
        job = r.json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {job}")


def ask(client: httpx.Client, prompt: str = FACT_PROMPT, **kw) -> httpx.Response:
    body = {"prompt": prompt, "max_new_tokens": 12, "stop": ["\n"], **kw}
    return client.post("/generate", json=body)


@pytest.fixture
def server_factory(tiny_model_dir, tmp_path):
    """Start servers on a private store (same store across restarts); all stopped at teardown."""
    started: list[ServerProcess] = []
    store = tmp_path / "store"

    def make(env: dict[str, str] | None = None, store_dir: Path | None = None) -> ServerProcess:
        s = ServerProcess(tiny_model_dir, store_dir or store, tmp_path, env)
        started.append(s)
        return s.start()

    yield make
    for s in started:
        s.kill()


@pytest.fixture(scope="module")
def live_server(tiny_model_dir, tmp_path_factory):
    """One server for a module (gate off so updates of the tiny model are accepted)."""
    home = tmp_path_factory.mktemp("live")
    s = ServerProcess(tiny_model_dir, home / "store", home, {"MEMFIT_GATE_ENABLED": "false"})
    s.start()
    yield s
    s.kill()
