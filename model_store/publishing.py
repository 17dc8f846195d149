"""Publishing: validating a delta, rebasing it onto a moved active version, writing it as an immutable
version (every step a named crash point) and moving ACTIVE."""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from memlm.delta import LayerDelta, SlotDelta

from .errors import (
    ActiveMovedError,
    RebaseConflict,
)
from .fsutil import (
    append_jsonl,
    atomic_write_bytes,
    crash_point,
    fsync_dir,
    fsync_file,
    sha256_file,
    sha256_json,
)
from .layout import vname
from .snapshots import StoreSnapshots

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


class StorePublishing(StoreSnapshots):
    """publish (compare-and-set on ACTIVE, or rebase), rebase, and the ACTIVE pointer's writes."""

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
        fields: dict[str, Any] = {
            "job_id": job_id,
            "documents": [str(d["id"]) if isinstance(d, dict) else str(d) for d in documents],
            "settings": settings or {},
            "evaluation": evaluation or {},
            "report": {**delta.report, **(report or {})},
            "state": state,
            "kind": kind,
        }
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
                fields["report"] = {**delta.report, **(report or {})}
            parent = int(parent)
            if parent != 0:
                self._verify_files(parent, self.manifest(parent))
            vid = self._last_id() + 1
            fields.update(parent=parent, rebased_from=rebased_from)
            self._write_version(vid, delta, fields, extra or {})
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

    def _write_version(
        self, vid: int, delta: SlotDelta, fields: dict[str, Any], extra: dict[str, Any]
    ) -> None:
        """Write version `vid` (delta, then its checksummed manifest) into a temp dir, fsync, and rename
        it into place: readers see the whole version or none."""
        import json

        tmp = self.versions_dir / f".tmp-{vname(vid)}-{os.getpid()}"
        tmp.mkdir()
        crash_point("publish:tmp_created")
        dpath = tmp / "delta.safetensors"
        delta.save(dpath)
        fsync_file(dpath)
        crash_point("publish:delta_written")
        m: dict[str, Any] = {
            "id": vid,
            "parent": fields["parent"],
            "created_at": time.time(),
            **{k: fields[k] for k in ("job_id", "documents", "settings", "evaluation", "report")},
            "state": fields["state"],
            "kind": fields["kind"],
            "slots_changed": {
                "total": delta.num_slots,
                "layers": {str(k): ld.indices.numel() for k, ld in delta.layers.items()},
            },
            "base_id": self.base_id,
            "rebased_from": fields["rebased_from"],
            "files": {"delta.safetensors": {"sha256": sha256_file(dpath), "bytes": dpath.stat().st_size}},
            **extra,
        }
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
