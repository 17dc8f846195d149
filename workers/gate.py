"""The evaluation gate: what an update is measured against (the probe set shipped with the base, the
reference figures of a version) and the decision to publish it active or rejected.

workers.pipeline measures (memlm.evaluation, memlm.reach); `gate` decides from the figures and the
thresholds in Settings (MEMFIT_GATE_*). A rejected version is still published, with state
"rejected", for audit.
"""

from __future__ import annotations

import json
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


def gate(
    settings: Settings, forgetting_parent: float, forgetting_base: float, ppl_change: float | None
) -> dict[str, Any]:
    """The gate's decision on an update's figures: {"enabled", "passed", "reasons", "thresholds"}; each
    reason names the figure, the threshold and its setting."""
    s = settings
    reasons = []
    if s.gate_enabled:
        if forgetting_parent > s.gate_max_forgetting:
            reasons.append(
                f"forgetting vs parent {forgetting_parent:.3f} > gate_max_forgetting {s.gate_max_forgetting}"
            )
        if forgetting_base > s.gate_max_forgetting_base:
            reasons.append(
                f"forgetting vs base {forgetting_base:.3f} > gate_max_forgetting_base {s.gate_max_forgetting_base}"
            )
        if ppl_change is not None and ppl_change > s.gate_max_ppl_increase:
            reasons.append(
                f"held-out perplexity change {ppl_change:+.3f} > gate_max_ppl_increase {s.gate_max_ppl_increase}"
            )
    return {
        "enabled": s.gate_enabled,
        "passed": not reasons,
        "reasons": reasons,
        "thresholds": {
            "max_forgetting": s.gate_max_forgetting,
            "max_forgetting_base": s.gate_max_forgetting_base,
            "max_ppl_increase": s.gate_max_ppl_increase,
        },
    }


def finite(x: float | None) -> float | None:
    """`x` as a JSON-safe figure: None for a missing, NaN or infinite value (a manifest holds no NaN)."""
    if x is None or x != x or x in (float("inf"), float("-inf")):
        return None
    return float(x)
