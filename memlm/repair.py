"""Repair: an update keeps what earlier updates taught.

A fact an earlier update taught can only be changed by an update that writes a row its served text
reads (the question in the served format with its answer): the memory's query and slot choice sit
below the value tables, so the reads of a fixed text never move under value-only updates
(memlm.reach). After an update, `repair_update` checks exactly those facts; the ones no longer answered are
trained again beside the update's own documents in a second update from the updated state, and the
two deltas are composed into one relative to the state before the first (`memlm.delta.compose`).
The facts outside the written rows are never decoded: their answers are bit-identical.

`Learned` holds the taught facts with their reads; its owner (the benchmark's learner, the service's
pipeline per version) adds the facts each update taught.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .delta import SlotDelta, compose
from .evaluation import answered, format_question
from .reach import delta_rows, reached, text_reads

REPAIR_SEED_OFFSET = 7919  # the second update's paraphrase order differs from the first's


def served_text(fact: dict) -> str:
    """The text a served question about `fact` reads the memory with: the prompt and the answer."""
    return format_question(fact["question"]) + " " + fact["answer"]


def one_fact_documents(documents: Sequence[dict]) -> list[dict]:
    """Each fact of `documents` as a document of its own (what a repair trains again)."""
    return [{**d, "facts": [f]} for d in documents for f in d.get("facts") or []]


def _fact(doc: dict) -> dict:
    """The one fact of a one-fact document, in the form memlm.evaluation checks."""
    f = doc["facts"][0]
    return {"question": f["question"], "answer": f["answer"]}


@dataclass
class Learned:
    """Facts earlier updates taught: one document per fact (what a repair trains again) and the memory
    reads of the fact's served text (which rows can change it)."""

    docs: list[dict] = field(default_factory=list)
    reads: list[dict[int, torch.Tensor]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.docs)

    def copy(self) -> Learned:
        return Learned(list(self.docs), list(self.reads))

    def add_taught(self, model, tokenizer, documents: Sequence[dict]) -> int:
        """Add the facts of `documents` that `model` answers now (what the update just taught); returns
        how many were added."""
        docs = one_fact_documents(documents)
        if not docs:
            return 0
        hits = answered(model, tokenizer, [_fact(d) for d in docs])
        taught = [d for d, h in zip(docs, hits) if h]
        self.add(model, tokenizer, taught)
        return len(taught)

    def add(self, model, tokenizer, docs: Sequence[dict]) -> None:
        """Add one-fact documents as taught, with their reads (computed here, once)."""
        if not docs:
            return
        self.docs += list(docs)
        self.reads += text_reads(model, tokenizer, [served_text(d["facts"][0]) for d in docs])


def repair_update(
    model,
    tokenizer,
    documents: Sequence[dict],
    background,
    settings,
    delta: SlotDelta,
    learned: Learned,
    protected: Any = None,
) -> SlotDelta:
    """After `delta` (already applied to `model`), retrain beside `documents` the facts of `learned`
    that read a row `delta` wrote and are no longer answered. Returns `delta` when nothing was lost,
    else the composition of both updates; its report adds "repair_checked" (facts decoded) and
    "repaired" (facts trained again), and sums "seconds" and "steps"."""
    from .updater import learn_documents

    hit = reached(learned.reads, delta_rows(delta))
    suspects = [d for d, h in zip(learned.docs, hit) if h]
    report = {**delta.report, "repair_checked": len(suspects), "repaired": 0}
    if not suspects:
        delta.report = report
        return delta
    lost = [d for d, ok in zip(suspects, answered(model, tokenizer, [_fact(d) for d in suspects])) if not ok]
    if not lost:
        delta.report = report
        return delta
    again = learn_documents(
        model,
        tokenizer,
        [*documents, *lost],
        background,
        settings.replace(seed=settings.seed + REPAIR_SEED_OFFSET),
        protected=protected,
    )
    both = compose(delta, again)
    both.report = {
        **report,
        "repaired": len(lost),
        "seconds": delta.report.get("seconds", 0.0) + again.report.get("seconds", 0.0),
        "steps": delta.report.get("steps", 0) + again.report.get("steps", 0),
        "rows_changed": both.num_slots,
    }
    return both
