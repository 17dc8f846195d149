"""The background access table (memlm.background.BackgroundStats) held in Redis, versioned by base id.

Integration points:
- `seed(url, stats) -> str`: write `stats` under its base id (called by `memfit background --to-redis`).
- `load(url, base_id) -> BackgroundStats`: read the table of exactly that base; a table of another
  base is refused (BackgroundMismatch): a worker never mixes one base's IDF with another's model.
- `ensure(url, model_dir) -> BackgroundStats`: at worker start: load the table of `model_dir`'s base,
  seeding it first from `model_dir/background.safetensors` when Redis has none.
- `exists(url, base_id) -> bool`, `delete(url, base_id)`.

Keys (everything of one base under one prefix, written in one MULTI/EXEC transaction, so a reader
sees a whole table or none):

    memfit:bg:{base_id}:meta        hash: base_id, num_docs, unit, meta (JSON), layers (JSON list),
                                    format, seeded_at, and per layer dtype.L / shape.L / sha256.L
    memfit:bg:{base_id}:df:{layer}  raw little-endian int64 bytes of df (N,)
    memfit:bg:current               the base id seeded last (only to name it in errors)

No pickle: tensors are raw bytes with their dtype and shape in the meta hash, checked on load.
`url` may also be a redis.Redis client.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memlm.background import BACKGROUND_FILE, BackgroundStats, model_base_id

PREFIX = "memfit:bg"
CURRENT_KEY = f"{PREFIX}:current"
FORMAT = "1"
DTYPE = "<i8"  # df counts: little-endian int64 whatever the host's byte order


class BackgroundMismatch(ValueError):
    """The table in Redis belongs to another base model (or is missing for this one)."""


def _client(url_or_client: Any):
    if isinstance(url_or_client, str):
        import redis

        # a reply timeout per read, not per table: a large table keeps arriving within it
        return redis.Redis.from_url(url_or_client, socket_connect_timeout=3, socket_timeout=30)
    return url_or_client


def meta_key(base_id: str) -> str:
    return f"{PREFIX}:{base_id}:meta"


def df_key(base_id: str, layer: int) -> str:
    return f"{PREFIX}:{base_id}:df:{int(layer)}"


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def seed(url: Any, stats: BackgroundStats) -> str:
    """Write `stats` into Redis under `stats.base_id` (replacing a previous table of that base).
    Returns the base id."""
    if not stats.base_id:
        raise ValueError("background statistics without a base_id cannot be shared: recompute them")
    r = _client(url)
    base = stats.base_id
    meta: dict[str, str] = {
        "format": FORMAT,
        "base_id": base,
        "num_docs": str(int(stats.num_docs)),
        "unit": stats.unit,
        "meta": json.dumps(stats.meta, default=str),
        "layers": json.dumps(sorted(int(k) for k in stats.df)),
        "seeded_at": repr(time.time()),
    }
    blobs: dict[str, bytes] = {}
    for layer, df in sorted(stats.df.items()):
        arr = df.detach().cpu().contiguous().numpy().astype(DTYPE, copy=False)
        data = arr.tobytes()
        blobs[df_key(base, layer)] = data
        meta[f"dtype.{layer}"] = DTYPE
        meta[f"shape.{layer}"] = json.dumps(list(arr.shape))
        meta[f"sha256.{layer}"] = hashlib.sha256(data).hexdigest()
    old_layers = r.hget(meta_key(base), "layers")
    with r.pipeline(transaction=True) as p:
        if old_layers is not None:
            for layer in json.loads(_s(old_layers)):
                p.delete(df_key(base, layer))
        p.delete(meta_key(base))
        for k, data in blobs.items():
            p.set(k, data)
        p.hset(meta_key(base), mapping=meta)
        p.set(CURRENT_KEY, base)
        p.execute()
    return base


def exists(url: Any, base_id: str) -> bool:
    return bool(_client(url).exists(meta_key(base_id)))


def delete(url: Any, base_id: str) -> None:
    r = _client(url)
    layers = r.hget(meta_key(base_id), "layers")
    keys = [meta_key(base_id)]
    if layers is not None:
        keys += [df_key(base_id, layer) for layer in json.loads(_s(layers))]
    r.delete(*keys)


def load(url: Any, base_id: str) -> BackgroundStats:
    """The table of base `base_id`; BackgroundMismatch when Redis holds none for it (naming the base it
    does hold), or when the stored table says another base or fails its checksums."""
    if not base_id:
        raise ValueError("load() needs the base id of the model (memlm.background.model_base_id)")
    r = _client(url)
    with r.pipeline(transaction=True) as p:
        p.hgetall(meta_key(base_id))
        p.get(CURRENT_KEY)
        raw, current = p.execute()
    if not raw:
        other = _s(current) if current is not None else None
        hint = f"; Redis holds the table of base {other[:12]} (another model)" if other else ""
        raise BackgroundMismatch(
            f"no background table for base {base_id[:12]} in Redis{hint}: "
            f"run `memfit background --model DIR --to-redis URL` for this model"
        )
    meta = {_s(k): _s(v) for k, v in raw.items()}
    if meta.get("base_id") != base_id:
        raise BackgroundMismatch(
            f"background table under {meta_key(base_id)} says base {meta.get('base_id', '?')[:12]}, "
            f"not {base_id[:12]}: refusing to mix tables"
        )
    if meta.get("format") != FORMAT:
        raise BackgroundMismatch(f"background table format {meta.get('format')}; this code reads {FORMAT}")
    layers = [int(x) for x in json.loads(meta["layers"])]
    blobs = r.mget([df_key(base_id, layer) for layer in layers]) if layers else []
    df: dict[int, torch.Tensor] = {}
    for layer, data in zip(layers, blobs):
        if data is None:
            raise BackgroundMismatch(f"background table of base {base_id[:12]}: df of layer {layer} missing")
        if hashlib.sha256(data).hexdigest() != meta[f"sha256.{layer}"]:
            raise BackgroundMismatch(
                f"background table of base {base_id[:12]}: df of layer {layer} fails its sha256"
            )
        dtype = np.dtype(meta[f"dtype.{layer}"])
        shape = tuple(json.loads(meta[f"shape.{layer}"]))
        expected = int(np.prod(shape)) * dtype.itemsize
        if len(data) != expected:
            raise BackgroundMismatch(
                f"background table of base {base_id[:12]}: layer {layer} has {len(data)} bytes, "
                f"shape {shape} of {dtype} needs {expected}"
            )
        arr = np.frombuffer(data, dtype=dtype).reshape(shape).astype(np.int64)  # native-order copy
        df[layer] = torch.from_numpy(arr)
    return BackgroundStats(
        df=df,
        num_docs=int(meta["num_docs"]),
        unit=meta["unit"],
        base_id=base_id,
        meta=json.loads(meta.get("meta") or "{}"),
    )


def ensure(url: Any, model_dir: str | Path) -> BackgroundStats:
    """The Redis table of `model_dir`'s base, seeded from `model_dir/background.safetensors` when absent.

    `model_dir` is a model directory or a store's `base/` directory."""
    model_dir = Path(model_dir)
    base_id = model_base_id(model_dir)
    r = _client(url)
    if r.exists(meta_key(base_id)):
        return load(r, base_id)
    if not (model_dir / BACKGROUND_FILE).exists():
        raise FileNotFoundError(
            f"no background table for base {base_id[:12]} in Redis and no {BACKGROUND_FILE} in {model_dir}: "
            f"run `memfit background --model {model_dir} --to-redis URL`"
        )
    stats = BackgroundStats.load(model_dir, expected_base_id=base_id)
    seed(r, stats)
    return load(r, base_id)
