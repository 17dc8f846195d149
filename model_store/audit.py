"""Audit and maintenance: slot provenance, diffs between versions, the documents of the active chain,
garbage collection and the full verify."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from memlm.delta import SlotDelta

from .activation import StoreActivation
from .errors import (
    StoreError,
)
from .fsutil import (
    append_jsonl,
    atomic_write_bytes,
    fsync_dir,
)
from .layout import vname
from .tables import (
    net_rows,
    weights_id,
)


@dataclass
class GCPolicy:
    keep_last: int = 20  # retained versions (newest ids) kept besides the active chain
    keep_rejected: bool = False  # rejected versions are audit records; drop them by default
    keep: list[int] = field(default_factory=list)  # versions always kept (with their chains)


class StoreAudit(StoreActivation):
    """slot_history, diff, active_chain_documents, gc, verify."""

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
