"""Versions by job id: `Store.version_of_job(job_id)` without reading every manifest.

STORE/job_index.json holds `{"format": 1, "through": N, "jobs": {job_id: [v, ...]}, "unreadable": [v,
...]}`: every version up to id N by job, and the versions whose manifest could not be read when they
were indexed. It is a cache, like the snapshots; the manifests stay the record:

- A lookup first indexes the versions with an id above `through`. Ids only grow (allocated and renamed
  into place under the writer lock, never reused: LAST_VERSION), so those are exactly the versions
  published since, by any process, including one whose writer died before anything else was written.
  Unreadable manifests are tried again on each lookup.
- Each hit is checked against the version itself (its directory exists, its manifest reads and names
  the job), newest first: a version deleted by gc or damaged since is skipped, as the scan skipped it.
- The file is replaced atomically (temp, fsync, rename) when the index changed; one that is missing,
  unreadable, of another format or ahead of the store (`through` above the highest id ever allocated) is rebuilt
  from the manifests. Two processes writing it at once each write a complete index of what they saw;
  whichever lands, the next lookup indexes the rest.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from .errors import StoreError
from .fsutil import atomic_write_json

FORMAT = 1
NAME = "job_index.json"


class JobIndex:
    def __init__(self, store: Any) -> None:  # a model_store.layout.StoreLayout (which holds this)
        self.store = store
        self.path = store.root / NAME
        self._lock = threading.Lock()
        self._jobs: dict[str, list[int]] | None = None  # None: not loaded yet
        self._through = 0
        self._unreadable: set[int] = set()

    def lookup(self, job_id: str) -> int | None:
        """The newest existing, readable version whose manifest names `job_id`, or None."""
        with self._lock:
            self._catch_up()
            assert self._jobs is not None
            candidates = list(self._jobs.get(str(job_id), ()))
        for v in reversed(candidates):
            if not self.store.version_dir(v).is_dir():
                continue  # deleted by gc (a manifest cached in memory outlives its directory)
            try:
                if self.store.manifest(v).get("job_id") == job_id:
                    return v
            except StoreError:
                continue
        return None

    def _catch_up(self) -> None:
        ids = self.store.version_ids()[1:]
        top = max(ids, default=0)
        if self._jobs is None:
            self._load(self.store._last_id())  # with LAST_VERSION: gc may have deleted the newest ids
        changed = False
        fresh = [v for v in ids if v > self._through or v in self._unreadable]
        for v in fresh:
            changed |= self._add(v)
        if top > self._through:
            self._through, changed = top, True
        if changed:
            self._save()

    def _add(self, v: int) -> bool:
        """Index version `v`; whether the index changed."""
        assert self._jobs is not None
        try:
            job_id = self.store.manifest(v).get("job_id")
        except StoreError:
            if v in self._unreadable:
                return False
            self._unreadable.add(v)
            return True
        self._unreadable.discard(v)
        if job_id is not None:
            versions = self._jobs.setdefault(str(job_id), [])
            if v not in versions:
                versions.append(v)
                versions.sort()
        return True

    def _load(self, top: int) -> None:
        """The index from its file, or an empty one (then every version is indexed again)."""
        self._jobs, self._through, self._unreadable = {}, 0, set()
        try:
            data = json.loads(self.path.read_text())
            jobs, through = _valid(data)
        except (OSError, ValueError, TypeError, KeyError):
            return  # missing or damaged: rebuilt from the manifests
        if through > top:
            return  # ahead of the store's versions: not this store's history
        self._jobs, self._through = jobs, through
        self._unreadable = {int(v) for v in data["unreadable"]}

    def _save(self) -> None:
        assert self._jobs is not None
        data = {
            "format": FORMAT,
            "through": self._through,
            "jobs": self._jobs,
            "unreadable": sorted(self._unreadable),
        }
        try:
            atomic_write_json(self.path, data)
        except OSError:
            pass  # a cache: the next process rebuilds what this one could not write


def _valid(data: Any) -> tuple[dict[str, list[int]], int]:
    """(jobs, through) of an index file's content; raises ValueError/TypeError/KeyError on any flaw."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError("not a job index of this format")
    through = data["through"]
    if not isinstance(through, int) or not isinstance(data["unreadable"], list):
        raise ValueError("bad through / unreadable")
    jobs = {}
    for job_id, versions in data["jobs"].items():
        if not isinstance(versions, list) or not all(isinstance(v, int) for v in versions):
            raise ValueError(f"bad versions of {job_id!r}")
        jobs[str(job_id)] = sorted(versions)
    return jobs, through
