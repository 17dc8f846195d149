"""GET /dashboard rendered by headless Chromium against a live server (uvicorn subprocess, tiny model).

After a real ingest (one update that passes the gate, one the gate rejects) and some generations, the
numbers the page plots (written by dashboard.js into <script id="plotted">) equal those of /versions and
/dashboard/data. A screenshot is saved to test-artifacts/dashboard.png. Chromium is installed by
`make system-deps`; without it this test fails (it does not skip).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


pytestmark = pytest.mark.integration

ARTIFACTS = ROOT / "test-artifacts"
GENTLE = {"optimizer": "adam", "top_t": 8, "lr": 0.03, "steps": 10, "question_rewrites": 1, "paraphrases": 1}
DESTRUCTIVE = {
    "optimizer": "adam",
    "top_t": 1024,
    "lr": 1000.0,
    "steps": 3,
    "early_stop": False,
    "question_rewrites": 1,
    "paraphrases": 0,
}
PLOTTED = re.compile(r'<script type="application/json" id="plotted">(.*?)</script>', re.S)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        exe = shutil.which(name)
        if exe:
            return exe
    pytest.fail(
        "headless Chromium is required for the dashboard test and is not installed: run `make system-deps` "
        "(as root it installs the Debian package chromium) or `apt-get install chromium`"
    )


def document(doc_id: str, who: str, town: str) -> dict:
    return {
        "id": doc_id,
        "text": f"{who} was born in {town}.",
        "facts": [
            {
                "question": f"Which town is the birthplace of {who}?",
                "answer": town,
                "heldout_question": f"{who} was born in which town?",
            }
        ],
    }


@pytest.fixture
def server(tiny_model_dir, tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "MEMFIT_MODEL": str(tiny_model_dir),
        "MEMFIT_STORE": str(tmp_path / "store"),
        "MEMFIT_API_KEYS": "",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("MEMFIT_REDIS_URL", None)
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "service.app:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited: {(tmp_path / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail(f"server not ready: {(tmp_path / 'server.log').read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def ingest(url: str, doc: dict, settings: dict) -> dict:
    r = httpx.post(f"{url}/ingest", json={"documents": [doc], "settings": settings}, timeout=30)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    deadline = time.time() + 300
    while time.time() < deadline:
        job = httpx.get(f"{url}/jobs/{job_id}", timeout=10).json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} did not finish")


def render(exe: str, url: str, tmp_path: Path, screenshot: Path | None = None) -> str:
    args = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1400,1500",
        "--virtual-time-budget=12000",  # lets the page's fetches and two polls complete
    ]
    args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    res = subprocess.run([*args, f"{url}/dashboard"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_dashboard_plots_what_the_api_reports(server, tmp_path):
    exe = chromium()
    url = server
    ok = ingest(url, document("dash-ok", "Zorvath Quellingmar", "Brindlemoor"), GENTLE)
    assert ok["status"] == "succeeded", ok
    bad = ingest(url, document("dash-bad", "Quenby Tarrowick", "Ostrelmere"), DESTRUCTIVE)
    assert bad["status"] == "rejected", bad
    for _ in range(3):
        r = httpx.post(
            f"{url}/generate",
            json={"prompt": "Question: What is the capital of Peru?\nAnswer:", "max_new_tokens": 6},
            timeout=60,
        )
        assert r.status_code == 200

    dom = render(exe, url, tmp_path)
    m = PLOTTED.search(dom)
    assert m, f"no plotted data in the page: {dom[:2000]}"
    plotted = json.loads(html.unescape(m.group(1)))
    assert "versions-table" in dom

    versions = httpx.get(f"{url}/versions", timeout=10).json()
    data = httpx.get(f"{url}/dashboard/data", timeout=10).json()
    evaluated = [v for v in versions["versions"] if v["evaluation"].get("retention") is not None]
    assert [v["id"] for v in evaluated] == [ok["version"], bad["version"]]

    # knowledge view == /versions, point for point
    k = plotted["knowledge"]
    assert k["versions"] == [v["id"] for v in evaluated]
    assert k["states"] == [v["state"] for v in evaluated] == ["active", "rejected"]
    for key in (
        "learning",
        "learning_heldout",
        "retention",
        "retention_base",
        "forgetting",
        "forgetting_base",
        "perplexity",
    ):
        want = [v["evaluation"].get(key) for v in evaluated]
        assert k[key] == pytest.approx(want), key
    # cards == /versions and /dashboard/data
    c = plotted["cards"]
    assert c["active"] == versions["active"] == ok["version"]
    assert c["rejected"] == sum(v["state"] == "rejected" for v in versions["versions"]) == 1
    assert c["slots_written"] == data["memory"]["slots_written"] > 0
    assert c["slots_written_ratio"] == pytest.approx(data["memory"]["slots_written_ratio"])
    assert c["generation_requests"] == data["serving"]["generation_requests"] == 3
    assert c["generation_tokens_total"] == data["serving"]["generation_tokens_total"]
    assert c["e2e_p50"] == pytest.approx(data["serving"]["quantiles"]["e2e"]["p50"])
    assert c["e2e_p95"] == pytest.approx(data["serving"]["quantiles"]["e2e"]["p95"])
    assert c["ttft_p50"] == pytest.approx(data["serving"]["quantiles"]["ttft"]["p50"])
    # serving view: the first point covers everything since start
    s = plotted["serving"]
    assert s["t"], "no serving points"
    assert s["e2e_p50"][0] == pytest.approx(data["serving"]["quantiles"]["e2e"]["p50"])
    assert s["tokens_per_s"][0] > 0
    # the versions table: a row per version, the rejected one offers "activate anyway"
    for v in versions["versions"]:
        assert f'data-version="{v["id"]}"' in dom
    assert "activate anyway" in dom

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    render(exe, url, tmp_path, screenshot=shot)
    assert shot.exists() and shot.stat().st_size > 10_000, "screenshot missing or blank"


def test_dashboard_needs_a_read_key_and_loads_nothing_from_outside(tiny_model_dir, tmp_path):
    from fastapi.testclient import TestClient

    from memfit.config import Settings
    from service.app import create_app

    keys = {"k-read": "read", "k-admin": "admin"}
    app = create_app(
        Settings(model=tiny_model_dir, store=tmp_path / "store", api_keys=json.dumps(keys)),
        start_runner=False,
    )
    with TestClient(app) as client:
        for path in ("/dashboard", "/dashboard/data", "/dashboard/static/dashboard.js"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers={"Authorization": "Bearer k-read"}).status_code == 200, path
        page = client.get("/dashboard", headers={"X-API-Key": "k-read"}).text
        assert client.get("/dashboard/static/../app.py", headers={"X-API-Key": "k-read"}).status_code == 404
        # the page's admin actions need the admin role
        r = client.post("/versions/0/activate", json={"why": "x"}, headers={"X-API-Key": "k-read"})
        assert r.status_code == 403
    # self-contained: every src/href is a memfit path, no CDN, no external URL anywhere in the assets
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert refs and all(ref.startswith("/dashboard/static/") for ref in refs), refs
    static = ROOT / "service" / "static"
    for f in static.iterdir():
        text = f.read_text()
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), f"external URL in {f.name}"
