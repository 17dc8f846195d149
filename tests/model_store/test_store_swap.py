from __future__ import annotations

import hashlib
import threading
import time

import torch

from model_store import LiveTables


def _digest(tables) -> str:
    hsh = hashlib.sha256()
    for k in sorted(tables):
        hsh.update(tables[k].numpy().tobytes())
    return hsh.hexdigest()


def test_switch_touches_only_changed_rows_and_is_exact(h, store):
    v1 = h.publish_update(store, {1: [1, 2, 3]}, seed=1)
    v2 = h.publish_update(store, {1: [3, 4], 3: [9]}, seed=2)
    store.activate(v1)
    v3 = h.publish_update(store, {3: [5]}, seed=3)
    live = LiveTables.from_store(store, version=v2)
    r = live.switch_to(v3)  # v2 -> v1 -> v3: revert {1: [3, 4], 3: [9]}, apply {3: [5]}
    assert r.rows_written == 4 and r.from_version == v2 and r.to_version == v3 and r.pause_seconds >= 0
    assert h.tables_equal(live.tables, store.materialize(v3))
    r = live.switch_to(0)
    assert r.rows_written == 4  # v1's three rows and v3's one
    assert h.tables_equal(live.tables, store.materialize(0))
    assert live.switch_to(0).rows_written == 0


def test_overlay_for_pinned_version(h, store):
    v1 = h.publish_update(store, {1: [1, 2]}, seed=1)
    v2 = h.publish_update(store, {1: [2, 7], 3: [4]}, seed=2)
    live = LiveTables.from_store(store)
    assert live.version == v2
    with live.swap_lock.read():
        ov = live.overlay_for(v1)
    assert sorted(ov) == [1, 3] and ov[1][0].tolist() == [2, 7] and ov[3][0].tolist() == [4]
    pinned = {k: t.clone() for k, t in live.tables.items()}
    for layer, (idx, rows) in ov.items():
        pinned[layer][idx] = rows
    assert h.tables_equal(pinned, store.materialize(v1))
    assert live.overlay_for(v2) == {}


def test_readers_never_see_a_mixed_version(h, store):
    versions = [0]
    for i in range(6):
        versions.append(h.publish_update(store, h.random_slots(i, t=30), seed=i))
    expected = {v: _digest(store.materialize(v)) for v in versions}
    live = LiveTables.from_store(store, version=0)
    stop = threading.Event()
    seen: list[tuple[int, bool]] = []

    def reader():
        while not stop.is_set():
            with live.swap_lock.read():
                v = live.version
                ok = _digest(live.tables) == expected[v]
            seen.append((v, ok))

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    g = torch.Generator().manual_seed(0)
    deadline = time.monotonic() + 1.5
    swaps = 0
    while time.monotonic() < deadline:
        live.switch_to(versions[int(torch.randint(len(versions), (1,), generator=g))])
        swaps += 1
    stop.set()
    for t in threads:
        t.join()
    assert swaps > 10 and len(seen) > 10
    assert all(ok for _, ok in seen), [v for v, ok in seen if not ok][:5]
    assert len({v for v, _ in seen}) > 1


def test_copy_rows_chunked_equals_index_copy():
    from model_store.swap import copy_rows

    a = torch.randn(2000, 64)
    b = a.clone()
    idx = torch.randperm(2000)[:900].sort().values
    rows = torch.randn(900, 64)
    copy_rows(a, idx, rows)  # 57,600 elements: chunked
    b.index_copy_(0, idx, rows)
    assert torch.equal(a, b)
