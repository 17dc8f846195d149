"""The subcommands of `memfit`: `memfit/cli.py` declares their arguments, each module here does the
work as `run(args) -> int`."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def settings_from_args(args: Any):
    """Settings from the environment (MEMFIT_*) with the options the command line gave on top:
    --model and --store (expanded), --host and --port where the subcommand has them. An option not
    given leaves its field unset, so `"model" in settings.model_fields_set` tells a given --model."""
    from memfit.config import Settings

    overrides: dict[str, Any] = {}
    for name in ("model", "store"):
        if getattr(args, name, None):
            overrides[name] = Path(getattr(args, name)).expanduser()
    for name in ("host", "port"):
        if getattr(args, name, None):
            overrides[name] = getattr(args, name)
    return Settings(**overrides)
