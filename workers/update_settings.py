"""The UpdateSettings of a job: memlm's defaults, the model's update_defaults.json, the service's
MEMFIT_UPDATE_* settings and the job's own `settings`, each over the one before."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from memfit.config import Settings


def update_settings_fields() -> set[str]:
    from memlm.updater import UpdateSettings

    return {f.name for f in fields(UpdateSettings)}


def build_update_settings(
    settings: Settings | None, overrides: dict[str, Any] | None, model_defaults: dict | None = None
):
    """memlm.updater.UpdateSettings from memlm's defaults, the model's update_defaults.json
    (`model_defaults`: its "lr" and "top_t"), the service defaults (Settings.update_*; None: memlm's
    defaults only, to validate overrides) and a job's overrides, each over the one before.

    Raises ValueError naming an unknown field or a bad value."""
    from memlm.updater import UpdateSettings

    values: dict[str, Any] = {k: v for k, v in (model_defaults or {}).items() if k in ("lr", "top_t")}
    if settings is not None:
        defaults = {"top_t": settings.update_top_t, "steps": settings.update_steps, "lr": settings.update_lr}
        values.update({k: v for k, v in defaults.items() if v is not None})
    known = update_settings_fields()
    for k, v in (overrides or {}).items():
        if k not in known:
            raise ValueError(f"unknown update setting {k!r}; known: {sorted(known)}")
        if v is not None:
            values[k] = v
    return UpdateSettings(**values)
