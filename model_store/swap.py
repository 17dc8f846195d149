"""Hot swap of live value tables between store versions, and per-request row overlays.

`LiveTables(store, tables, version)` owns the value tables a serving engine reads (the model's
`values.weight` tensors, on any device). `switch_to(b)` moves them to version `b` by writing only
the rows that differ: the net rows of "revert the current chain back to the common ancestor, apply
b's chain forward" are computed, and compared with the live rows, *before* the swap lock is taken;
under the lock it is one `index_copy_` per memory layer (t rows for a one-step update).

Thread-safety contract (readers-writer):

    with live.swap_lock.read():        # serving: a request's whole forward pass (every decoding step
        version = live.version         # of a generation, or take it per step and pin with an overlay)
        ... model forward ...
    live.switch_to(b)                  # swapper: takes swap_lock.write() only for the row copies

- Any number of readers hold `read()` at once; `write()` waits for them to leave and blocks new
  readers meanwhile (writer preference, so a stream of requests cannot starve a swap). A reader
  therefore always sees the tables of exactly one version: never a mix.
- The lock is not re-entrant: do not take `read()` twice in one thread (a waiting writer would
  deadlock it).
- `switch_to` calls are serialised among themselves by an internal mutex.
- To serve a request at an older retained version while others run at the live one, use
  `overlay_for(v)` under `read()`: {layer: (indices, rows)} where v differs from the live tables, for
  the model's `memory_overlay` argument. Cached per (live version, v).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .store import Store
from .tables import Rows, path_rows

_SERIAL_ELEMENTS = 32_000  # below at::internal::GRAIN_SIZE (32768): torch copies on the calling thread


@torch.no_grad()
def copy_rows(table: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> None:
    """`table[idx] = rows` in chunks small enough that torch does not fan out to its thread pool.

    A few hundred rows copy in tens of microseconds on one thread; a parallel copy has to wake the
    intra-op threads, which on a busy CPU (the serving forward passes) costs milliseconds: measured
    0.05 ms serial vs about 20 ms parallel on a loaded 2-core machine. On CUDA one call is best.
    """
    if table.is_cuda or idx.numel() * max(1, rows[0].numel() if rows.numel() else 1) <= _SERIAL_ELEMENTS:
        table.index_copy_(0, idx, rows)
        return
    step = max(1, _SERIAL_ELEMENTS // max(1, rows.shape[1] if rows.dim() > 1 else 1))
    for i in range(0, idx.numel(), step):
        table.index_copy_(0, idx[i : i + step], rows[i : i + step])


class SwapLock:
    """Writer-preferring readers-writer lock (see the module docstring)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class SwapResult:
    from_version: int
    to_version: int
    rows_written: int  # rows copied into the live tables
    seconds: float  # whole switch (loading and staging the deltas included)
    pause_seconds: float  # time the write lock was held: how long readers were blocked


class LiveTables:
    def __init__(
        self,
        store: Store,
        tables: dict[int, torch.Tensor],
        version: int,
        swap_lock: SwapLock | None = None,
        overlay_cache_size: int = 8,
    ) -> None:
        self.store = store
        self.tables = tables
        self.version = int(version)
        self.swap_lock = swap_lock or SwapLock()
        self._switch_mutex = threading.Lock()
        self._overlays: OrderedDict[tuple[int, int], Rows] = OrderedDict()
        self._overlay_cache_size = overlay_cache_size
        self._overlay_lock = threading.Lock()

    @classmethod
    def from_store(
        cls, store: Store, version: int | None = None, device: str | torch.device = "cpu"
    ) -> LiveTables:
        v = store.active() if version is None else int(version)
        tables = {layer: t.to(device) for layer, t in store.materialize(v).items()}
        return cls(store, tables, v)

    def _rows_between(self, a: int, b: int, only_changed: bool = True) -> Rows:
        """Rows that turn version a's tables (the live ones) into version b's."""
        _, down, up = self.store._path(a, b)
        rows = path_rows([self.store.load_delta(w) for w in down], [self.store.load_delta(w) for w in up])
        out: Rows = {}
        for layer, (idx, r) in rows.items():
            table = self.tables[layer]
            r = r.to(table.device, table.dtype)
            idx = idx.to(table.device)
            if only_changed:
                keep = (table.index_select(0, idx) != r).any(dim=1)
                idx, r = idx[keep], r[keep]
            if idx.numel():
                out[layer] = (idx, r)
        return out

    def switch_to(self, version: int) -> SwapResult:
        """Move the live tables to `version`, touching only rows that differ (see module docstring)."""
        version = int(version)
        t0 = time.perf_counter()
        with self._switch_mutex:
            current = self.version
            if version == current:
                return SwapResult(current, version, 0, time.perf_counter() - t0, 0.0)
            self.store.check_loadable(version)
            # Staging reads the live rows without the lock: only this (mutex-held) swapper writes them.
            rows = self._rows_between(current, version)
            n = sum(idx.numel() for idx, _ in rows.values())
            cuda = any(t.is_cuda for t in self.tables.values())
            with self.swap_lock.write():
                tp = time.perf_counter()
                for layer, (idx, r) in rows.items():
                    copy_rows(self.tables[layer], idx, r)
                if cuda:
                    torch.cuda.synchronize()
                self.version = version
                pause = time.perf_counter() - tp
            with self._overlay_lock:
                self._overlays.clear()
            return SwapResult(current, version, n, time.perf_counter() - t0, pause)

    def follow_active(self) -> SwapResult | None:
        """Switch to the store's active version if it moved (a server polls this about once a second)."""
        a = self.store.active()
        return None if a == self.version else self.switch_to(a)

    def overlay_for(self, version: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """{layer: (sorted indices LongTensor, rows)} where `version` differs from the live tables.

        Call it (and run the pinned request) while holding `swap_lock.read()`, so the live version
        cannot move between computing the overlay and using it."""
        version = int(version)
        key = (self.version, version)
        with self._overlay_lock:
            hit = self._overlays.get(key)
            if hit is not None:
                self._overlays.move_to_end(key)
                return hit
        if version == self.version:
            rows: Rows = {}
        else:
            self.store.check_loadable(version)
            rows = self._rows_between(self.version, version)
        with self._overlay_lock:
            self._overlays[key] = rows
            while len(self._overlays) > self._overlay_cache_size:
                self._overlays.popitem(last=False)
        return rows
