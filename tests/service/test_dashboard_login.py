"""Dashboard log-in with API keys configured (service/sessions.py, service/routes/dashboard.py).

- HTTP level (TestClient): the log-in exchanges a key for an HttpOnly, SameSite=Strict cookie that
  grants the read role on GET requests only; wrong keys, other sites, logout, expiry and a removed
  key all end in 401.
- Headless Chromium driven over the DevTools protocol against a live server: /dashboard sends the
  browser to the log-in page, the key typed there opens the dashboard with its charts, the cookie is
  invisible to scripts, activating a version fails with no key and with a read key and works with an
  admin key typed into the page, and logging out sends the browser back to the log-in page.
Chromium is installed by `make system-deps`; without it the browser test fails (it does not skip).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from memfit.config import Settings
from service.app import create_app
from service.security import hash_key
from service.sessions import COOKIE_NAME, SessionSigner
from tests.conftest import ROOT, free_port
from tests.service.test_dashboard import chromium

KEYS = {"k-read": "read", "k-admin": "admin"}


def login(client: TestClient, key: str, **headers: str):
    r = client.post(
        "/dashboard/login",
        content=f"key={key}",
        headers={"Content-Type": "application/x-www-form-urlencoded", **headers},
        follow_redirects=False,
    )
    client.cookies.clear()  # each request below names the cookie it sends
    return r


def with_cookie(value: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE_NAME}={value}"}


@pytest.fixture
def keyed(tiny_model_dir, tmp_path):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("".join(f"{hash_key(k)} {r}\n" for k, r in KEYS.items()))
    settings = Settings(
        model=tiny_model_dir,
        store=tmp_path / "store",
        api_keys_file=keys_file,
        rate_limit_per_minute=0,
        session_secret="test-secret",
    )
    app = create_app(settings, start_runner=False)
    with TestClient(app) as client:
        yield app, client, keys_file


def test_login_sets_a_read_only_httponly_strict_cookie(keyed):
    app, client, _ = keyed
    # a browser without a session is sent to the log-in page; an API client gets the usual 401
    r = client.get("/dashboard", headers={"Accept": "text/html"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/login"
    assert client.get("/dashboard").status_code == 401
    page = client.get("/dashboard/login")
    assert page.status_code == 200 and 'name="key"' in page.text and "8 h" in page.text

    bad = login(client, "not-a-key")
    assert bad.status_code == 401 and "unknown API key" in bad.text and COOKIE_NAME not in bad.cookies
    assert login(client, "k-read", Origin="https://evil.example").status_code == 403

    r = login(client, "k-read")
    assert r.status_code == 303 and r.headers["location"] == "/dashboard"
    cookie = r.headers["set-cookie"]
    attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")}
    assert {"httponly", "samesite", "path", "max-age"} <= attrs, cookie
    assert "samesite=strict" in cookie.lower() and "max-age=28800" in cookie.lower()
    assert "secure" not in attrs  # plain HTTP here; Secure behind HTTPS (X-Forwarded-Proto)
    assert "k-read" not in cookie  # the key is never in the cookie
    value = r.cookies[COOKIE_NAME]
    c = with_cookie(value)

    for path in ("/dashboard", "/dashboard/data", "/dashboard/static/dashboard.js", "/versions", "/jobs"):
        assert client.get(path, headers=c).status_code == 200, path
    # read role on GET only: no generation, and admin actions need an admin key
    assert client.post("/generate", json={"prompt": "x"}, headers=c).status_code == 401
    assert client.post("/versions/0/activate", json={"why": "x"}, headers=c).status_code == 401
    r = client.post("/versions/0/activate", json={"why": "x"}, headers={**c, "X-API-Key": "k-admin"})
    assert r.status_code == 200, r.text

    # an admin key's session is read-only too
    admin = with_cookie(login(client, "k-admin").cookies[COOKIE_NAME])
    assert client.get("/dashboard/data", headers=admin).status_code == 200
    assert client.post("/versions/0/activate", json={"why": "x"}, headers=admin).status_code == 401

    # behind HTTPS the cookie is Secure
    r = login(client, "k-read", **{"X-Forwarded-Proto": "https"})
    assert "secure" in {a.strip().lower() for a in r.headers["set-cookie"].split(";")}

    # logout: the cookie is deleted and this replica refuses it from now on
    r = client.post("/dashboard/logout", headers=c, follow_redirects=False)
    client.cookies.clear()
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/login"
    assert f'{COOKIE_NAME}=""' in r.headers["set-cookie"] or "max-age=0" in r.headers["set-cookie"].lower()
    r = client.get("/dashboard/data", headers=c)
    assert r.status_code == 401 and "log in again" in r.json()["error"]["message"]


def test_session_expiry_forgery_and_key_removal(keyed):
    app, client, keys_file = keyed
    r = login(client, "k-read")
    value = r.cookies[COOKIE_NAME]
    signer = app.state.sessions
    assert client.get("/dashboard/data", headers=with_cookie(value)).status_code == 200
    # a forged key id or expiry breaks the signature
    parts = value.split(".")
    forged = ".".join([*parts[:2], hash_key("k-admin")[:12], *parts[3:]])
    assert client.get("/dashboard/data", headers=with_cookie(forged)).status_code == 401
    later = ".".join([*parts[:3], str(int(parts[3]) + 10**6), parts[4]])
    assert client.get("/dashboard/data", headers=with_cookie(later)).status_code == 401
    # expiry
    expired, _ = signer.issue(hash_key("k-read")[:12], now=time.time() - signer.ttl_s - 1)
    assert client.get("/dashboard/data", headers=with_cookie(expired)).status_code == 401
    short = SessionSigner("s", ttl_s=1)
    v, _ = short.issue("abc")
    assert short.verify(v) is not None
    time.sleep(1.1)
    assert short.verify(v) is None
    # removing the key ends its sessions (the keys file is re-read within a second)
    keys_file.write_text(f"{hash_key('k-admin')} admin\n")
    os.utime(keys_file, (time.time() + 5, time.time() + 5))
    time.sleep(1.2)
    assert client.get("/dashboard/data", headers=with_cookie(value)).status_code == 401


def test_no_keys_no_login(tiny_model_dir, tmp_path):
    app = create_app(
        Settings(model=tiny_model_dir, store=tmp_path / "store", api_keys=None), start_runner=False
    )
    with TestClient(app) as client:
        r = client.get("/dashboard/login", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/dashboard"


# ---- headless Chromium over the DevTools protocol -------------------------------------------------


class Browser:
    """Headless Chromium and one page, driven over the DevTools protocol (websockets)."""

    def __init__(self, exe: str, profile: Path) -> None:
        from websockets.sync.client import connect

        self.proc = subprocess.Popen(
            [
                exe,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
                f"--user-data-dir={profile}",
                "--window-size=1400,1500",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert self.proc.poll() is None and time.time() < deadline, "chromium did not start"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        deadline = time.time() + 30
        while True:
            try:
                targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
                page = next(t for t in targets if t["type"] == "page")
                break
            except (httpx.HTTPError, StopIteration):
                assert time.time() < deadline, "no page target"
                time.sleep(0.2)
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.next_id = 0
        self.call("Page.enable")
        self.call("Network.enable")

    def call(self, method: str, **params):
        self.next_id += 1
        mid = self.next_id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == mid:
                assert "error" not in msg, (method, msg["error"])
                return msg.get("result", {})

    def js(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in res, res["exceptionDetails"]
        return res["result"].get("value")

    def wait(self, expression: str, timeout: float = 30.0, what: str = ""):
        deadline = time.time() + timeout
        while True:
            try:
                value = self.js(expression)
            except AssertionError:
                value = None  # the page is navigating
            if value:
                return value
            if time.time() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what or expression}: at {self.js('location.href')}"
                )
            time.sleep(0.2)

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait("document.readyState === 'complete'", what="page load")

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def keyed_server(tiny_model_dir, tmp_path):
    """A live server with API keys and one retained version besides the active base."""
    import torch

    from memlm.delta import LayerDelta, SlotDelta
    from model_store import Store

    store_dir = tmp_path / "store"
    store = Store.init(store_dir, tiny_model_dir)
    idx = torch.arange(0, 16)
    layers = {}
    for layer in store.table_info:
        old = store.rows_at(0, {layer: idx})[layer]
        layers[layer] = LayerDelta(idx, old + 0.01, old)
    store.publish(SlotDelta(layers), 0, documents=[], activate=False)

    port = free_port()
    env = {
        **os.environ,
        "MEMFIT_MODEL": str(tiny_model_dir),
        "MEMFIT_STORE": str(store_dir),
        "MEMFIT_API_KEYS": json.dumps(KEYS),
        "MEMFIT_RATE_LIMIT_PER_MINUTE": "0",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("MEMFIT_REDIS_URL", None)
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "server not ready"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.mark.integration
def test_browser_logs_in_sees_the_charts_and_needs_admin_to_activate(keyed_server, tmp_path):
    url = keyed_server
    browser = Browser(chromium(), tmp_path / "chromium-profile")
    try:
        browser.goto(f"{url}/dashboard")
        assert browser.js("location.pathname") == "/dashboard/login"  # no session: the log-in page
        browser.js("document.getElementById('key').value = 'k-read'")
        browser.js("document.getElementById('login-form').submit()")
        browser.wait(
            "location.pathname === '/dashboard' && document.readyState === 'complete'", what="dashboard"
        )
        # the charts: the page rendered /versions into the knowledge view and the versions table
        plotted = json.loads(
            browser.wait(
                # the cards too: /versions may render before the first /dashboard/data poll answers
                "(() => { const t = document.getElementById('plotted').textContent;"
                " const p = JSON.parse(t); return p.knowledge && p.cards.active !== undefined"
                " && document.querySelectorAll('#versions-table tbody tr').length === 2 ? t : null })()",
                what="plotted data",
            )
        )
        assert plotted["cards"]["active"] == 0
        assert browser.js("document.querySelectorAll('svg.chart').length") >= 8
        assert browser.wait("document.querySelector('#chart-latency *') !== null", what="serving chart")
        assert browser.js("document.getElementById('status').classList.contains('error')") is False
        # the session cookie: HttpOnly (scripts cannot read it), SameSite=Strict
        assert COOKIE_NAME not in browser.js("document.cookie")
        cookies = {c["name"]: c for c in browser.call("Network.getAllCookies")["cookies"]}
        assert cookies[COOKIE_NAME]["httpOnly"] is True and cookies[COOKIE_NAME]["sameSite"] == "Strict"
        assert "k-read" not in cookies[COOKIE_NAME]["value"]

        # activate version 1 from the page: refused without a key and with a read key, done with admin
        browser.js("window.confirm = () => true")
        button = "document.querySelector('#versions-table tr[data-version=\"1\"] button')"
        assert browser.js(f"{button}.textContent").startswith("activate")

        # every status line the page shows, in order (polls overwrite the status element itself)
        browser.js(
            "window.statusLog = []; const shown = setStatus;"
            " setStatus = (text, isError) => { window.statusLog.push(text); shown(text, isError); }"
        )

        def activate_with(key: str) -> str:
            browser.js(
                f"(() => {{ const k = document.getElementById('api-key'); k.value = {json.dumps(key)};"
                " k.dispatchEvent(new Event('change')); })()"
            )
            browser.js("window.statusLog.length = 0")
            browser.js(f"{button}.click()")
            return browser.wait(
                "window.statusLog.find((s) => /activate/.test(s)) || null", what="activation outcome"
            )

        assert "API key is required" in activate_with("")
        assert "role 'read'" in activate_with("k-read")
        assert httpx.get(f"{url}/versions", headers={"X-API-Key": "k-read"}).json()["active"] == 0
        assert activate_with("k-admin") == "version 1 activated"
        assert httpx.get(f"{url}/versions", headers={"X-API-Key": "k-read"}).json()["active"] == 1

        # log out: back to the log-in page, and the dashboard asks for a log-in again
        browser.js("sessionStorage.clear(); document.getElementById('logout').click()")
        browser.wait("location.pathname === '/dashboard/login'", what="log-in page after logout")
        assert COOKIE_NAME not in {c["name"] for c in browser.call("Network.getAllCookies")["cookies"]}
        browser.goto(f"{url}/dashboard")
        assert browser.js("location.pathname") == "/dashboard/login"
    finally:
        browser.close()
