"""`memfit bench swap`: what a version costs to serve, store and rebuild.

Measured in one run, on one machine:
- swap pause for a t=500 version: how long a serving thread is blocked (the write lock of
  LiveTables.switch_to, and the wait a reader thread observes), vs a bare `index_copy_` of the same
  rows, vs loading a full checkpoint (safetensors load of model.safetensors + copy into the tables);
- bytes per version on disk (delta.safetensors + manifest.json) vs the physical minimum
  (2 x t x d x bytes per value + manifest) and vs the full checkpoint;
- materialize after 1,000 versions (200 with --quick), with snapshots (every 50) and without.

Uses the default model directory when it exists (memlm.paths.default_model_dir() or --model), else
a synthetic value table of the default model's size (65,536 x 256 float32); the output says which.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from memlm.delta import LayerDelta, SlotDelta
from model_store.store import Store
from model_store.swap import LiveTables, copy_rows

from .load import write_json

SYNTH_ROWS, SYNTH_DIM = 65_536, 256


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _synthetic_model(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    table = torch.randn(SYNTH_ROWS, SYNTH_DIM, generator=g) * 0.02
    save_file({"model.layers.4.mlp.memory.values.weight": table}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "synthetic", "memory_layers": [4]}))
    return path


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "torch": torch.__version__,
    }


def _reader(live: LiveTables, stop: threading.Event, waits: list[float]) -> None:
    x = torch.randn(64, 64)
    while not stop.is_set():
        t0 = time.perf_counter()
        with live.swap_lock.read():
            waits.append(time.perf_counter() - t0)
            (x @ x).sum()  # a short stand-in for a forward pass
        time.sleep(0.0002)


def run(args) -> int:
    from memlm.paths import default_model_dir

    quick = bool(getattr(args, "quick", False))
    n_versions = 200 if quick else 1000
    t = 500
    snapshot_every = 50
    repeats = 30 if quick else 100
    out_dir = Path(args.out) if getattr(args, "out", None) else Path("benchmarks/results/swap")
    model_dir = Path(args.model).expanduser() if getattr(args, "model", None) else default_model_dir()
    work = Path(tempfile.mkdtemp(prefix="memfit-bench-swap-"))
    try:
        if (model_dir / "model.safetensors").exists():
            source = f"model {model_dir}"
        else:
            model_dir = _synthetic_model(work / "model")
            source = (
                f"synthetic value table {SYNTH_ROWS:,} x {SYNTH_DIM} float32 (no model at the default path)"
            )
        store = Store.init(work / "store", model_dir, snapshot_every=snapshot_every)
        base = store.base_tables()
        layers = sorted(base)
        n_rows, dim = base[layers[0]].shape
        print(
            f"memfit bench swap: {source}; memory layers {layers}, {n_rows:,} x {dim} {base[layers[0]].dtype}"
        )
        cur, t_pub = _publish_chain(store, base, n_versions, t)
        last = store.active()
        sizes = _bytes_per_version(store, t, dim, base[layers[0]].element_size(), len(layers))
        cold, materialize = _materialize(store, work, last, cur)
        swap = _swap_pause(store, cold, last, repeats, checkpoint_loads=3 if quick else 5)
        res: dict[str, Any] = {
            "source": source,
            "machine": _machine(),
            "table": {"layers": layers, "rows": n_rows, "dim": dim, "dtype": str(base[layers[0]].dtype)},
            "t": t,
            "versions": n_versions,
            "snapshot_every": snapshot_every,
            "swap": swap,
            "bytes": sizes,
            "materialize": materialize,
            "publish_median_s": _median(t_pub),
        }
        _print_table(res)
        path = write_json(res, out_dir, "swap-quick.json" if quick else "swap.json")
        print(f"\nwrote {path}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _publish_chain(
    store: Store, base: dict[int, torch.Tensor], n_versions: int, t: int
) -> tuple[dict[int, torch.Tensor], list[float]]:
    """Publish n_versions random deltas of t rows per layer, each onto the last: (the tables as the
    last version has them, the seconds of each publish)."""
    layers = sorted(base)
    n_rows = base[layers[0]].shape[0]
    g = torch.Generator().manual_seed(1)
    cur = {layer: tb.clone() for layer, tb in base.items()}
    t_pub = []
    t0_all = time.perf_counter()
    for i in range(n_versions):
        lds = {}
        for layer in layers:
            idx = torch.randperm(n_rows, generator=g)[:t].sort().values
            old = cur[layer][idx].clone()
            new = old + 0.01 * torch.randn(old.shape, generator=g, dtype=old.dtype)
            lds[layer] = LayerDelta(idx, new, old)
        delta = SlotDelta(layers=lds)
        tp = time.perf_counter()
        store.publish(delta, store.active(), job_id=f"bench{i}", documents=[f"doc{i}"])
        t_pub.append(time.perf_counter() - tp)
        delta.apply(cur)
        if (i + 1) % 100 == 0:
            print(f"  published {i + 1}/{n_versions} versions ({time.perf_counter() - t0_all:.1f} s)")
    return cur, t_pub


def _bytes_per_version(store: Store, t: int, dim: int, elem: int, n_layers: int) -> dict[str, Any]:
    """A version's bytes on disk (delta + manifest) vs the physical minimum and the full checkpoint."""
    sizes, manifests = [], []
    for v in store.version_ids()[1:]:
        d = store.version_dir(v)
        sizes.append((d / "delta.safetensors").stat().st_size + (d / "manifest.json").stat().st_size)
        manifests.append((d / "manifest.json").stat().st_size)
    bytes_per_version = statistics.mean(sizes)
    minimum = 2 * t * dim * elem * n_layers + statistics.mean(manifests)
    checkpoint_bytes = (store.base_dir / "model.safetensors").stat().st_size
    return {
        "per_version": bytes_per_version,
        "physical_minimum": minimum,
        "full_checkpoint": checkpoint_bytes,
        "over_minimum": bytes_per_version / minimum,
        "fraction_of_checkpoint": bytes_per_version / checkpoint_bytes,
        "snapshots_total": sum(p.stat().st_size for p in store.snapshots_dir.glob("*.safetensors")),
    }


def _materialize(
    store: Store, work: Path, last: int, cur: dict[int, torch.Tensor]
) -> tuple[Store, dict[str, Any]]:
    """Materialize the last version from a cold Store (twice), then without snapshots: (the cold
    store, the seconds and whether the tables equal the published chain's)."""
    cold = Store(store.root)
    tm = time.perf_counter()
    mat = cold.materialize(last)
    t_mat_cold = time.perf_counter() - tm
    tm = time.perf_counter()
    cold.materialize(last)
    t_mat_warm = time.perf_counter() - tm
    exact = all(torch.equal(mat[layer], cur[layer]) for layer in cur)
    hidden = work / "snapshots-hidden"
    store.snapshots_dir.rename(hidden)
    store.snapshots_dir.mkdir()
    plain = Store(store.root)
    tm = time.perf_counter()
    plain.materialize(last)
    t_mat_plain = time.perf_counter() - tm
    shutil.rmtree(store.snapshots_dir)
    hidden.rename(store.snapshots_dir)
    return cold, {
        "cold_s": t_mat_cold,
        "warm_s": t_mat_warm,
        "without_snapshots_s": t_mat_plain,
        "exact": exact,
    }


def _swap_pause(store: Store, cold: Store, last: int, repeats: int, checkpoint_loads: int) -> dict[str, Any]:
    """Switch the live tables between the last two versions under a reading thread, vs a bare copy of
    the same rows and vs loading the full checkpoint."""
    a, b = last - 1, last
    live = LiveTables(store, cold.materialize(a), a)
    stop = threading.Event()
    waits: list[float] = []
    reader = threading.Thread(target=_reader, args=(live, stop, waits), daemon=True)
    reader.start()
    time.sleep(0.05)
    pauses: list[float] = []
    switches: list[float] = []
    rows_written: list[float] = []
    for i in range(repeats):
        r = live.switch_to(b if i % 2 == 0 else a)
        pauses.append(r.pause_seconds)
        switches.append(r.seconds)
        rows_written.append(r.rows_written)
        time.sleep(0.002)
    stop.set()
    reader.join()
    memcpy, memcpy_torch = _copy_costs(live.tables, store.load_delta(b), repeats)
    full = _checkpoint_loads(store, live.tables, checkpoint_loads)
    return {
        "pause_median_s": _median(pauses),
        "pause_max_s": max(pauses),
        "reader_wait_max_s": max(waits) if waits else None,
        "reader_wait_p99_s": sorted(waits)[int(0.99 * (len(waits) - 1))] if waits else None,
        "reader_requests": len(waits),
        "switch_total_median_s": _median(switches),
        "rows_written_median": _median(rows_written),
        "memcpy_median_s": _median(memcpy),
        "index_copy_one_call_median_s": _median(memcpy_torch),
        "full_checkpoint_load_median_s": _median(full),
        "pause_over_memcpy": _median(pauses) / _median(memcpy),
        "checkpoint_over_pause": _median(full) / _median(pauses),
    }


def _copy_costs(
    tables: dict[int, torch.Tensor], dl: SlotDelta, repeats: int
) -> tuple[list[float], list[float]]:
    """Seconds to write a delta's rows serially (as the swap does) and in one index_copy_ per layer."""
    memcpy, memcpy_torch = [], []
    for _ in range(repeats):
        tc = time.perf_counter()
        for layer, ld in dl.layers.items():
            copy_rows(tables[layer], ld.indices, ld.new_rows)  # serial, as the swap does
        memcpy.append(time.perf_counter() - tc)
        tc = time.perf_counter()
        for layer, ld in dl.layers.items():
            tables[layer].index_copy_(0, ld.indices, ld.new_rows)  # one call, torch's threading
        memcpy_torch.append(time.perf_counter() - tc)
    return memcpy, memcpy_torch


def _checkpoint_loads(store: Store, tables: dict[int, torch.Tensor], n: int) -> list[float]:
    """Seconds to load the full checkpoint and copy its value tables in, n times."""
    full = []
    for _ in range(n):
        tc = time.perf_counter()
        sd = load_file(str(store.base_dir / "model.safetensors"))
        for layer, key in store.value_keys.items():
            tables[layer].copy_(sd[key])
        full.append(time.perf_counter() - tc)
        del sd
    return full


def _print_table(res: dict[str, Any]) -> None:
    s, by, m = res["swap"], res["bytes"], res["materialize"]
    ms = 1e3
    rows = [
        (
            "swap pause (write lock held), median / max",
            f"{s['pause_median_s'] * ms:.3f} / {s['pause_max_s'] * ms:.3f} ms",
        ),
        (
            "serving thread blocked, max / p99",
            f"{(s['reader_wait_max_s'] or 0) * ms:.3f} / {(s['reader_wait_p99_s'] or 0) * ms:.3f} ms",
        ),
        ("whole switch_to (load, stage, copy), median", f"{s['switch_total_median_s'] * ms:.2f} ms"),
        ("bare copy of the same rows (serial), median", f"{s['memcpy_median_s'] * ms:.3f} ms"),
        (
            "same rows, one index_copy_ call (torch threads)",
            f"{s['index_copy_one_call_median_s'] * ms:.3f} ms",
        ),
        ("full checkpoint load + copy, median", f"{s['full_checkpoint_load_median_s'] * ms:.1f} ms"),
        ("pause / memcpy", f"{s['pause_over_memcpy']:.2f} x"),
        ("checkpoint load / pause", f"{s['checkpoint_over_pause']:.0f} x"),
        ("bytes per version (delta + manifest)", f"{by['per_version'] / 1e6:.3f} MB"),
        (
            "physical minimum (2 t d bytes + manifest)",
            f"{by['physical_minimum'] / 1e6:.3f} MB ({by['over_minimum']:.3f} x)",
        ),
        (
            "full checkpoint",
            f"{by['full_checkpoint'] / 1e6:.1f} MB (version = {by['fraction_of_checkpoint'] * 100:.2f} %)",
        ),
        (
            f"materialize after {res['versions']} versions, cold / warm",
            f"{m['cold_s']:.3f} / {m['warm_s']:.3f} s (exact: {m['exact']})",
        ),
        ("materialize without snapshots", f"{m['without_snapshots_s']:.3f} s"),
        ("publish one version, median", f"{res['publish_median_s'] * ms:.1f} ms"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    print(f"{'measure'.ljust(width)}  value")
    print(f"{'-' * width}  {'-' * 30}")
    for k, val in rows:
        print(f"{k.ljust(width)}  {val}")
