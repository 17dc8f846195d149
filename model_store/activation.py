"""Activation and undo: activating a retained version (rollback, roll-forward), reverting a version or
a document, and which versions of the chain still have their effect."""

from __future__ import annotations

from typing import Any

from memlm.delta import LayerDelta, SlotDelta

from .errors import (
    DocumentNotTaught,
    NeedsRetrain,
    RevertConflict,
    StoreError,
)
from .publishing import StorePublishing


class StoreActivation(StorePublishing):
    """activate, revert (a version, a document) and the effective chain."""

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
