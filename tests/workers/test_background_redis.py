"""Background table through Redis: round trip, refusal of a foreign base id, ensure() seeding once."""

from __future__ import annotations

import pytest
import torch

from memlm.background import BackgroundStats, model_base_id

pytestmark = pytest.mark.integration


def _stats(base_id: str, n: int = 64) -> BackgroundStats:
    g = torch.Generator().manual_seed(0)
    return BackgroundStats(
        df={1: torch.randint(0, 10, (n,), generator=g), 3: torch.randint(0, 10, (n,), generator=g)},
        num_docs=10,
        unit="sequence",
        base_id=base_id,
        meta={"seq_len": 128, "batch_size": 16},
    )


def test_round_trip_and_foreign_base_refused(redis_server):
    from workers import background_redis as bg

    stats = _stats("a" * 64)
    assert bg.seed(redis_server.url, stats) == "a" * 64
    back = bg.load(redis_server.url, "a" * 64)
    assert back.num_docs == 10 and back.unit == "sequence" and back.base_id == "a" * 64
    assert back.meta == {"seq_len": 128, "batch_size": 16}
    assert sorted(back.df) == [1, 3]
    for layer in stats.df:
        assert back.df[layer].dtype == torch.long
        assert torch.equal(back.df[layer], stats.df[layer])
    # raw little-endian bytes, not pickle
    import redis

    raw = redis.Redis.from_url(redis_server.url).get(bg.df_key("a" * 64, 1))
    assert raw == stats.df[1].numpy().astype("<i8").tobytes()

    with pytest.raises(bg.BackgroundMismatch, match="aaaaaaaaaaaa"):
        bg.load(redis_server.url, "b" * 64)

    # a corrupted blob is refused, never half-used
    redis.Redis.from_url(redis_server.url).set(bg.df_key("a" * 64, 3), b"\x00" * 8)
    with pytest.raises(bg.BackgroundMismatch, match="sha256"):
        bg.load(redis_server.url, "a" * 64)


def test_ensure_seeds_from_model_dir(redis_server, tiny_model_dir):
    from workers import background_redis as bg

    base = model_base_id(tiny_model_dir)
    assert not bg.exists(redis_server.url, base)
    stats = bg.ensure(redis_server.url, tiny_model_dir)
    assert bg.exists(redis_server.url, base)
    local = BackgroundStats.load(tiny_model_dir)
    assert stats.base_id == base and stats.num_docs == local.num_docs
    for layer in local.df:
        assert torch.equal(stats.df[layer], local.df[layer])
    assert bg.ensure(redis_server.url, tiny_model_dir).num_docs == local.num_docs  # second call: a load
