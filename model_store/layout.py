"""The store's layout and reading side: paths, store.json, manifests (checksummed), deltas and their
slot sets, parent chains, the version listing. The base of the Store's classes (model_store/store.py)."""

from __future__ import annotations

import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from memlm.delta import SlotDelta

from .errors import (
    CorruptVersionError,
    StoreError,
    StoreNotFoundError,
    UnknownVersionError,
)
from .fsutil import (
    read_jsonl,
    sha256_file,
    sha256_json,
)
from .job_index import JobIndex
from .joblog import JobLog
from .locks import FileWriterLock, WriterLock

FORMAT = 1


def vname(v: int) -> str:
    return f"{int(v):010d}"


class StoreLayout:
    """Where everything of a store lives, and reading it (manifests verified on first read)."""

    def __init__(
        self,
        root: str | Path,
        lock: WriterLock | Callable[[str], WriterLock] | None = None,
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
        # the writer lock: a WriterLock, or a function of the base id that makes one (a Redis lock is
        # named after the base: Store.open, workers.runtime.writer_lock); default the file lock
        if lock is None:
            lock = FileWriterLock(self.root / ".writer.lock")
        elif not isinstance(lock, WriterLock):
            lock = lock(self.info["base_id"])
        self.lock: WriterLock = lock
        self._cache_lock = threading.RLock()
        self._manifests: dict[int, dict[str, Any]] = {}
        self._deltas: OrderedDict[int, SlotDelta] = OrderedDict()
        self._delta_cache_size = delta_cache_size
        self._slots: dict[int, dict[int, torch.Tensor]] = {}
        self._snap_ok: dict[int, tuple[float, int]] = {}
        self._verified: dict[tuple[int, str], tuple[int, int, int]] = {}
        self._base: dict[int, torch.Tensor] | None = None
        self._jobs: JobLog | None = None
        self._job_index = JobIndex(self)
        # called after each publish, outside the writer lock, as hook(version, activated, job_id)
        # (the distributed worker announces the new version on Redis: workers.runtime)
        self.publish_hooks: list[Callable[[int, bool, str | None], None]] = []

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

    def version_of_job(self, job_id: str) -> int | None:
        """The newest version published for `job_id`, or None; from the job index (STORE/job_index.json,
        model_store/job_index.py), not a scan of every manifest."""
        return self._job_index.lookup(job_id)

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
