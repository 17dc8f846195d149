"""Graceful shutdown (issue 17, "Shutdown"): streaming generations in flight at SIGTERM complete.

A live `memfit serve` (tiny model) with one decoding thread of batch size 1, so that ten 500-token
streams run one after another (~1.7 s each on the 2-core box: the last one ends ~11-17 s after the
SIGTERM). Before: MEMFIT_SHUTDOWN_GRACE_S defaulted to 5 s, so uvicorn cut the streams still running
5 s after the signal (compose allowed 60 s and k8s 75 s for nothing). Now it defaults to 50 s and
every stream ends with its final event; the process exits after the last one.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx

N_STREAMS = 10
TOKENS = 500


def test_streams_in_flight_at_sigterm_complete(server_factory):
    s = server_factory(
        {
            "MEMFIT_GENERATION_WORKERS": "1",
            "MEMFIT_MAX_BATCH_SIZE": "1",
            "MEMFIT_MAX_NEW_TOKENS_LIMIT": str(TOKENS),
        }
    )  # MEMFIT_SHUTDOWN_GRACE_S: the default
    results: list[dict] = [{} for _ in range(N_STREAMS)]
    started = threading.Event()

    def stream(i: int) -> None:
        body = {"prompt": "1 2 3 4 5 6 7", "max_new_tokens": TOKENS, "stream": True}
        events = []
        try:
            with httpx.stream("POST", s.url + "/generate", json=body, timeout=120) as r:
                results[i]["status"] = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        events.append(json.loads(line[5:]))
                        started.set()
        except httpx.HTTPError as e:
            results[i]["error"] = f"{type(e).__name__}: {e}"
        results[i]["events"] = events

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(N_STREAMS)]
    for t in threads:
        t.start()
        # admitted in order, one decoding after the other; all ten within ~0.1 s, since the tiny model may
        # end a stream at EOS after ~200 tokens (a fresh build did), well under a second of decoding
        time.sleep(0.01)
    assert started.wait(60), "no stream started"

    def in_flight() -> float:  # every request admitted (1 decoding, the others waiting) before SIGTERM
        text = httpx.get(s.url + "/metrics", timeout=10).text
        names = ("memfit_generation_requests_running ", "memfit_generation_requests_waiting ")
        return sum(float(line.split()[1]) for line in text.splitlines() if line.startswith(names))

    deadline = time.monotonic() + 30
    while in_flight() < N_STREAMS and time.monotonic() < deadline:
        time.sleep(0.02)
    assert in_flight() == N_STREAMS, [(r.get("status"), len(r.get("events", []))) for r in results]
    t_term = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    took = time.monotonic() - t_term
    rc = s.proc.wait(60)
    done = [r for r in results if r.get("events") and r["events"][-1].get("done")]
    summary = [(r.get("status"), len(r.get("events", [])), r.get("error")) for r in results]
    assert len(done) == N_STREAMS, (summary, s.log()[-2000:])
    assert all(r["status"] == 200 and "error" not in r for r in results), summary
    assert rc in (0, -signal.SIGTERM), s.log()[-2000:]  # uvicorn re-raises the signal it handled
    print(f"{N_STREAMS} streams completed {took:.1f} s after SIGTERM; exit code {rc}")
