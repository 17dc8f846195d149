"""Knowledge and memory-capacity metrics read from the store at scrape time, and job observations.

`KnowledgeCollector` is registered on the app's registry (service.metrics.Metrics); at each scrape it
reads the manifests of the active version and of the latest evaluated one (the figures the pipeline's
evaluation gate wrote into them) and the slot sets of the active chain. Figures that depend only on a
version are cached per version, so a scrape costs a few dictionary lookups once a version is known.

`record_job(metrics, result, store)` turns a finished pipeline job into the update metrics; the embedded
runner (API process) and the Celery task (worker process) both call it.

Also here: `histogram_quantile`, Prometheus' own interpolation (used by /dashboard/data and mirrored in
service/static/dashboard.js).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from workers.gate import thresholds

log = logging.getLogger("memfit.metrics")

# bounded label values (docs/design.md item 8: no high-cardinality labels)
WHICH = ("active", "latest")  # the version served / the newest version with an evaluation
WRITE_BANDS = (("1", 1, 1), ("2", 2, 2), ("3-4", 3, 4), ("5-8", 5, 8), ("9+", 9, None))
TOP_SLOT_FRACTION = 0.01  # "the most-rewritten slots": the top 1% of all slots by write count
REJECT_REASONS = ("forgetting_parent", "forgetting_base", "perplexity", "other")


def _num(x: Any) -> float | None:
    """A finite float, or None (JSON null, NaN, inf, strings)."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def knowledge_figures(evaluation: dict[str, Any] | None) -> dict[str, float | None]:
    """The figures of one version's evaluation (as workers/pipeline.py writes it into the manifest)."""
    ev = evaluation or {}
    figs = {
        "learning": _num(ev.get("learning")),
        "learning_heldout": _num(ev.get("learning_heldout")),
        "retention": _num(ev.get("retention")),
        "retention_base": _num(ev.get("retention_base")),
        "forgetting": _num(ev.get("forgetting")),
        "forgetting_base": _num(ev.get("forgetting_base")),
        "perplexity": _num(ev.get("perplexity")),
        "perplexity_change": _num(ev.get("perplexity_change")),
        "perplexity_change_base": _num(ev.get("perplexity_change_base")),
    }
    ppl, ch = figs["perplexity"], figs["perplexity_change_base"]
    figs["perplexity_base"] = ppl / (1.0 + ch) if ppl is not None and ch is not None and ch > -1 else None
    return figs


def has_evaluation(manifest: dict[str, Any]) -> bool:
    ev = manifest.get("evaluation") or {}
    return _num(ev.get("retention")) is not None or _num(ev.get("forgetting")) is not None


def reject_reasons(evaluation: dict[str, Any] | None) -> list[str]:
    """Bounded reason labels from the gate's reasons ("forgetting vs parent ...", ...)."""
    out = []
    for r in ((evaluation or {}).get("gate") or {}).get("reasons") or []:
        r = str(r)
        if "vs base" in r or "forgetting_base" in r:
            out.append("forgetting_base")
        elif "forgetting" in r:
            out.append("forgetting_parent")
        elif "perplexity" in r:
            out.append("perplexity")
        else:
            out.append("other")
    return out or ["other"]


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile on cumulative (upper bound, count) pairs; None without samples.

    Linear interpolation inside the bucket holding rank q * total; the first bucket starts at 0; a rank
    in the +Inf bucket returns the largest finite bound.
    """
    b = sorted((float(le), float(c)) for le, c in buckets)
    if not b or b[-1][1] <= 0:
        return None
    total = b[-1][1]
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in b:
        if c >= rank:
            if math.isinf(le):
                return prev_le
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le


class _Capacity:
    """Slot-write statistics of one version's chain."""

    def __init__(self, slots: int, counts: dict[int, Any]) -> None:
        import torch

        all_counts = torch.cat([c for c in counts.values()]) if counts else torch.zeros(0, dtype=torch.int64)
        writes = int(all_counts.sum()) if all_counts.numel() else 0
        written = int((all_counts > 0).sum()) if all_counts.numel() else 0
        self.slots = slots
        self.writes = writes
        self.written = written
        self.max_writes = int(all_counts.max()) if all_counts.numel() else 0
        top = max(1, int(slots * TOP_SLOT_FRACTION)) if slots else 0
        top_writes = int(torch.topk(all_counts, min(top, all_counts.numel())).values.sum()) if writes else 0
        self.top_share = top_writes / writes if writes else 0.0
        self.bands = {}
        for name, lo, hi in WRITE_BANDS:
            m = all_counts >= lo
            if hi is not None:
                m &= all_counts <= hi
            self.bands[name] = int(m.sum())

    def to_dict(self) -> dict[str, Any]:
        return {
            "slots": self.slots,
            "slots_written": self.written,
            "slots_written_ratio": self.written / self.slots if self.slots else 0.0,
            "slot_writes": self.writes,
            "slot_rewrites_max": self.max_writes,
            "top_slots_write_share": self.top_share,
            "slots_by_writes": dict(self.bands),
        }


@functools.lru_cache(maxsize=8)
def _model_defaults(base_dir: str) -> dict:
    """A store's base model's update_defaults.json (memlm.update_defaults; {} when absent or bad: the
    pipeline that loads the model reports a malformed file as the job's error). A store's base never
    changes, so the file is read once per store, not at every scrape."""
    import memlm

    try:
        return memlm.update_defaults(base_dir)
    except ValueError:
        return {}


class KnowledgeCollector(Collector):
    """Scrape-time gauges from the store: knowledge figures, memory capacity, versions, queue, gate."""

    def __init__(
        self,
        store_fn: Callable[[], Any],
        settings: Any = None,
        live_version_fn: Callable[[], int | None] | None = None,
    ) -> None:
        self.store_fn = store_fn  # returns the Store or None (not loaded yet)
        self.settings = settings
        self.live_version_fn = live_version_fn  # the version this replica serves (else store ACTIVE)
        self._lock = threading.Lock()
        self._capacity: dict[int, _Capacity] = {}
        self._activations: tuple[int, int, int] = (0, 0, 0)  # (bytes read, rollbacks, reverts)

    # -- reading the store (cached per version) ---------------------------------------------------
    def _capacity_of(self, store: Any, version: int) -> _Capacity:
        with self._lock:
            cap = self._capacity.get(version)
        if cap is not None:
            return cap
        import torch

        sizes = {int(k): int(v["rows"]) for k, v in store.table_info.items()}
        counts = {layer: torch.zeros(n, dtype=torch.int64) for layer, n in sizes.items()}
        for v in store.chain(version):
            for layer, idx in store.slot_sets(v).items():
                if layer in counts:
                    counts[layer].index_add_(
                        0, idx.to(torch.int64), torch.ones(idx.numel(), dtype=torch.int64)
                    )
        cap = _Capacity(sum(sizes.values()), counts)
        with self._lock:
            if len(self._capacity) > 64:
                self._capacity.clear()
            self._capacity[version] = cap
        return cap

    def _rollbacks(self, store: Any) -> tuple[int, int]:
        """(activations of an older version, revert versions) from STORE/log/activations.jsonl, read
        incrementally (the file is append-only)."""
        path = Path(store.log_dir) / "activations.jsonl"
        with self._lock:
            offset, rollbacks, reverts = self._activations
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                return rollbacks, reverts
            if size < offset:  # replaced: read again
                offset, rollbacks, reverts = 0, 0, 0
            if size > offset:
                with open(path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read(size - offset)
                end = chunk.rfind(b"\n") + 1  # a half-written last line waits for the next scrape
                for line in chunk[:end].splitlines():
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if rec.get("action") == "activate" and int(rec.get("to", 0)) < int(rec.get("from", 0)):
                        rollbacks += 1
                    elif rec.get("action") == "revert":
                        reverts += 1
                offset += end
            self._activations = (offset, rollbacks, reverts)
            return rollbacks, reverts

    def evaluated_version(self, store: Any, version: int) -> tuple[int, dict[str, Any]] | None:
        """The nearest version of `version`'s chain (itself first) that carries an evaluation."""
        for v in reversed(store.chain(version)):
            if v == 0:
                return None
            m = store.manifest(v)
            if has_evaluation(m):
                return v, m
        return None

    def latest_evaluated(self, store: Any) -> tuple[int, dict[str, Any]] | None:
        for v in reversed(store.version_ids()):
            if v == 0:
                return None
            try:
                m = store.manifest(v)
            except Exception:
                continue
            if has_evaluation(m):
                return v, m
        return None

    def snapshot(self) -> dict[str, Any]:
        """Everything this collector exports, as plain JSON (also used by /dashboard/data)."""
        store = self.store_fn()
        if store is None:
            return {}
        active = None
        if self.live_version_fn is not None:
            try:
                active = self.live_version_fn()
            except Exception:
                active = None
        if active is None:
            active = store.active()
        out: dict[str, Any] = {"active_version": active, "knowledge": {}}
        found = {"active": self.evaluated_version(store, active), "latest": self.latest_evaluated(store)}
        for which, hit in found.items():
            if hit is None:  # the base model: nothing learned, nothing forgotten by definition
                out["knowledge"][which] = {
                    "version": 0 if which == "active" else None,
                    **knowledge_figures({}),
                }
                if which == "active":
                    out["knowledge"][which].update(
                        retention=1.0, retention_base=1.0, forgetting=0.0, forgetting_base=0.0
                    )
                continue
            v, m = hit
            out["knowledge"][which] = {
                "version": v,
                "state": m.get("state"),
                **knowledge_figures(m.get("evaluation")),
            }
        out["memory"] = self._capacity_of(store, active).to_dict()
        states = {"active": 0, "retained": 0, "rejected": 0, "corrupt": 0}
        for m in store.versions():
            states[m.get("state", "retained")] = states.get(m.get("state", "retained"), 0) + 1
        out["versions"] = states
        rollbacks, reverts = self._rollbacks(store)
        out["rollbacks"] = {"activate": rollbacks, "revert": reverts}
        try:
            out["update_queue_depth"] = sum(
                1 for j in store.jobs.queued(include_running=True) if j.status == "queued"
            )
        except Exception:
            out["update_queue_depth"] = None
        s = self.settings
        if s is not None:
            defaults = _model_defaults(str(Path(store.root) / "base"))
            out["gate"] = {"enabled": bool(s.gate_enabled), **thresholds(s, defaults)}
        return out

    # -- Prometheus ---------------------------------------------------------------------------------
    def collect(self):
        try:
            snap = self.snapshot()
        except Exception:  # a scrape must never fail because the store is busy or damaged
            log.exception("knowledge metrics: cannot read the store")
            snap = {}
        if not snap:
            return
        yield from _knowledge_families(snap["knowledge"])
        yield from _memory_families(snap["memory"])
        yield from _store_families(snap)
        if snap.get("gate"):
            for name, doc, key in GATE_GAUGES:
                yield GaugeMetricFamily(name, doc, value=float(snap["gate"][key]))


# single-value gauges: (name, help, key of the snapshot's "memory" / "gate" dict)
MEMORY_GAUGES = (
    ("memfit_memory_slots", "Memory slots (all memory layers)", "slots"),
    ("memfit_memory_slots_written", "Distinct slots written by the active chain", "slots_written"),
    ("memfit_memory_slots_written_ratio", "Share of memory slots ever written by the active chain", "slots_written_ratio"),
    ("memfit_memory_slot_writes", "Slot writes in the active chain (a slot rewritten n times counts n)", "slot_writes"),
    ("memfit_memory_slot_rewrites_max", "Writes to the most-written slot", "slot_rewrites_max"),
    ("memfit_memory_top_slots_write_share", "Share of all slot writes that landed on the most-written 1% of slots", "top_slots_write_share"),
)  # fmt: skip
GATE_GAUGES = (
    ("memfit_gate_enabled", "1 when the evaluation gate is on", "enabled"),
    ("memfit_gate_max_forgetting_ratio", "Gate: most forgetting vs parent allowed", "max_forgetting"),
    ("memfit_gate_max_forgetting_base_ratio", "Gate: most forgetting vs base allowed", "max_forgetting_base"),
    ("memfit_gate_max_perplexity_increase_ratio", "Gate: largest relative held-out perplexity increase allowed", "max_ppl_increase"),
)  # fmt: skip
# the knowledge figures against each reference: (reference label, retention, forgetting, perplexity change)
REFERENCES = (
    ("parent", "retention", "forgetting", "perplexity_change"),
    ("base", "retention_base", "forgetting_base", "perplexity_change_base"),
)


def _knowledge_families(knowledge: dict[str, dict]) -> list[GaugeMetricFamily]:
    """The knowledge gauges of the active and the latest evaluated version (`which`)."""
    ver = GaugeMetricFamily(
        "memfit_knowledge_version", "Version whose evaluation the knowledge gauges show", labels=["which"]
    )
    learn = GaugeMetricFamily(
        "memfit_knowledge_learning_ratio",
        "Share of the update's facts answered (ingested or held-out wording)",
        labels=["which", "wording"],
    )
    ret = GaugeMetricFamily(
        "memfit_knowledge_retention_ratio",
        "Share of probe facts still answered (reference: parent or base)",
        labels=["which", "reference"],
    )
    forg = GaugeMetricFamily(
        "memfit_knowledge_forgetting_ratio",
        "(retention_before - retention_after) / retention_before against the parent or the base",
        labels=["which", "reference"],
    )
    ppl = GaugeMetricFamily(
        "memfit_knowledge_heldout_perplexity",
        "Held-out perplexity (which=base: the base model's)",
        labels=["which"],
    )
    pplc = GaugeMetricFamily(
        "memfit_knowledge_perplexity_change_ratio",
        "Relative change of held-out perplexity against the parent or the base",
        labels=["which", "reference"],
    )
    base_ppl = None
    for which, k in knowledge.items():
        if k.get("version") is not None:
            ver.add_metric([which], float(k["version"]))
        for wording, key in (("ingested", "learning"), ("heldout", "learning_heldout")):
            if k.get(key) is not None:
                learn.add_metric([which, wording], k[key])
        for ref, *keys in REFERENCES:
            for family, key in zip((ret, forg, pplc), keys):
                if k.get(key) is not None:
                    family.add_metric([which, ref], k[key])
        if k.get("perplexity") is not None:
            ppl.add_metric([which], k["perplexity"])
        base_ppl = base_ppl or k.get("perplexity_base")
    if base_ppl is not None:
        ppl.add_metric(["base"], base_ppl)
    return [ver, learn, ret, forg, ppl, pplc]


def _memory_families(mem: dict[str, Any]) -> list[GaugeMetricFamily]:
    """Memory capacity: slots, slots written, writes and how they spread over the slots."""
    out = [GaugeMetricFamily(name, doc, value=mem[key]) for name, doc, key in MEMORY_GAUGES]
    bands = GaugeMetricFamily(
        "memfit_memory_slots_by_writes",
        "Slots by how often the active chain wrote them",
        labels=["writes"],
    )
    for name, n in mem["slots_by_writes"].items():
        bands.add_metric([name], n)
    return [*out, bands]


def _store_families(snap: dict[str, Any]) -> list[GaugeMetricFamily | CounterMetricFamily]:
    """Versions by state, rollbacks, and the update queue's depth when it could be read."""
    vs = GaugeMetricFamily("memfit_store_versions", "Versions in the store by state", labels=["state"])
    for state, n in snap["versions"].items():
        vs.add_metric([state], n)
    rb = CounterMetricFamily(
        "memfit_rollbacks",
        "Store-wide rollbacks: activations of an older version, and revert versions",
        labels=["kind"],
    )
    rb.add_metric(["activate"], snap["rollbacks"]["activate"])
    rb.add_metric(["revert"], snap["rollbacks"]["revert"])
    out: list[GaugeMetricFamily | CounterMetricFamily] = [vs, rb]
    if snap.get("update_queue_depth") is not None:
        out.append(
            GaugeMetricFamily(
                "memfit_update_queue_depth",
                "Update jobs waiting in the job log",
                value=snap["update_queue_depth"],
            )
        )
    return out


def record_job(metrics: Any, result: Any, store: Any = None, durations: bool = True) -> None:
    """Update metrics of one finished pipeline job (workers.pipeline.JobResult).

    `durations=False` leaves out memfit_jobs_finished_total and memfit_job_duration_seconds (the
    embedded app's runner hook records those itself)."""
    if metrics is None or result is None:
        return
    try:
        timings = result.timings or {}
        ev = result.evaluation or {}
        if durations:
            metrics.jobs_finished.labels(result.status).inc()
            for phase in ("queued", "training", "evaluation", "publish", "total"):
                value = _num(timings.get(phase))
                if value is not None:
                    metrics.job_duration.labels(phase).observe(value)
        if result.version is not None and result.status in ("succeeded", "rejected"):
            slots = None
            if store is not None:
                try:
                    slots = int((store.manifest(result.version).get("slots_changed") or {}).get("total", 0))
                except Exception:
                    slots = None
            if result.status == "succeeded":
                metrics.versions_published.inc()
                if slots is not None:
                    metrics.update_slots.observe(slots)
                    metrics.slots_changed.inc(slots)
            else:
                for reason in set(reject_reasons(ev)):
                    metrics.updates_rejected.labels(reason).inc()
    except Exception:  # metrics never break the update path
        log.exception("recording job metrics failed")
