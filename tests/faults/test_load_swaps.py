"""8 clients on /generate of a live `memfit serve` (tiny model, 32 new tokens, a third streaming) for
15 s while a version is published and activated, then rolled back, every second: no request fails and
every response's version was active at some time during its request (tests/faults/loadswap.py).
Longer and wider (60 s, 32 clients): benchmarks/load_during_swaps.py."""

from __future__ import annotations

import pytest

from model_store import Store
from tests.faults.loadswap import run_load, summary
from tests.service.conftest import ServerProcess

pytestmark = pytest.mark.integration


def test_generate_during_publishes_and_rollbacks(tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    Store.init(store, tiny_model_dir)
    server = ServerProcess(tiny_model_dir, store, tmp_path, {"OMP_NUM_THREADS": "1"}).start()
    try:
        res = run_load(server.url, store, clients=8, duration_s=15.0, max_new_tokens=32, swap_every_s=1.0)
    finally:
        server.kill()
    print(summary(res))
    assert res.failures == [], res.failures[:5]
    assert res.wrong_version == [], res.wrong_version[:5]
    assert res.requests >= 16 and res.streamed >= 4, summary(res)
    assert res.publishes >= 5 and res.rollbacks >= 5, summary(res)
    assert len(res.versions_seen) >= 3, summary(res)  # the swaps really changed what was served
