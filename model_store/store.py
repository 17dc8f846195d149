"""Store: versioned slot tables on disk (base checkpoint + immutable slot deltas + active pointer).

Layout (see docs/contracts.md "Store"):

    STORE/store.json                 format, base id (sha256 of base/model.safetensors), value-table keys
    STORE/base/                      the transformers model directory (version 0) + background.safetensors
    STORE/versions/0000000007/       delta.safetensors + manifest.json (checksums of both)
    STORE/snapshots/0000000050.*     cumulative rows (every slot changed since base, at that version)
    STORE/ACTIVE                     the active version id, replaced atomically
    STORE/LAST_VERSION               highest id allocated before the last gc (ids are never reused)
    STORE/job_index.json             versions by job id (a cache rebuilt from the manifests: job_index.py)
    STORE/log/                       documents.jsonl, jobs.jsonl, activations.jsonl, gc.jsonl

Publishing writes the version into `versions/.tmp-*`, fsyncs, renames it into place (readers never
see half a version) and only then moves ACTIVE (write temp, fsync, rename, fsync dir). A writer
killed at any point leaves the store at the previous active version (at worst with an unactivated
retained version or a stray temp dir, which the next writer removes). Every step is a named crash
point: `MEMFIT_CRASH_AT=publish:<step>` SIGKILLs the process there (tests/model_store).

All of this works on value tables `{layer: Tensor (N, d)}`: the model is never loaded.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .audit import GCPolicy, StoreAudit
from .errors import (
    BaseMismatchError,
)
from .fsutil import (
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
    fsync_file,
)
from .layout import FORMAT, vname
from .locks import WriterLock
from .publishing import PUBLISH_STEPS
from .tables import (
    find_value_keys,
    has_weights,
    load_value_tables,
    weight_keys,
    weights_id,
)

__all__ = ["FORMAT", "GCPolicy", "PUBLISH_STEPS", "Store", "vname"]


class Store(StoreAudit):
    """A store on disk. The methods live by purpose in the classes it is built from (each the base of
    the next): model_store/layout.py (paths, manifests, reading), snapshots.py (tables, snapshots),
    publishing.py (publish, rebase), activation.py (activate, revert) and audit.py (provenance, gc,
    verify); this module creates and opens stores."""

    @classmethod
    def open(
        cls,
        root: str | Path,
        redis_url: str | None = None,
        *,
        lock: WriterLock | Callable[[str], WriterLock] | None = None,
        **kw: Any,
    ) -> Store:
        """Open a store with its writer lock: `lock` (a WriterLock, or a function of the base id that
        makes one); else with `redis_url` (distributed mode, a store shared by several machines) a
        RedisWriterLock named after the store's base id; else the file lock."""
        if lock is None and redis_url:
            from .locks import RedisWriterLock, redis_lock_name

            def redis_lock(base_id: str) -> WriterLock:
                return RedisWriterLock(redis_url, name=redis_lock_name(base_id))

            lock = redis_lock
        return cls(root, lock=lock, **kw)

    @classmethod
    def init(
        cls,
        root: str | Path,
        model_dir: str | Path,
        *,
        value_keys: dict[int, str] | None = None,
        snapshot_every: int = 50,
        link: bool = True,
        lock: WriterLock | Callable[[str], WriterLock] | None = None,
    ) -> Store:
        """Create a store whose version 0 is `model_dir` (files hard-linked when possible, else copied).

        Idempotent for the same base; a store that exists with another base raises BaseMismatchError.
        """
        import json

        root, model_dir = Path(root), Path(model_dir)
        if not has_weights(model_dir):
            raise FileNotFoundError(
                f"{model_dir / 'model.safetensors'} not found (nor a sharded index): --model must be a model directory"
            )
        base_id = weights_id(model_dir)  # one file: its sha256; shards: over all of them
        if (root / "store.json").exists():
            store = cls(root, lock=lock)
            if store.info["base_id"] != base_id:
                raise BaseMismatchError(
                    f"store {root} has base {store.info['base_id'][:12]} but {model_dir} is {base_id[:12]}"
                )
            return store
        root.mkdir(parents=True, exist_ok=True)
        for sub in ("versions", "snapshots", "log"):
            (root / sub).mkdir(exist_ok=True)
        base = root / "base"
        if base.exists():
            shutil.rmtree(base)  # a previous init died before store.json: start over
        base.mkdir()
        for src in sorted(model_dir.rglob("*")):
            dst = base / src.relative_to(model_dir)
            if src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                if not link:
                    raise OSError
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
                fsync_file(dst)
        fsync_dir(base)
        if value_keys is None:
            memory_layers = None
            cfg = model_dir / "config.json"
            if cfg.exists():
                memory_layers = json.loads(cfg.read_text()).get("memory_layers")
            value_keys = find_value_keys(weight_keys(model_dir), memory_layers)
        tables = load_value_tables(base, value_keys)
        atomic_write_bytes(root / "ACTIVE", b"0\n")
        atomic_write_bytes(root / "LAST_VERSION", b"0\n")
        info = {
            "format": FORMAT,
            "base_id": base_id,
            "created_at": time.time(),
            "source_model_dir": str(model_dir.resolve()),
            "value_keys": {str(k): v for k, v in value_keys.items()},
            "tables": {
                str(k): {"rows": t.shape[0], "dim": t.shape[1], "dtype": str(t.dtype).replace("torch.", "")}
                for k, t in tables.items()
            },
            "snapshot_every": snapshot_every,
        }
        atomic_write_json(root / "store.json", info)  # the store exists from here on
        return cls(root, lock=lock)
