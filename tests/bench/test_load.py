"""memfit.bench.load.closed_loop, the one load generator of the serving benchmarks."""

import contextlib
import threading
import time

from memfit.bench.load import closed_loop, write_json


def test_every_item_is_called_once_from_concurrent_clients():
    barrier = threading.Barrier(4, timeout=10)  # the first four calls meet: four clients at once

    def call(x: int) -> int:
        if x < 4:
            barrier.wait()
        time.sleep(0.01)
        return x * x

    run = closed_loop(call, range(20), clients=4)
    assert sorted(run.results) == [x * x for x in range(20)]
    assert len(run.latencies) == 20 and all(t >= 0.01 for t in run.latencies)
    assert run.wall_s >= 0.05  # 20 calls of 10 ms over 4 clients


def test_each_client_enters_its_own_session():
    opened, closed = [], []

    @contextlib.contextmanager
    def session():
        name = f"session-{len(opened)}"
        opened.append(name)
        yield name
        closed.append(name)

    run = closed_loop(lambda s, x: (s, x), "abcdef", clients=3, session=session)
    assert len(opened) == 3 and sorted(closed) == sorted(opened)
    assert sorted(x for _, x in run.results) == list("abcdef")
    assert {s for s, _ in run.results} <= set(opened)


def test_a_failing_call_ends_its_client_only(monkeypatch):
    monkeypatch.setattr(threading, "excepthook", lambda args: None)

    def call(x: int) -> int:
        if x == 0:
            raise RuntimeError("boom")
        return x

    run = closed_loop(call, range(10), clients=2)
    assert sorted(run.results) == list(range(1, 10))  # the other client took the rest


def test_write_json(tmp_path):
    path = write_json({"a": 1}, tmp_path / "out", "r.json")
    assert path == tmp_path / "out" / "r.json"
    assert path.read_text() == '{\n  "a": 1\n}\n'
