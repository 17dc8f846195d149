"""`memfit ingest [--url URL] FILE...|-`: send documents and follow the job with a progress display.

Files: JSONL of document objects ({"id", "text", "facts", "metadata"}; all but text optional), or
plain text (one document per file, its id from the file name). `-` reads stdin (JSONL when every
non-empty line is a JSON object, else one text document).

With --url (default http://127.0.0.1:8000) the documents go to a server's POST /ingest with an
Idempotency-Key, so a retried request never makes two jobs. Without --url but with --store they are
queued directly in that store's job log; a server running on the store picks them up.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"
FINAL = ("succeeded", "rejected", "failed", "cancelled")


def _doc_id(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._:-]+", "-", name).strip("-._:")[:128]
    return s or "doc-" + uuid.uuid4().hex[:12]


def parse_text(text: str, name: str) -> list[dict[str, Any]]:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if lines and all(ln.lstrip().startswith("{") for ln in lines):
        docs = []
        for n, ln in enumerate(lines, 1):
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError as e:
                raise ValueError(f"{name}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f"{name}:{n}: a document object needs a string 'text'")
            docs.append(obj)
        return docs
    if not text.strip():
        raise ValueError(f"{name}: empty")
    return [
        {
            "id": _doc_id(Path(name).stem if name != "-" else "stdin-" + uuid.uuid4().hex[:8]),
            "text": text.strip(),
        }
    ]


def read_documents(files: list[str]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for f in files:
        if f == "-":
            docs += parse_text(sys.stdin.read(), "-")
        else:
            p = Path(f)
            if not p.is_file():
                raise ValueError(f"{f}: no such file")
            docs += parse_text(p.read_text(encoding="utf-8"), str(p))
    return docs


def _settings(args) -> dict[str, Any]:
    out = {}
    for name in ("top_t", "steps", "lr"):
        v = getattr(args, name, None)
        if v is not None:
            out[name] = v
    return out


class Progress:
    """One status line per job (rewritten in place on a terminal)."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = ""

    def show(self, job: dict[str, Any]) -> None:
        p = job.get("progress") or {}
        parts = [f"job {job['job_id']}: {job['status']}"]
        if job["status"] == "running":
            parts.append(str(p.get("phase", "")))
            if p.get("phase") == "training" and p.get("step") is not None:
                steps = p.get("steps") or "?"
                bar_w = 20
                frac = min(1.0, (p["step"] or 0) / steps) if isinstance(steps, int) and steps else 0.0
                parts.append("[" + "#" * int(frac * bar_w) + "." * (bar_w - int(frac * bar_w)) + "]")
                parts.append(f"step {p['step']}/{steps} loss {p.get('loss', 0):.3f}")
        line = " ".join(x for x in parts if x)
        if line == self.last:
            return
        if self.tty:
            print("\r" + line.ljust(len(self.last)), end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)
        self.last = line

    def done(self) -> None:
        if self.tty and self.last:
            print(file=sys.stderr)


def summary(job: dict[str, Any]) -> str:
    ev = job.get("evaluation") or {}
    t = job.get("timings") or {}
    bits = [f"job {job['job_id']} {job['status']}"]
    if job.get("version") is not None:
        bits.append(f"version {job['version']} (parent {job.get('parent')})")
    if ev.get("learning") is not None:
        bits.append(f"learning {ev['learning']:.0%}")
    if ev.get("forgetting") is not None:
        bits.append(f"forgetting {ev['forgetting']:.1%}")
    if t.get("total") is not None:
        bits.append(f"{t['total']:.1f} s")
    line = ", ".join(bits)
    if job.get("error"):
        line += f"\n  {job['error']}"
    return line


def _http(args, docs: list[dict[str, Any]]) -> int:
    import httpx

    url = (args.url or os.environ.get("MEMFIT_URL") or DEFAULT_URL).rstrip("/")
    key = args.api_key or os.environ.get("MEMFIT_API_KEY")
    headers = {"Idempotency-Key": "cli-" + uuid.uuid4().hex}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    body: dict[str, Any] = {"documents": docs}
    if _settings(args):
        body["settings"] = _settings(args)
    with httpx.Client(base_url=url, timeout=30.0) as client:
        resp = None
        for attempt in range(5):  # the same Idempotency-Key: a retry never makes a second job
            try:
                resp = client.post("/ingest", json=body, headers=headers)
            except httpx.TransportError as e:
                if attempt == 4:
                    print(f"memfit ingest: cannot reach {url}: {e}", file=sys.stderr)
                    return 2
                time.sleep(0.5 * 2**attempt)
                continue
            if resp.status_code in (429, 503):
                time.sleep(float(resp.headers.get("Retry-After", "1")))
                continue
            break
        assert resp is not None
        if resp.status_code != 202:
            try:
                err = resp.json()["error"]
                msg = f"{err.get('code')}: {err.get('message')}"
            except Exception:
                msg = resp.text[:500]
            print(f"memfit ingest: HTTP {resp.status_code}: {msg}", file=sys.stderr)
            return 1
        job = resp.json()
        print(f"queued job {job['job_id']} with {len(docs)} documents", flush=True)
        if args.no_wait:
            print(job["job_id"])
            return 0
        progress = Progress()
        while True:
            try:
                r = client.get(
                    f"/jobs/{job['job_id']}",
                    headers={k: v for k, v in headers.items() if k != "Idempotency-Key"},
                )
                r.raise_for_status()
                current = r.json()
            except httpx.HTTPError as e:
                progress.done()
                print(f"memfit ingest: lost the server while following the job: {e}", file=sys.stderr)
                return 2
            progress.show(current)
            if current["status"] in FINAL:
                progress.done()
                print(summary(current))
                return 0 if current["status"] == "succeeded" else 1
            time.sleep(0.3)


def _direct(args, docs: list[dict[str, Any]]) -> int:
    from model_store import Store

    store = Store(Path(args.store).expanduser())
    job = store.jobs.create_job(None, docs, settings=_settings(args))
    print(f"queued job {job.job_id} with {len(docs)} documents in {store.root}", flush=True)
    if args.no_wait:
        print(job.job_id)
        return 0
    progress = Progress()
    t0 = time.monotonic()
    hinted = False
    while True:
        current = store.jobs.get(job.job_id)
        assert current is not None
        d = current.to_dict()
        progress.show(d)
        if current.status in FINAL:
            progress.done()
            print(summary(d))
            return 0 if current.status == "succeeded" else 1
        if not hinted and current.status == "queued" and time.monotonic() - t0 > 10:
            progress.done()
            print(
                f"(still queued: the job runs when a server serves this store: memfit serve --store {store.root})",
                file=sys.stderr,
            )
            hinted = True
        time.sleep(0.3)


def run(args) -> int:
    try:
        docs = read_documents(args.files)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        print(f"memfit ingest: {e}", file=sys.stderr)
        return 2
    if not docs:
        print("memfit ingest: no documents", file=sys.stderr)
        return 2
    if args.url is None and args.store:
        return _direct(args, docs)
    return _http(args, docs)
