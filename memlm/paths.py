"""Where memfit keeps built models and stores: the user data directory, never the repository."""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_data_dir


def memfit_home() -> Path:
    """`MEMFIT_HOME` if set, else the platform user data directory (~/.local/share/memfit)."""
    env = os.environ.get("MEMFIT_HOME")
    return Path(env).expanduser() if env else Path(user_data_dir("memfit", appauthor=False))


def default_model_dir(preset: str = "default") -> Path:
    return memfit_home() / "models" / preset


def default_store_dir() -> Path:
    return memfit_home() / "store"
