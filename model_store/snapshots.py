"""Value tables of a version: the base's, the cumulative-row snapshots (a checksummed cache every
`snapshot_every` versions deep), materializing and reading rows without whole tables."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .fsutil import (
    atomic_write_json,
    fsync_dir,
    fsync_file,
    sha256_file,
)
from .layout import StoreLayout, vname
from .tables import (
    Rows,
    apply_rows,
    load_value_tables,
    net_rows,
)


class StoreSnapshots(StoreLayout):
    """Tables and snapshots: materialize(v) = base + the latest valid snapshot + the deltas after it."""

    def base_tables(self) -> dict[int, torch.Tensor]:
        """Value tables of version 0 (cached; do not modify them: materialize() returns copies)."""
        with self._cache_lock:
            if self._base is None:
                self._base = load_value_tables(self.base_dir, self.value_keys)
            return self._base

    def _snapshot_paths(self, v: int) -> tuple[Path, Path]:
        return self.snapshots_dir / f"{vname(v)}.safetensors", self.snapshots_dir / f"{vname(v)}.json"

    def _snapshot_valid(self, v: int) -> bool:
        """Whether version `v` has a snapshot whose checksum matches (hashed once per process)."""
        import json

        data, meta = self._snapshot_paths(v)
        try:
            st = data.stat()
            key = (st.st_mtime, st.st_size)
            if self._snap_ok.get(v) == key:
                return True
            info = json.loads(meta.read_text())
            if st.st_size != info["bytes"] or sha256_file(data) != info["sha256"]:
                return False
        except Exception:
            return False
        self._snap_ok[v] = key
        return True

    def _load_snapshot(self, v: int) -> Rows | None:
        """Cumulative rows at `v`, or None when there is no valid snapshot (snapshots are a cache)."""
        if not self._snapshot_valid(v):
            return None
        try:
            t = load_file(str(self._snapshot_paths(v)[0]))
        except Exception:
            self._snap_ok.pop(v, None)
            return None
        layers = {int(k.split(".")[0][len("layer") :]) for k in t}
        return {layer: (t[f"layer{layer}.indices"], t[f"layer{layer}.rows"]) for layer in layers}

    def write_snapshot(self, v: int) -> Path:
        """Write the cumulative rows of version `v` (every slot changed since the base)."""
        rows = self._cumulative(self.chain(v))
        data, meta = self._snapshot_paths(v)
        self.snapshots_dir.mkdir(exist_ok=True)
        tmp = data.with_name(f".{data.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        tensors = {}
        for layer, (idx, r) in rows.items():
            tensors[f"layer{layer}.indices"] = idx.contiguous()
            tensors[f"layer{layer}.rows"] = r.contiguous()
        save_file(tensors, str(tmp), metadata={"version": str(v)})
        fsync_file(tmp)
        os.replace(tmp, data)
        fsync_dir(self.snapshots_dir)
        atomic_write_json(
            meta,
            {
                "version": v,
                "depth": len(self.chain(v)) - 1,
                "sha256": sha256_file(data),
                "bytes": data.stat().st_size,
            },
        )
        return data

    def _cumulative(self, chain: list[int], max_plain: int | None = None) -> Rows:
        """Net rows written along `chain` ([0, ..., v]), starting from the latest valid snapshot."""
        start, seq = 0, []
        for i in range(len(chain) - 1, 0, -1):
            if self._snapshot_valid(chain[i]):
                snap = self._load_snapshot(chain[i])
                if snap is not None:
                    start = i
                    seq = [(layer, idx, r) for layer, (idx, r) in snap.items()]
                    break
        for v in chain[start + 1 :]:
            d = self.load_delta(v)
            seq += [(layer, ld.indices, ld.new_rows) for layer, ld in d.layers.items()]
        return net_rows(seq)

    def materialize(self, version: int | None = None) -> dict[int, torch.Tensor]:
        """Exact value tables of `version` (default: active): base + snapshot + the deltas after it."""
        v = self.active() if version is None else int(version)
        chain = self.chain(v)
        tables = {layer: t.clone() for layer, t in self.base_tables().items()}
        apply_rows(tables, self._cumulative(chain))
        return tables

    def rows_at(self, version: int, indices: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Rows `indices[layer]` of `version`'s tables, without materializing whole tables."""
        cum = self._cumulative(self.chain(version))
        base = self.base_tables()
        out = {}
        for layer, idx in indices.items():
            idx = idx.to(torch.int64)
            rows = base[layer].index_select(0, idx).clone()
            if layer in cum:
                ci, cr = cum[layer]
                hit = torch.isin(idx, ci)
                if hit.any():
                    rows[hit] = cr[torch.searchsorted(ci, idx[hit])]
            out[layer] = rows
        return out

    def ensure_snapshots(self, version: int | None = None) -> list[int]:
        """Write the missing snapshots (every `snapshot_every` deep) along a chain; returns them."""
        chain = self.chain(self.active() if version is None else version)
        made = []
        for depth, v in enumerate(chain):
            if depth and depth % self.snapshot_every == 0 and not self._snapshot_valid(v):
                self.write_snapshot(v)
                made.append(v)
        return made
