"""Load on /generate while versions are published and rolled back every second (shared by
tests/faults/test_load_swaps.py and benchmarks/load_during_swaps.py).

`run_load(url, store_root, ...)`: `clients` threads send /generate to a live `memfit serve` (greedy,
`max_new_tokens` tokens, every third request streaming) for `duration_s` seconds while a swapper
thread, once per `swap_every_s`, alternately publishes a new synthetic version into the store
(`Store.publish(..., activate=False)`: no training) and activates it through the replica
(`POST /versions/{v}/activate`), then rolls back to the previous one the same way. The replica has
swapped when the activate call answers, so each change of the served version lies inside the window
of one activate call: the swapper records those windows (`Timeline`), and every response's version
(header X-Memfit-Version, or the stream's final event) must have been active at some time between
the request's start and its end.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

PROMPTS = [
    "The capital of France is",
    "Question: Where was Goju Theipouquis born?\nAnswer:",
    "Paris is a city in",
    "The river flows through",
    "Question: What is the capital of Spain?\nAnswer:",
    "In 1990 the population of",
]


@dataclass
class Timeline:
    """Activation windows: (start, end, version) of each activate call, in order."""

    initial: int
    changes: list[tuple[float, float, int]] = field(default_factory=list)

    def was_active(self, version: int, t0: float, t1: float) -> bool:
        """Could `version` have been active on the replica at some time in [t0, t1]?"""
        # segment k: version v_k, from the start of its activate call to the end of the next one
        segments = [(float("-inf"), self.initial)] + [(s, v) for s, _e, v in self.changes]
        ends = [e for _s, e, _v in self.changes] + [float("inf")]
        for (start, v), end in zip(segments, ends, strict=True):
            if v == version and start <= t1 and end >= t0:
                return True
        return False


@dataclass
class LoadResult:
    requests: int = 0
    streamed: int = 0
    failures: list[str] = field(default_factory=list)
    wrong_version: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    versions_seen: dict[int, int] = field(default_factory=dict)
    publishes: int = 0
    rollbacks: int = 0
    swap_calls_s: list[float] = field(default_factory=list)
    duration_s: float = 0.0

    def pct(self, xs: list[float], q: float) -> float:
        if not xs:
            return float("nan")
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    def figures(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "streamed": self.streamed,
            "failed": len(self.failures),
            "wrong_version": len(self.wrong_version),
            "req_per_s": round(self.requests / self.duration_s, 2) if self.duration_s else None,
            "tokens_per_s": round(self.tokens / self.duration_s, 1) if self.duration_s else None,
            "p50_ms": round(1000 * self.pct(self.latencies, 0.50), 1),
            "p95_ms": round(1000 * self.pct(self.latencies, 0.95), 1),
            "max_ms": round(1000 * max(self.latencies), 1) if self.latencies else None,
            "stream_ttft_p50_ms": round(1000 * self.pct(self.ttft, 0.50), 1),
            "stream_ttft_p95_ms": round(1000 * self.pct(self.ttft, 0.95), 1),
            "publishes": self.publishes,
            "rollbacks": self.rollbacks,
            "activate_call_p50_ms": round(1000 * self.pct(self.swap_calls_s, 0.5), 1),
            "activate_call_max_ms": round(1000 * max(self.swap_calls_s), 1) if self.swap_calls_s else None,
            "versions_served": dict(sorted(self.versions_seen.items())),
        }


def synthetic_delta(store, parent: int, seed: int, slots: int = 16):
    """A small delta on top of `parent`: `slots` random rows per memory layer, visibly changed."""
    import torch

    from memlm.delta import LayerDelta, SlotDelta

    tables = store.materialize(parent)
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for layer, table in tables.items():
        idx = torch.randperm(table.shape[0], generator=g)[:slots].sort().values
        old = table[idx].clone()
        layers[layer] = LayerDelta(indices=idx, new_rows=torch.randn(old.shape, generator=g), old_rows=old)
    return SlotDelta(layers=layers)


def _swapper(
    url: str,
    store_root: Path,
    every_s: float,
    stop: threading.Event,
    timeline: Timeline,
    res: LoadResult,
    errors: list,
):
    from model_store import Store

    store = Store(store_root)
    http = httpx.Client(base_url=url, timeout=60)
    seed = 1000
    try:
        while not stop.wait(every_s):
            current = store.active()
            if res.publishes <= res.rollbacks:  # publish a new version on top, activate it
                seed += 1
                target = store.publish(
                    synthetic_delta(store, current, seed), current, documents=[f"load-{seed}"], activate=False
                )
                res.publishes += 1
            else:  # roll back to its parent
                target = int(store.manifest(current)["parent"])
                res.rollbacks += 1
            t0 = time.time()
            r = http.post(f"/versions/{target}/activate", json={"why": "load test swap"})
            t1 = time.time()
            if r.status_code != 200:
                errors.append(f"activate {target}: {r.status_code} {r.text[:200]}")
                continue
            timeline.changes.append((t0, t1, target))
            res.swap_calls_s.append(t1 - t0)
    except Exception as e:  # reported by the caller
        errors.append(f"swapper: {type(e).__name__}: {e}")
    finally:
        http.close()


def _client(
    idx: int,
    url: str,
    max_new: int,
    stop: threading.Event,
    res: LoadResult,
    lock: threading.Lock,
    timeline: Timeline,
):
    http = httpx.Client(base_url=url, timeout=120)
    n = 0
    try:
        while not stop.is_set():
            n += 1
            stream = (idx + n) % 3 == 0  # a third of the requests stream
            body = {"prompt": PROMPTS[(idx + n) % len(PROMPTS)], "max_new_tokens": max_new, "stream": stream}
            t0 = time.time()
            version = None
            ttft = None
            tokens = 0
            err = None
            try:
                if stream:
                    with http.stream("POST", "/generate", json=body) as r:
                        if r.status_code != 200:
                            err = f"stream {r.status_code} {r.read()[:200]!r}"
                        else:
                            done = None
                            for line in r.iter_lines():
                                if not line.startswith("data: "):
                                    continue
                                ev = json.loads(line[6:])
                                if "token" in ev and ttft is None:
                                    ttft = time.time() - t0
                                if ev.get("done"):
                                    done = ev
                            if done is None:
                                err = "stream ended without its final event"
                            else:
                                version = int(done["version"])
                                tokens = int(done["usage"]["completion_tokens"])
                                if int(r.headers.get("x-memfit-version", version)) != version:
                                    err = f"stream header version {r.headers.get('x-memfit-version')} != {version}"
                else:
                    r = http.post("/generate", json=body)
                    if r.status_code != 200:
                        err = f"{r.status_code} {r.text[:200]}"
                    else:
                        out = r.json()
                        version = int(out["version"])
                        tokens = int(out["usage"]["completion_tokens"])
                        if int(r.headers["x-memfit-version"]) != version:
                            err = f"header version {r.headers['x-memfit-version']} != body {version}"
            except Exception as e:
                err = f"{type(e).__name__}: {e}"
            t1 = time.time()
            with lock:
                res.requests += 1
                res.streamed += int(stream)
                if err is not None:
                    res.failures.append(err)
                    continue
                res.latencies.append(t1 - t0)
                if ttft is not None:
                    res.ttft.append(ttft)
                res.tokens += tokens
                res.versions_seen[version] = res.versions_seen.get(version, 0) + 1
                if not timeline.was_active(version, t0, t1):
                    res.wrong_version.append(f"version {version} for a request in [{t0:.3f}, {t1:.3f}]")
    finally:
        http.close()


def run_load(
    url: str,
    store_root: Path,
    clients: int = 8,
    duration_s: float = 15.0,
    max_new_tokens: int = 32,
    swap_every_s: float = 1.0,
) -> LoadResult:
    from model_store import Store

    res = LoadResult()
    timeline = Timeline(initial=Store(store_root).active())
    stop = threading.Event()
    lock = threading.Lock()
    errors: list[str] = []
    threads = [
        threading.Thread(
            target=_client, args=(i, url, max_new_tokens, stop, res, lock, timeline), daemon=True
        )
        for i in range(clients)
    ]
    swapper = threading.Thread(
        target=_swapper, args=(url, store_root, swap_every_s, stop, timeline, res, errors), daemon=True
    )
    t0 = time.time()
    for t in threads:
        t.start()
    swapper.start()
    time.sleep(duration_s)
    stop.set()
    swapper.join(60)
    for t in threads:
        t.join(120)
    res.duration_s = time.time() - t0
    res.failures += errors
    return res


def summary(res: LoadResult) -> str:
    f = res.figures()
    return (
        f"{f['requests']} requests ({f['streamed']} streamed) in {res.duration_s:.1f} s, {f['req_per_s']} req/s, "
        f"{f['tokens_per_s']} tokens/s; failed {f['failed']}, wrong version {f['wrong_version']}; "
        f"latency p50 {f['p50_ms']} ms, p95 {f['p95_ms']} ms, max {f['max_ms']} ms; stream TTFT p50 "
        f"{f['stream_ttft_p50_ms']} ms, p95 {f['stream_ttft_p95_ms']} ms; {f['publishes']} publishes + "
        f"{f['rollbacks']} rollbacks (activate call p50 {f['activate_call_p50_ms']} ms, max "
        f"{f['activate_call_max_ms']} ms); versions served {f['versions_served']}"
    )


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")
