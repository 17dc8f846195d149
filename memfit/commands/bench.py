"""`memfit bench continual|update|serve|swap`: dispatch to the benchmark modules (memfit/bench/), imported
lazily."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "continual": "memfit.bench.continual",
    "update": "memfit.bench.update",
    "serve": "memfit.bench.serve",
    "swap": "memfit.bench.swap",
}


def run(args) -> int:
    name = BENCHMARKS[args.which]
    if args.which == "continual":  # the LoRA and BM25 baselines and the plots
        from memfit.extras import check

        problem = check("bench", "memfit bench continual")
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    try:
        mod = importlib.import_module(name)
    except ImportError as e:
        if e.name and name.startswith(e.name):
            print(
                f"error: benchmark {args.which!r} is not available: {name} is missing ({e})", file=sys.stderr
            )
            return 2
        raise
    return int(mod.run(args) or 0)
