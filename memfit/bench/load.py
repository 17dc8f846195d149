"""What the serving benchmarks share: closed-loop client threads, a `memfit serve` subprocess on a free
port, and the JSON report file.

`closed_loop` is the one load generator of `memfit bench update` (the flood), `memfit bench serve`
(engine vs `generate()`) and benchmarks/service_latency.py (/generate latency): N threads, each taking
the next item as soon as its previous call returned, with every call's result and seconds recorded.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
_DONE = object()


@dataclass
class LoadRun:
    results: list[Any]  # what each call returned, in the order the calls finished
    latencies: list[float]  # seconds of each call, in the same order
    wall_s: float  # from the first thread's start to the last thread's end


def closed_loop(
    call: Callable[..., Any],
    items: Iterable[Any],
    clients: int,
    session: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
) -> LoadRun:
    """Run `call(item)` for every item from `clients` closed-loop threads.

    With `session` (e.g. `lambda: httpx.Client(...)`), each thread enters its own `session()` and the
    call is `call(resource, item)`. A call that raises ends its thread (the exception is reported by
    threading's excepthook) and is not recorded; the other threads go on."""
    lock = threading.Lock()
    it = iter(items)
    results: list[Any] = []
    latencies: list[float] = []

    def client() -> None:
        with session() if session is not None else contextlib.nullcontext() as resource:
            while True:
                with lock:
                    item = next(it, _DONE)
                if item is _DONE:
                    return
                t0 = time.perf_counter()
                out = call(item) if session is None else call(resource, item)
                dt = time.perf_counter() - t0
                with lock:
                    results.append(out)
                    latencies.append(dt)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return LoadRun(results, latencies, time.perf_counter() - t0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def memfit_serve(
    model: Path, home: Path, env: dict[str, str] | None = None, stop_wait_s: float = 30
) -> Iterator[str]:
    """`memfit serve --model MODEL --store HOME/store` in embedded mode (MEMFIT_REDIS_URL unset) on a
    free port, with MEMFIT_HOME=HOME, log level warning and `env` on top; its output goes to
    HOME/serve.log. Yields the base URL once GET /readyz answers 200 (SystemExit with the log's tail
    when the server exits or is not ready within 300 s); terminates it on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    full_env = {**os.environ, "MEMFIT_HOME": str(home), "MEMFIT_LOG_LEVEL": "warning", **(env or {})}
    full_env.pop("MEMFIT_REDIS_URL", None)
    cmd = [sys.executable, "-m", "memfit.cli", "serve", "--model", str(model), "--store", str(home / "store"),
           "--port", str(port)]  # fmt: skip
    log = open(home / "serve.log", "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(url, proc, home / "serve.log", deadline=time.time() + 300)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(stop_wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, deadline: float) -> None:
    import httpx

    while True:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(log.read_text()[-3000:])
        time.sleep(0.2)


def write_json(report: dict[str, Any], out_dir: Path, name: str) -> Path:
    """Write `report` as indented JSON to OUT_DIR/NAME (creating the folder); returns the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
