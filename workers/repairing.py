"""Repair in the service: an update keeps what the versions before it taught (memlm.repair).

With `update_repair` (MEMFIT_UPDATE_REPAIR; unset: the model's update_defaults.json, which the
default preset turns on), every update is followed by memlm.repair: the facts the active chain taught
whose served text reads a row the update wrote are decoded, and the ones lost are trained again beside
the update's own documents; the version published is the composition of both. Only facts inside the
update's written rows are decoded: the others read no changed row and answer as before, bit for bit.

`TaughtFacts` keeps, per version, the facts its chain taught with their memory reads (a fixed text's
reads never move under value-only updates, so they are computed once per fact). A version published by
this pipeline adds the facts of its documents that the update answered; a version first met otherwise
(after a restart, a revert, or published by another worker) is rebuilt from the documents of its
effective chain in the store, every fact counted as taught: one that never was is trained again when
an update reaches it.
"""

from __future__ import annotations

import logging
from typing import Any

from memfit.config import Settings

log = logging.getLogger("memfit.repairing")


def repairing(settings: Settings, model_defaults: dict | None = None) -> bool:
    """Whether updates repair: the setting where set (MEMFIT_UPDATE_REPAIR), else the model's
    update_defaults.json "repair", else off."""
    if settings.update_repair is not None:
        return bool(settings.update_repair)
    return bool((model_defaults or {}).get("repair"))


class TaughtFacts:
    """{version: memlm.repair.Learned} of the facts each version's chain taught (bounded cache)."""

    def __init__(self, store: Any, keep: int = 8) -> None:
        self.store = store
        self.keep = keep  # versions cached; an evicted one is rebuilt from the store
        self._by_version: dict[int, Any] = {}

    def at(self, v: int, model, tokenizer):
        """The facts version `v`'s chain taught, with their reads. Unknown versions are built from the
        documents of the chain's versions whose effect is still in the tables (Store.effective_chain:
        a reverted document's facts are not taught, and a repair must not bring them back)."""
        from memlm.repair import Learned, one_fact_documents

        if v in self._by_version:
            return self._by_version[v]
        learned = Learned()
        for u in self.store.effective_chain(v):
            learned.add(model, tokenizer, one_fact_documents(self.store.documents_of_version(u)))
        log.info("taught facts of version %d rebuilt from its chain: %d facts", v, len(learned))
        self._put(v, learned)
        return learned

    def published(self, v: int, parent: int, taught, model, tokenizer) -> None:
        """Version `v` went live on `parent` and taught `taught` (a memlm.repair.Learned)."""
        learned = self.at(parent, model, tokenizer).copy()
        learned.docs += taught.docs
        learned.reads += taught.reads
        self._put(v, learned)

    def _put(self, v: int, learned) -> None:
        self._by_version[v] = learned
        while len(self._by_version) > self.keep:
            self._by_version.pop(min(self._by_version))
