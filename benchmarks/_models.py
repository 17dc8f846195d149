"""Which tiny model the benchmark scripts use when no default model is built.

One rule for every script: the test suite's cached tiny model for the CURRENT recipe (the same key
tests/conftest.py uses, so a cache entry built by an older recipe is never picked), else the tiny
model in the user data dir, else the tiny preset is built there now.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _complete(d: Path) -> bool:
    return (d / "config.json").exists() and (d / "background.safetensors").exists()


def tiny_model() -> tuple[Path, str]:
    """(model dir, how it was found)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from memlm.paths import default_model_dir
    from tests.conftest import _recipe_hash

    cached = ROOT / ".pytest_cache" / "memfit-tiny" / _recipe_hash()
    if _complete(cached):
        return cached, "tiny (test cache)"
    tiny = default_model_dir("tiny")
    if _complete(tiny):
        return tiny, "tiny"
    from memlm.pretrain import pretrain

    print(f"no default model: building the tiny preset into {tiny}", flush=True)
    pretrain("tiny", tiny, progress=True)
    return tiny, "tiny (built now)"
