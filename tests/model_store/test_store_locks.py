from __future__ import annotations

import threading
import time

import pytest

from model_store import FileWriterLock, LockTimeout, RedisWriterLock


def _exclusive(lock_a, lock_b):
    order = []

    def hold():
        with lock_a:
            order.append("a-in")
            time.sleep(0.2)
            order.append("a-out")

    t = threading.Thread(target=hold)
    t.start()
    time.sleep(0.05)
    with lock_b:
        order.append("b-in")
    t.join()
    return order


def test_file_lock_exclusive_and_reentrant(tmp_path):
    a, b = FileWriterLock(tmp_path / "w.lock"), FileWriterLock(tmp_path / "w.lock")
    assert _exclusive(a, b) == ["a-in", "a-out", "b-in"]
    with a, a:  # re-entrant in one thread; other holders time out meanwhile
        err: list[Exception] = []
        t = threading.Thread(target=_try, args=(b, err))
        t.start()
        t.join()
        assert err and isinstance(err[0], LockTimeout)
    b.acquire(timeout=1)
    b.release()


def _try(lock, err):
    try:
        lock.acquire(timeout=0.1)
    except LockTimeout as e:
        err.append(e)


@pytest.mark.integration
def test_redis_lock(redis_server):
    a = RedisWriterLock(redis_server.url, "t:lock", ttl_s=5)
    b = RedisWriterLock(redis_server.url, "t:lock", ttl_s=5)
    assert _exclusive(a, b) == ["a-in", "a-out", "b-in"]
    with a:
        with a:
            assert a.held()
        assert a.extend()
        with pytest.raises(LockTimeout):
            b.acquire(timeout=0.1)
    assert not a.held()
    # an expired holder cannot release the new holder's lock
    c = RedisWriterLock(redis_server.url, "t:lock2", ttl_s=0.1)
    d = RedisWriterLock(redis_server.url, "t:lock2", ttl_s=5)
    c.acquire()
    time.sleep(0.2)
    d.acquire(timeout=1)
    c.release()
    assert d.held()
    d.release()


@pytest.mark.integration
def test_store_with_redis_lock_serialises_publishers(h, store, redis_server):
    from model_store import ActiveMovedError, Store

    writers = [Store.open(store.root, redis_url=redis_server.url) for _ in range(2)]
    assert isinstance(writers[0].lock, RedisWriterLock)
    base = store.materialize(0)
    results: list[object] = []

    def publish(s, seed):
        try:
            results.append(s.publish(h.make_delta(base, h.random_slots(seed), seed), parent=0))
        except ActiveMovedError as e:
            results.append(e)

    ts = [threading.Thread(target=publish, args=(w, i)) for i, w in enumerate(writers)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sorted(map(type, results), key=str) == sorted([int, ActiveMovedError], key=str)
    assert store.active() == 1 and store.version_ids() == [0, 1]


def test_every_distributed_writer_takes_the_same_redis_lock(store):
    """`Store.open(root, redis_url)` (the CLI) and workers.runtime.writer_lock (API replicas, workers)
    name one lock per base: two names would let an operator's rollback race a worker's publish."""
    from memfit.config import Settings
    from model_store import Store
    from model_store.locks import redis_lock_name
    from workers.runtime import writer_lock

    url = "redis://127.0.0.1:1/0"  # never connected: the clients connect on first command
    cli = Store.open(store.root, url).lock
    worker = Store.open(store.root, lock=writer_lock(url, Settings(redis_url=url))).lock
    assert isinstance(cli, RedisWriterLock) and isinstance(worker, RedisWriterLock)
    assert (
        cli.name
        == worker.name
        == redis_lock_name(store.base_id)
        == f"memfit:store:{store.base_id[:16]}:writer"
    )
