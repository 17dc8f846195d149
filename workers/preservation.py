"""The slots no update may train: what the base model already knows, kept out of selection.

With `update_preserve` (MEMFIT_UPDATE_PRESERVE), the known facts of the model's probe set that the gate
does not measure -- probe.json's facts after the first `gate_probe_facts`, those the base answers -- form
a preservation set; with `update_shield` N (MEMFIT_UPDATE_SHIELD), N served-format question-answer texts
of invented entities no stream uses are added (the reads the "Question: ... Answer:" frame makes for any
question). memlm.reach.protection_mask turns their memory reads into a mask that every update's top-t
selection skips (memlm.updater.sparse_update(protected=...)). It is computed once on the base: the
slots a text reads at the first memory layer never move under value-only updates, so a protected
prompt there gives bit-identical output after any update (memlm.reach's module docstring).

The gate's probe stays outside the preservation set, so what the gate measures is never the set that
was protected. Unless a setting says otherwise, the model's update_defaults.json decides (the default
preset turns both on; models without the file: off, since on a memory whose reads every question
shares -- the earlier 65,536-slot default -- protecting the known facts leaves too few rows to learn
with, docs/internals.md).
"""

from __future__ import annotations

import logging
from typing import Any

from memfit.config import Settings

log = logging.getLogger("memfit.preservation")


def preservation_facts(model, tokenizer, facts: list[dict], settings: Settings) -> list[dict]:
    """The probe facts after the gate's first `gate_probe_facts` that the base answers."""
    from memlm.evaluation import answered

    rest = facts[settings.gate_probe_facts :]
    hits = answered(model, tokenizer, rest) if rest else []
    return [f for f, h in zip(rest, hits) if h]


def protection(settings: Settings, model_defaults: dict | None = None) -> tuple[bool, int]:
    """(preserve, shield) in effect: the setting where it is set (MEMFIT_UPDATE_PRESERVE / _SHIELD), else
    the model's update_defaults.json (memlm.update_defaults), else off."""
    d = model_defaults or {}
    preserve = settings.update_preserve if settings.update_preserve is not None else bool(d.get("preserve"))
    shield = settings.update_shield if settings.update_shield is not None else int(d.get("shield") or 0)
    return preserve, shield


def preservation_mask(
    model, tokenizer, facts: list[dict], settings: Settings, model_defaults: dict | None = None
) -> dict[int, Any] | None:
    """{memory layer: bool mask} of the protected slots, or None when neither is on (`protection`).
    Raises ValueError naming the setting when preservation is asked for and no known fact is left."""
    preserve, shield = protection(settings, model_defaults)
    if not preserve and not shield:
        return None
    from memlm.reach import protection_mask

    keep = preservation_facts(model, tokenizer, facts, settings) if preserve else []
    if preserve and not keep:
        raise ValueError(
            f"MEMFIT_UPDATE_PRESERVE: no known fact beyond the gate's first {settings.gate_probe_facts} "
            f"probe facts ({len(facts)} in the probe set) to preserve"
        )
    mask = protection_mask(model, tokenizer, keep, shield)
    log.info(
        "protected slots: %s (%d preserved facts, %d shield texts)",
        {layer: int(m.sum()) for layer, m in mask.items()},
        len(keep),
        shield,
    )
    return mask
