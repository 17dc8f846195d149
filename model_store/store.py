"""Store: versioned slot tables on disk (base checkpoint + immutable slot deltas + active pointer).

Layout (see docs/contracts.md "Store"):

    STORE/store.json                 format, base id (sha256 of base/model.safetensors), value-table keys
    STORE/base/                      the transformers model directory (version 0) + background.safetensors
    STORE/versions/0000000007/       delta.safetensors + manifest.json (checksums of both)
    STORE/snapshots/0000000050.*     cumulative rows (every slot changed since base, at that version)
    STORE/ACTIVE                     the active version id, replaced atomically
    STORE/LAST_VERSION               highest id allocated before the last gc (ids are never reused)
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
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from memlm.delta import LayerDelta, SlotDelta

from .errors import (
    ActiveMovedError,
    BaseMismatchError,
    CorruptVersionError,
    DocumentNotTaught,
    NeedsRetrain,
    RebaseConflict,
    RevertConflict,
    StoreError,
    StoreNotFoundError,
    UnknownVersionError,
)
from .fsutil import (
    append_jsonl,
    atomic_write_bytes,
    atomic_write_json,
    crash_point,
    fsync_dir,
    fsync_file,
    read_jsonl,
    sha256_file,
    sha256_json,
)
from .joblog import JobLog
from .locks import FileWriterLock, WriterLock
from .tables import (
    Rows,
    apply_rows,
    find_value_keys,
    has_weights,
    load_value_tables,
    net_rows,
    weight_keys,
    weights_id,
)

FORMAT = 1
PUBLISH_STEPS = (
    "publish:locked",
    "publish:tmp_created",
    "publish:delta_written",
    "publish:manifest_written",
    "publish:renamed",
    "publish:active_tmp_written",
    "publish:active_replaced",
    "publish:logged",
    "publish:snapshot_written",
)


def vname(v: int) -> str:
    return f"{int(v):010d}"


@dataclass
class GCPolicy:
    keep_last: int = 20  # retained versions (newest ids) kept besides the active chain
    keep_rejected: bool = False  # rejected versions are audit records; drop them by default
    keep: list[int] = field(default_factory=list)  # versions always kept (with their chains)


class Store:
    def __init__(
        self,
        root: str | Path,
        lock: WriterLock | None = None,
        snapshot_every: int | None = None,
        delta_cache_size: int = 256,
    ) -> None:
        self.root = Path(root)
        info_path = self.root / "store.json"
        if not info_path.exists():
            raise StoreNotFoundError(
                f"{self.root} is not a memfit store (no store.json); create it with Store.init"
            )
        import json

        self.info: dict[str, Any] = json.loads(info_path.read_text())
        if self.info.get("format") != FORMAT:
            raise StoreError(
                f"store format {self.info.get('format')} in {info_path}; this code reads {FORMAT}"
            )
        self.value_keys: dict[int, str] = {int(k): v for k, v in self.info["value_keys"].items()}
        self.table_info: dict[int, dict[str, Any]] = {int(k): v for k, v in self.info["tables"].items()}
        self.snapshot_every = int(snapshot_every or self.info.get("snapshot_every", 50))
        self.lock = lock or FileWriterLock(self.root / ".writer.lock")
        self._cache_lock = threading.RLock()
        self._manifests: dict[int, dict[str, Any]] = {}
        self._deltas: OrderedDict[int, SlotDelta] = OrderedDict()
        self._delta_cache_size = delta_cache_size
        self._slots: dict[int, dict[int, torch.Tensor]] = {}
        self._snap_ok: dict[int, tuple[float, int]] = {}
        self._verified: dict[tuple[int, str], tuple[int, int, int]] = {}
        self._base: dict[int, torch.Tensor] | None = None
        self._jobs: JobLog | None = None
        # called after each publish, outside the writer lock, as hook(version, activated, job_id)
        # (the distributed worker announces the new version on Redis: workers.runtime)
        self.publish_hooks: list[Callable[[int, bool, str | None], None]] = []

    @classmethod
    def open(cls, root: str | Path, redis_url: str | None = None, **kw: Any) -> Store:
        """Open a store; with `redis_url` (distributed mode, a store shared by several machines) the
        writer lock is a RedisWriterLock named after the store's base id, else a file lock."""
        store = cls(root, **kw)
        if redis_url and "lock" not in kw:
            from .locks import RedisWriterLock, redis_lock_name

            store.lock = RedisWriterLock(redis_url, name=redis_lock_name(store.base_id))
        return store

    # -- creation ----------------------------------------------------------------------------------
    @classmethod
    def init(
        cls,
        root: str | Path,
        model_dir: str | Path,
        *,
        value_keys: dict[int, str] | None = None,
        snapshot_every: int = 50,
        link: bool = True,
        lock: WriterLock | None = None,
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

    # -- paths -------------------------------------------------------------------------------------
    @property
    def base_dir(self) -> Path:
        return self.root / "base"

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    @property
    def snapshots_dir(self) -> Path:
        return self.root / "snapshots"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def base_id(self) -> str:
        return self.info["base_id"]

    def version_dir(self, v: int) -> Path:
        return self.versions_dir / vname(v)

    @property
    def jobs(self) -> JobLog:
        """The job and document log of this store (STORE/log)."""
        with self._cache_lock:
            if self._jobs is None:
                self._jobs = JobLog(self.log_dir)
            return self._jobs

    # -- reading -----------------------------------------------------------------------------------
    def active(self) -> int:
        """The active version id (read from disk each call, so other processes' changes show)."""
        text = (self.root / "ACTIVE").read_text().strip()
        try:
            return int(text)
        except ValueError as e:
            raise StoreError(f"{self.root / 'ACTIVE'} holds {text!r}, not a version id") from e

    def version_ids(self) -> list[int]:
        """Every published version (0 included), ascending; temp dirs are not versions."""
        ids = [0]
        for p in self.versions_dir.iterdir():
            if p.is_dir() and p.name.isdigit():
                ids.append(int(p.name))
        return sorted(ids)

    def _last_id(self) -> int:
        try:
            last = int((self.root / "LAST_VERSION").read_text().strip())
        except (FileNotFoundError, ValueError):
            last = 0
        return max([last, *self.version_ids()])

    def _base_manifest(self) -> dict[str, Any]:
        return {
            "id": 0,
            "parent": None,
            "created_at": self.info["created_at"],
            "job_id": None,
            "documents": [],
            "settings": {},
            "evaluation": {},
            "report": {"source_model_dir": self.info.get("source_model_dir")},
            "state": "active",
            "kind": "base",
            "slots_changed": {"total": 0, "layers": {}},
            "base_id": self.base_id,
        }

    def manifest(self, v: int) -> dict[str, Any]:
        """The manifest of version `v` (checksum of the manifest itself verified on first read)."""
        v = int(v)
        if v == 0:
            return self._base_manifest()
        with self._cache_lock:
            m = self._manifests.get(v)
        if m is not None:
            return m
        m = self._read_manifest(v)
        with self._cache_lock:
            self._manifests[v] = m
        return m

    def _read_manifest(self, v: int) -> dict[str, Any]:
        import json

        d = self.version_dir(v)
        if not d.is_dir():
            raise UnknownVersionError(v)
        path = d / "manifest.json"
        try:
            m = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise CorruptVersionError(v, f"{path} is missing") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptVersionError(v, f"{path} is not valid JSON ({e})") from e
        if not isinstance(m, dict) or "manifest_sha256" not in m:
            raise CorruptVersionError(v, f"{path} has no manifest_sha256")
        want = m.pop("manifest_sha256")
        if sha256_json(m) != want:
            raise CorruptVersionError(v, f"{path} fails its checksum")
        m["manifest_sha256"] = want
        if m.get("id") != v:
            raise CorruptVersionError(v, f"{path} says id {m.get('id')}")
        return m

    def _verify_files(self, v: int, m: dict[str, Any], force: bool = False) -> None:
        """Check the files of version `v` against its manifest. A file already hashed by this process
        is not hashed again while its inode, size and mtime are unchanged (unless `force`)."""
        for name, meta in m.get("files", {}).items():
            p = self.version_dir(v) / name
            try:
                st = p.stat()
            except FileNotFoundError as e:
                raise CorruptVersionError(v, f"{p} is missing") from e
            if st.st_size != meta["bytes"]:
                raise CorruptVersionError(
                    v, f"{p} has {st.st_size} bytes, manifest says {meta['bytes']} (truncated?)"
                )
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            if not force and self._verified.get((v, name)) == key:
                continue
            if sha256_file(p) != meta["sha256"]:
                self._verified.pop((v, name), None)
                raise CorruptVersionError(v, f"{p} fails its sha256 checksum")
            self._verified[(v, name)] = key

    def load_delta(self, v: int, verify: bool = True) -> SlotDelta:
        """The delta of version `v`; its checksums are verified when it is first loaded."""
        v = int(v)
        if v == 0:
            return SlotDelta(layers={})
        with self._cache_lock:
            d = self._deltas.get(v)
            if d is not None:
                self._deltas.move_to_end(v)
                return d
        m = self.manifest(v)
        if verify:
            self._verify_files(v, m)
        try:
            d = SlotDelta.load(self.version_dir(v) / "delta.safetensors")
        except Exception as e:  # safetensors raises several types on a damaged file
            raise CorruptVersionError(v, f"delta.safetensors does not load ({e})") from e
        with self._cache_lock:
            self._deltas[v] = d
            self._slots[v] = {layer: ld.indices for layer, ld in d.layers.items()}
            while len(self._deltas) > self._delta_cache_size:
                self._deltas.popitem(last=False)
        return d

    def slot_sets(self, v: int) -> dict[int, torch.Tensor]:
        """{layer: sorted slot indices} that version `v` wrote."""
        v = int(v)
        if v == 0:
            return {}
        with self._cache_lock:
            s = self._slots.get(v)
        if s is not None:
            return s
        m = self.manifest(v)
        self._verify_files(v, m)
        from safetensors import safe_open

        out = {}
        with safe_open(str(self.version_dir(v) / "delta.safetensors"), framework="pt") as f:
            for k in f.keys():
                if k.endswith(".indices"):
                    out[int(k.split(".")[0][len("layer") :])] = f.get_tensor(k).to(torch.int64)
        with self._cache_lock:
            self._slots[v] = out
        return out

    def chain(self, v: int) -> list[int]:
        """Ancestors of `v` back to the base: [0, ..., v]."""
        out = [int(v)]
        seen = {int(v)}
        while out[-1] != 0:
            p = self.manifest(out[-1])["parent"]
            if p is None or int(p) in seen:
                raise CorruptVersionError(out[-1], f"broken parent link ({p})")
            out.append(int(p))
            seen.add(int(p))
        return out[::-1]

    def is_in_active_chain(self, v: int) -> bool:
        try:
            return int(v) in self.chain(self.active())
        except StoreError:
            return False

    def versions(self) -> list[dict[str, Any]]:
        """Every version's manifest (without checksums), with `active`, `in_active_chain` and `state`
        (active | retained | rejected | corrupt), ascending by id."""
        active = self.active()
        try:
            active_chain = set(self.chain(active))
        except StoreError:
            active_chain = {active}
        out = []
        for v in self.version_ids():
            try:
                m = dict(self.manifest(v))
            except StoreError as e:
                out.append(
                    {
                        "id": v,
                        "state": "corrupt",
                        "active": v == active,
                        "in_active_chain": False,
                        "error": str(e),
                    }
                )
                continue
            m.pop("manifest_sha256", None)
            state = "active" if v == active else ("rejected" if m.get("state") == "rejected" else "retained")
            m.update(state=state, active=v == active, in_active_chain=v in active_chain)
            out.append(m)
        return out

    def activations(self) -> list[dict[str, Any]]:
        return read_jsonl(self.log_dir / "activations.jsonl")

    # -- value tables ------------------------------------------------------------------------------
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

    # -- publishing --------------------------------------------------------------------------------
    def _validate_delta(self, delta: SlotDelta) -> None:
        for layer, ld in delta.layers.items():
            if layer not in self.table_info:
                raise ValueError(
                    f"delta touches layer {layer}; this store's memory layers are {sorted(self.table_info)}"
                )
            info = self.table_info[layer]
            idx = ld.indices
            if idx.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"layer {layer}: indices dtype {idx.dtype}, expected int64")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= info["rows"]):
                raise ValueError(f"layer {layer}: slot indices outside [0, {info['rows']})")
            if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise ValueError(f"layer {layer}: slot indices must be sorted and unique")
            if ld.new_rows.dim() != 2 or ld.new_rows.shape[1] != info["dim"]:
                raise ValueError(
                    f"layer {layer}: rows {tuple(ld.new_rows.shape)}, table dim is {info['dim']}"
                )
            want = getattr(torch, info["dtype"])
            if ld.new_rows.dtype != want or ld.old_rows.dtype != want:
                raise ValueError(f"layer {layer}: rows are {ld.new_rows.dtype}, the table is {want}")

    def _clean_tmp(self) -> None:
        for p in list(self.versions_dir.iterdir()):
            if p.name.startswith(".tmp-") or p.name.startswith(".deleted-"):
                shutil.rmtree(p, ignore_errors=True)

    def _path(self, a: int, b: int) -> tuple[int, list[int], list[int]]:
        """(common ancestor, versions of a's chain after it, versions of b's chain after it)."""
        ca, cb = self.chain(a), self.chain(b)
        i = 0
        while i < min(len(ca), len(cb)) and ca[i] == cb[i]:
            i += 1
        return ca[i - 1], ca[i:], cb[i:]

    def _overlaps(
        self, mine: dict[int, torch.Tensor], versions: list[int]
    ) -> dict[int, dict[int, list[int]]]:
        conflicts: dict[int, dict[int, list[int]]] = {}
        for w in versions:
            for layer, idx in self.slot_sets(w).items():
                if layer in mine:
                    hit = mine[layer][torch.isin(mine[layer], idx)]
                    if hit.numel():
                        conflicts.setdefault(w, {})[layer] = hit.tolist()
        return conflicts

    def rebase(self, delta: SlotDelta, parent: int, new_active: int) -> SlotDelta:
        """`delta` (trained on `parent`) moved onto `new_active`, exact when the slot sets of the delta
        and of every version between the two are disjoint; raises RebaseConflict otherwise."""
        _, down, up = self._path(parent, new_active)
        mine = {layer: ld.indices.to(torch.int64) for layer, ld in delta.layers.items()}
        conflicts = self._overlaps(mine, down + up)
        if conflicts:
            raise RebaseConflict(parent, new_active, conflicts)
        old = self.rows_at(new_active, mine)
        layers = {
            layer: LayerDelta(ld.indices.clone(), ld.new_rows.clone(), old[layer])
            for layer, ld in delta.layers.items()
        }
        report = {**delta.report, "rebased_from": parent, "rebased_onto": new_active}
        return SlotDelta(layers=layers, report=report)

    def publish(
        self,
        delta: SlotDelta,
        parent: int,
        job_id: str | None = None,
        documents: list[Any] = (),  # type: ignore[assignment]
        settings: dict[str, Any] | None = None,
        evaluation: dict[str, Any] | None = None,
        activate: bool = True,
        state: str = "active",
        report: dict[str, Any] | None = None,
        kind: str = "update",
        extra: dict[str, Any] | None = None,
        who: str = "publisher",
        why: str | None = None,
        rebase: bool = False,
    ) -> int:
        """Write `delta` as a new immutable version and (by default) make it active.

        Compare-and-set: when activating and ACTIVE != `parent`, raises ActiveMovedError(expected,
        actual); with `rebase=True` it rebases instead (under the writer lock), raising RebaseConflict
        when the slots overlap. `state="rejected"` (with activate=False) records a version the gate
        refused: kept for audit, never activated. Returns the new version id, after `publish_hooks`
        ran (the lock released already).
        """
        if state not in ("active", "rejected"):
            raise ValueError(f"state must be 'active' or 'rejected', got {state!r}")
        if state == "rejected" and activate:
            raise ValueError("a rejected version cannot be activated: pass activate=False")
        self._validate_delta(delta)
        doc_ids = [str(d["id"]) if isinstance(d, dict) else str(d) for d in documents]
        with self.lock:
            crash_point("publish:locked")
            self._clean_tmp()
            current = self.active()
            rebased_from = None
            if activate and current != int(parent):
                if not rebase:
                    raise ActiveMovedError(int(parent), current)
                delta = self.rebase(delta, int(parent), current)
                rebased_from, parent = int(parent), current
            parent = int(parent)
            if parent != 0:
                self._verify_files(parent, self.manifest(parent))
            vid = self._last_id() + 1
            tmp = self.versions_dir / f".tmp-{vname(vid)}-{os.getpid()}"
            tmp.mkdir()
            crash_point("publish:tmp_created")
            dpath = tmp / "delta.safetensors"
            delta.save(dpath)
            fsync_file(dpath)
            crash_point("publish:delta_written")
            m: dict[str, Any] = {
                "id": vid,
                "parent": parent,
                "created_at": time.time(),
                "job_id": job_id,
                "documents": doc_ids,
                "settings": settings or {},
                "evaluation": evaluation or {},
                "report": {**delta.report, **(report or {})},
                "state": state,
                "kind": kind,
                "slots_changed": {
                    "total": delta.num_slots,
                    "layers": {str(k): ld.indices.numel() for k, ld in delta.layers.items()},
                },
                "base_id": self.base_id,
                "rebased_from": rebased_from,
                "files": {"delta.safetensors": {"sha256": sha256_file(dpath), "bytes": dpath.stat().st_size}},
                **(extra or {}),
            }
            import json

            m = json.loads(json.dumps(m, default=str))  # exactly what a reader will see
            m["manifest_sha256"] = sha256_json(m)
            mpath = tmp / "manifest.json"
            with open(mpath, "w") as f:
                f.write(json.dumps(m, indent=2) + "\n")
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(tmp)
            crash_point("publish:manifest_written")
            os.rename(tmp, self.version_dir(vid))
            fsync_dir(self.versions_dir)
            crash_point("publish:renamed")
            with self._cache_lock:
                self._deltas[vid] = delta
                self._slots[vid] = {layer: ld.indices for layer, ld in delta.layers.items()}
            if activate:
                self._set_active(
                    current, vid, who=who, why=why or f"publish {kind}", action=kind, job_id=job_id
                )
            depth = len(self.chain(vid)) - 1
            if depth % self.snapshot_every == 0:
                try:
                    self.write_snapshot(vid)
                except OSError:
                    pass  # a snapshot is a cache; materialize works without it
                crash_point("publish:snapshot_written")
        for hook in self.publish_hooks:
            hook(vid, activate, job_id)
        return vid

    def _set_active(self, prev: int, to: int, who: str, why: str, action: str, **extra: Any) -> None:
        atomic_write_bytes(self.root / "ACTIVE", f"{to}\n".encode(), crash_name="publish:active_tmp_written")
        crash_point("publish:active_replaced")
        append_jsonl(
            self.log_dir / "activations.jsonl",
            [
                {
                    "time": time.time(),
                    "who": who,
                    "from": prev,
                    "to": to,
                    "why": why,
                    "action": action,
                    **extra,
                }
            ],
        )
        crash_point("publish:logged")

    def check_loadable(self, v: int, fresh: bool = False) -> None:
        """Raise CorruptVersionError/UnknownVersionError unless `v` and what materializing it reads
        (every manifest of its chain, the deltas after its latest snapshot, its own delta) are intact.

        `fresh=True` (activate) rereads the manifests from disk and rehashes, ignoring what this
        process verified before; the default trusts files it hashed while they stay unchanged."""
        if fresh:
            with self._cache_lock:
                self._manifests.clear()
                self._verified.clear()
        chain = self.chain(v)
        start = 0
        for i in range(len(chain) - 1, 0, -1):
            if self._snapshot_valid(chain[i]):
                start = i
                break
        for w in {*chain[start + 1 :], int(v)} - {0}:
            self._verify_files(w, self.manifest(w))

    def activate(
        self, version: int, who: str = "operator", why: str = "", force: bool = False
    ) -> dict[str, int]:
        """Make a retained version active (rollback or roll-forward). Unknown or corrupted versions are
        refused with an error naming them; rejected ones unless `force`. Logged in activations.jsonl."""
        version = int(version)
        with self.lock:
            self.check_loadable(version, fresh=True)
            m = self.manifest(version)
            if m.get("state") == "rejected" and not force:
                raise StoreError(
                    f"version {version} was rejected by the gate; pass force=True to activate it anyway"
                )
            prev = self.active()
            if prev != version:
                self._set_active(prev, version, who=who, why=why, action="activate")
            return {"from": prev, "to": version}

    # -- undo --------------------------------------------------------------------------------------
    def revert_version(self, v: int) -> SlotDelta:
        """A delta that undoes version `v` on the active version: v's old rows for v's slots.

        Exact only when no later version of the active chain rewrote those slots: otherwise raises
        RevertConflict naming the versions and slots."""
        v = int(v)
        chain = self.chain(self.active())
        if v == 0 or v not in chain:
            raise StoreError(f"version {v} is not in the active chain {chain[-5:]}...: nothing to revert")
        d = self.load_delta(v)
        later = chain[chain.index(v) + 1 :]
        conflicts = self._overlaps({layer: ld.indices for layer, ld in d.layers.items()}, later)
        if conflicts:
            raise RevertConflict(v, conflicts)
        layers = {
            layer: LayerDelta(ld.indices.clone(), ld.old_rows.clone(), ld.new_rows.clone())
            for layer, ld in d.layers.items()
        }
        return SlotDelta(layers=layers, report={"kind": "revert", "reverts": v})

    def revert(self, v: int, who: str = "operator", why: str = "") -> int:
        """Publish `revert_version(v)` as a new active version labelled {"kind": "revert", "reverts": v}."""
        with self.lock:
            parent = self.active()
            delta = self.revert_version(v)
            return self.publish(
                delta,
                parent,
                documents=[],
                settings={"kind": "revert", "reverts": int(v)},
                kind="revert",
                extra={"reverts": int(v)},
                who=who,
                why=why or f"revert version {v}",
            )

    def effective_chain(self, version: int | None = None) -> list[int]:
        """The update versions of the chain whose effect is still in the tables, in order: revert
        versions are left out with what they undid (a revert of a revert re-teaches the original)."""
        chain = self.chain(self.active() if version is None else version)
        taught = {w: True for w in chain if w != 0 and self.manifest(w).get("kind") != "revert"}

        def undo(t: int, value: bool) -> None:
            m = self.manifest(t)
            if m.get("kind") == "revert":
                if m.get("reverts") is not None:
                    undo(int(m["reverts"]), not value)
            elif t in taught:
                taught[t] = value

        for w in chain:
            m = self.manifest(w)
            if m.get("kind") == "revert" and m.get("reverts") is not None:
                undo(int(m["reverts"]), False)
        return [w for w in chain if taught.get(w)]

    def versions_with_document(self, doc_id: str) -> list[int]:
        out = []
        for v in self.version_ids()[1:]:
            try:
                if str(doc_id) in self.manifest(v).get("documents", []):
                    out.append(v)
            except StoreError:
                continue
        return out

    def documents_of_version(self, v: int) -> list[dict[str, Any]]:
        """The full document records (from the log) that version `v` was trained on, in order."""
        m = self.manifest(v)
        return self.jobs.documents(m.get("documents", []), job_id=m.get("job_id"))

    def revert_document(self, doc_id: str, who: str = "operator", why: str = "") -> list[int]:
        """Undo a document. Exact (a version revert) when it was alone in its version(s); otherwise
        raises NeedsRetrain with what the pipeline needs (version, parent, remaining documents)."""
        with self.lock:
            eff = self.effective_chain()
            hits = [v for v in self.versions_with_document(doc_id) if v in eff]
            if not hits:
                raise DocumentNotTaught(str(doc_id), self.active())
            for v in hits:
                m = self.manifest(v)
                if m.get("documents") != [str(doc_id)]:
                    remaining = [r for r in self.documents_of_version(v) if str(r["id"]) != str(doc_id)]
                    raise NeedsRetrain(str(doc_id), v, self.active(), remaining, m.get("settings", {}))
            out = []
            for v in sorted(hits, reverse=True):
                out.append(self.revert(v, who=who, why=why or f"revert document {doc_id}"))
            return out

    # -- provenance --------------------------------------------------------------------------------
    def slot_history(self, layer: int, slot: int) -> list[dict[str, Any]]:
        """Every version that wrote (layer, slot), oldest first, with its documents."""
        active_chain = set(self.chain(self.active()))
        out = []
        for v in self.version_ids()[1:]:
            try:
                idx = self.slot_sets(v).get(int(layer))
                m = self.manifest(v)
            except StoreError:
                continue
            if idx is not None and bool(torch.isin(torch.tensor([int(slot)]), idx).item()):
                out.append(
                    {
                        "version": v,
                        "documents": m.get("documents", []),
                        "job_id": m.get("job_id"),
                        "kind": m.get("kind"),
                        "created_at": m.get("created_at"),
                        "in_active_chain": v in active_chain,
                        "state": m.get("state"),
                    }
                )
        return out

    def diff(self, a: int, b: int, exact: bool = False) -> dict[str, Any]:
        """Slots and documents that differ between versions `a` and `b` (via their common ancestor).

        `exact=True` keeps only the slots whose rows really differ (a slot written twice can end up
        equal)."""
        anc, down, up = self._path(a, b)
        seq = []
        for w in down + up:
            for layer, idx in self.slot_sets(w).items():
                seq.append((layer, idx, idx.unsqueeze(1)))
        changed = {layer: idx for layer, (idx, _) in net_rows(seq).items()}
        if exact and changed:
            ra, rb = self.rows_at(a, changed), self.rows_at(b, changed)
            changed = {layer: idx[(ra[layer] != rb[layer]).any(dim=1)] for layer, idx in changed.items()}
        removed = [d for w in down for d in self.manifest(w).get("documents", [])]
        added = [d for w in up for d in self.manifest(w).get("documents", [])]
        return {
            "a": int(a),
            "b": int(b),
            "ancestor": anc,
            "versions_removed": down,
            "versions_added": up,
            "layers": {layer: idx.tolist() for layer, idx in sorted(changed.items())},
            "documents": removed + added,
            "documents_added": added,
            "documents_removed": removed,
        }

    def active_chain_documents(self) -> list[dict[str, Any]]:
        """Documents that taught the active version, in training order (for replay onto a new base);
        versions undone by a revert in the chain are left out. Each record gets its "version"."""
        out = []
        for v in self.effective_chain():
            for rec in self.documents_of_version(v):
                out.append({**rec, "version": v, "settings": self.manifest(v).get("settings", {})})
        return out

    # -- maintenance -------------------------------------------------------------------------------
    def gc(self, policy: GCPolicy | dict[str, Any] | None = None) -> dict[str, Any]:
        """Delete versions the policy does not keep; never the active chain nor any kept version's chain."""
        if policy is None:
            policy = GCPolicy()
        elif isinstance(policy, dict):
            policy = GCPolicy(**policy)
        with self.lock:
            self._clean_tmp()
            keep = set(self.chain(self.active()))
            candidates = []
            for v in self.version_ids()[1:]:
                try:
                    m = self.manifest(v)
                except StoreError:
                    continue  # corrupted versions are left for the operator to inspect
                if m.get("state") == "rejected" and not policy.keep_rejected:
                    continue
                candidates.append(v)
            roots = set(candidates[-policy.keep_last :] if policy.keep_last > 0 else []) | set(policy.keep)
            for v in roots:
                try:
                    keep |= set(self.chain(v))
                except StoreError:
                    keep.add(v)
            deleted = []
            # ids are never reused: remember the highest before deleting anything
            atomic_write_bytes(self.root / "LAST_VERSION", f"{self._last_id()}\n".encode())
            for v in self.version_ids()[1:]:
                if v in keep:
                    continue
                try:
                    self.manifest(v)
                except StoreError:
                    continue
                trash = self.versions_dir / f".deleted-{vname(v)}-{os.getpid()}"
                os.rename(self.version_dir(v), trash)
                shutil.rmtree(trash, ignore_errors=True)
                for p in self._snapshot_paths(v):
                    p.unlink(missing_ok=True)
                with self._cache_lock:
                    self._manifests.pop(v, None)
                    self._deltas.pop(v, None)
                    self._slots.pop(v, None)
                deleted.append(v)
            fsync_dir(self.versions_dir)
            report = {
                "time": time.time(),
                "deleted": deleted,
                "kept": sorted(keep),
                "policy": policy.__dict__,
            }
            append_jsonl(self.log_dir / "gc.jsonl", [report])
            return report

    def verify(self, check_base: bool = True) -> dict[str, Any]:
        """Check every version's checksums, the active chain, snapshots and the logs.

        Returns {"ok": bool, "active", "problems": [...], "versions": {id: "ok" | error}, ...}."""
        problems: list[str] = []
        versions: dict[int, str] = {}
        for v in self.version_ids()[1:]:
            try:
                m = self._read_manifest(v)
                self._verify_files(v, m, force=True)
                SlotDelta.load(self.version_dir(v) / "delta.safetensors")
                versions[v] = "ok"
            except Exception as e:
                versions[v] = str(e)
                problems.append(str(e))
        base = "not checked"
        if check_base:
            got = weights_id(self.base_dir)
            base = (
                "ok"
                if got == self.base_id
                else f"base weights (model*.safetensors) sha256 {got[:12]} != base id {self.base_id[:12]}"
            )
            if base != "ok":
                problems.append(base)
        try:
            active = self.active()
        except StoreError as e:
            active = None
            problems.append(str(e))
        chain: list[int] = []
        if active is not None:
            try:
                chain = self.chain(active)
                bad = [w for w in chain[1:] if versions.get(w) != "ok"]
                if bad:
                    problems.append(f"active chain of {active} has damaged versions {bad}")
            except StoreError as e:
                problems.append(f"active version {active}: {e}")
        snapshots: dict[int, str] = {}
        for p in sorted(self.snapshots_dir.glob("*.json")):
            v = int(p.stem)
            self._snap_ok.pop(v, None)
            snapshots[v] = (
                "ok" if self._load_snapshot(v) is not None else "damaged (ignored, will be rewritten)"
            )
        tmp = [p.name for p in self.versions_dir.iterdir() if p.name.startswith(".")]
        warnings: list[str] = []
        acts = self.activations()
        if acts and active is not None and acts[-1].get("to") != active:
            # a writer died between moving ACTIVE and logging it: the store is fine, the log is short
            warnings.append(f"ACTIVE is {active} but the last activation logged is to {acts[-1].get('to')}")
        if tmp:
            warnings.append(f"leftover temp dirs from an interrupted writer (removed by the next one): {tmp}")
        jobs = self.jobs
        jobs.refresh()
        return {
            "ok": not problems,
            "active": active,
            "active_chain": chain,
            "base": base,
            "versions": versions,
            "snapshots": snapshots,
            "leftover_temp": tmp,
            "log_bad_lines": jobs.bad_lines,
            "problems": problems,
            "warnings": warnings,
        }
