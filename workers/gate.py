"""The evaluation gate: what an update is measured against (the probe set shipped with the base, the
reference figures of a version) and the decision to publish it active or rejected.

`measure` evaluates the pipeline's candidate (memlm.evaluation, memlm.reach); `gate` decides from
the figures and the thresholds in Settings (MEMFIT_GATE_*). A rejected version is still published,
with state "rejected", for audit.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memfit.config import Settings


def load_probe(model_dir: str | Path) -> tuple[list[dict], list[str]]:
    """Probe facts and held-out texts from a model directory's probe.json (empty when absent), or from
    a JSON file of the same format (Settings.probe_file, MEMFIT_PROBE_FILE: an error when missing)."""
    path = Path(model_dir)
    if path.is_dir():
        path = path / "probe.json"
        if not path.exists():
            return [], []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"probe file {path}: {e}") from None
    facts = data.get("facts") or data.get("probe") or []
    bad = [i for i, f in enumerate(facts) if not (isinstance(f, dict) and f.get("question") and f.get("answer"))]  # fmt: skip
    if bad:
        raise ValueError(f"probe file {path}: facts {bad[:5]} lack a question or an answer")
    texts = data.get("heldout_texts") or data.get("heldout_text") or data.get("heldout") or []
    return list(facts), [str(t) for t in texts]


@dataclass
class Reference:
    """Evaluation figures of one version that later updates are compared with."""

    answered: list[bool]  # per base-answered probe fact (in Pipeline.probe order)
    perplexity: float
    # per probe fact, {memory layer: slot ids} its prompt + greedy answer reads (memlm.reach); None: not
    # measured yet
    reads: list | None = None


# The thresholds where neither a setting nor the model says otherwise: loose, because models that
# measured nothing tighter (the tiny preset, the earlier 65,536-slot default) forget several probe facts
# in one update. The default preset writes its own, measured ones into update_defaults.json.
HOUSE_THRESHOLDS = {"max_forgetting": 0.10, "max_forgetting_base": 0.25, "max_ppl_increase": 0.25}


def thresholds(settings: Settings, model_defaults: dict | None = None) -> dict[str, float]:
    """The gate's thresholds in effect: Settings.gate_max_* (MEMFIT_GATE_MAX_*) where set, else the
    model's update_defaults.json ("gate_max_forgetting", ...; memlm.update_defaults), else
    HOUSE_THRESHOLDS."""
    d = model_defaults or {}
    out = {}
    for key, house in HOUSE_THRESHOLDS.items():
        value = getattr(settings, f"gate_{key}")
        out[key] = float(d.get(f"gate_{key}", house) if value is None else value)
    return out


def gate(
    settings: Settings,
    forgetting_parent: float,
    forgetting_base: float,
    ppl_change: float | None,
    model_defaults: dict | None = None,
) -> dict[str, Any]:
    """The gate's decision on an update's figures: {"enabled", "passed", "reasons", "thresholds"}; each
    reason names the figure, the threshold and its setting (thresholds: `thresholds`)."""
    t = thresholds(settings, model_defaults)
    reasons = []
    if settings.gate_enabled:
        if forgetting_parent > t["max_forgetting"]:
            reasons.append(
                f"forgetting vs parent {forgetting_parent:.3f} > gate_max_forgetting {t['max_forgetting']}"
            )
        if forgetting_base > t["max_forgetting_base"]:
            reasons.append(
                f"forgetting vs base {forgetting_base:.3f} > gate_max_forgetting_base {t['max_forgetting_base']}"
            )
        if ppl_change is not None and ppl_change > t["max_ppl_increase"]:
            reasons.append(
                f"held-out perplexity change {ppl_change:+.3f} > gate_max_ppl_increase {t['max_ppl_increase']}"
            )
    return {"enabled": settings.gate_enabled, "passed": not reasons, "reasons": reasons, "thresholds": t}


def finite(x: float | None) -> float | None:
    """`x` as a JSON-safe figure: None for a missing, NaN or infinite value (a manifest holds no NaN)."""
    if x is None or x != x or x in (float("inf"), float("-inf")):
        return None
    return float(x)


def measure(
    model: Any,
    tokenizer: Any,
    documents: list[dict],
    *,
    probe: list[dict],
    heldout: list[str],
    budget: Any,
    settings: Settings,
    refs: tuple[Reference, Reference],
    parent: int,
    delta: Any = None,
    parent_reads: Any = None,
    reach_only: bool = True,
    model_defaults: dict | None = None,
) -> dict[str, Any]:
    """Evaluate `model` (the training copy: parent + delta applied): learning, retention vs parent
    (`refs[0]`) and base (`refs[1]`), perplexity change, the reach (memlm.reach: share of probe texts
    that read a changed row), and the gate's decision with the figures.

    reach_only: with the delta and the parent's probe reads known, only the probe facts inside the
    reach are generated again; every other one reads no changed row, so its answer is the parent's bit
    for bit (memlm.reach) and is taken from `refs[0]` ("probe_evaluated" says how many were generated).
    False: every probe fact is generated (the full evaluation the exact one must equal).
    model_defaults: the base model's update_defaults.json, for the gate's thresholds (`thresholds`)."""
    from memlm.evaluation import evaluate_update

    facts = _update_facts(documents)
    parent_ref, base_ref = refs
    res = evaluate_update(
        model,
        tokenizer,
        new_facts=facts,
        probe=(),
        heldout_text=heldout,
        reference_perplexity=parent_ref.perplexity
        if parent_ref.perplexity == parent_ref.perplexity
        else None,
        budget=budget,
    )
    t0 = time.perf_counter()
    known = parent_ref.answered if reach_only and len(parent_ref.answered) == len(probe) else None
    after, reach, reads_after, generated = _probe_after(model, tokenizer, probe, delta, parent_reads, known)
    n_base = len(probe)
    retention_base = (sum(after) / n_base) if n_base else 1.0
    parent_hits = [i for i, h in enumerate(parent_ref.answered) if h]
    kept = sum(1 for i in parent_hits if after[i])
    retention_parent = kept / len(parent_hits) if parent_hits else 1.0
    forgetting_parent = 1.0 - retention_parent
    forgetting_base = 1.0 - retention_base
    ppl_change = res.perplexity_change
    ppl_change_base = None
    if (
        base_ref.perplexity == base_ref.perplexity
        and base_ref.perplexity
        and res.perplexity == res.perplexity
    ):
        ppl_change_base = (res.perplexity - base_ref.perplexity) / base_ref.perplexity
    return {
        "learning": res.learning,
        "learning_heldout": res.learning_heldout,
        "retention": retention_parent,
        "retention_base": retention_base,
        "forgetting": forgetting_parent,
        "forgetting_base": forgetting_base,
        "perplexity": finite(res.perplexity),
        "perplexity_parent": finite(parent_ref.perplexity),
        "perplexity_change": ppl_change,
        "perplexity_change_base": ppl_change_base,
        "probe_facts": n_base,
        "probe_evaluated": generated,
        "reach": reach,
        "new_facts": len(facts),
        "parent": parent,
        "seconds": round(res.seconds + time.perf_counter() - t0, 4),
        "gate": gate(settings, forgetting_parent, forgetting_base, ppl_change, model_defaults),
        "_answered": list(after),
        "_reads": reads_after,
    }


def _update_facts(documents: list[dict]) -> list[dict]:
    """The facts the update's documents supply, in the form memlm.evaluation checks."""
    return [
        {
            "question": f["question"],
            "answer": f["answer"],
            **({"heldout_question": f["heldout_question"]} if f.get("heldout_question") else {}),
        }
        for d in documents
        for f in (d.get("facts") or [])
    ]


def _probe_after(
    model: Any, tokenizer: Any, probe: list[dict], delta: Any, parent_reads: Any, parent_answered=None
):
    """(which probe facts the model answers, the reach of `delta`, the probe's reads after it, how many
    probe facts were generated). With `parent_answered`, only the facts inside the reach are generated."""
    from memlm.evaluation import format_question, greedy_complete, is_answered
    from memlm.reach import delta_rows, merge_reads, reach_report, reached, text_reads

    prompts = [format_question(f["question"]) for f in probe]
    if delta is None or parent_reads is None:
        completions = greedy_complete(model, tokenizer, prompts) if prompts else []
        return [is_answered(c, f["answer"]) for c, f in zip(completions, probe)], None, None, len(prompts)
    changed = delta_rows(delta)
    reach = reach_report(parent_reads, changed)
    hits = reached(parent_reads, changed)
    todo = [i for i, h in enumerate(hits) if h or parent_answered is None]
    completions = greedy_complete(model, tokenizer, [prompts[i] for i in todo]) if todo else []
    after = list(parent_answered) if parent_answered is not None else [False] * len(probe)
    for i, c in zip(todo, completions):
        after[i] = is_answered(c, probe[i]["answer"])
    # a probe outside the reach reads exactly what it read under the parent; re-read the others,
    # with the greedy answers just generated (the same text memlm.reach.probe_texts builds)
    by_index = dict(zip(todo, completions))
    texts = [prompts[i] + by_index[i] for i, h in enumerate(hits) if h]
    reads_after = merge_reads(parent_reads, hits, text_reads(model, tokenizer, texts))
    return [bool(a) for a in after], reach, reads_after, len(todo)
