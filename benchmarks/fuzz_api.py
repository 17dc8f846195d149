"""Fuzz the HTTP API with schemathesis: >= 1,000 generated requests over every operation of
/openapi.json (valid and invalid by the schema), in-process, with an admin API key configured.

Prints the number of cases per operation and per status code, server errors (any 5xx other than a
declared 503 with Retry-After) and answers the OpenAPI document does not declare (status, content
type, body schema), each with its request. Exit status 1 when any was found.

    .venv/bin/python benchmarks/fuzz_api.py [--per-op 30] [--seed 0] [--model DIR]

Model: --model, else the tiny preset from the test cache (.pytest_cache/memfit-tiny), built when absent.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tiny_model() -> Path:
    from _models import tiny_model as find_tiny

    return find_tiny()[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-op", type=int, default=30, help="cases per operation and mode (x2 modes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = ap.parse_args()

    from tests.faults.fuzzing import run_fuzz

    model = args.model or tiny_model()
    with tempfile.TemporaryDirectory(prefix="memfit-fuzz-") as tmp:
        report = run_fuzz(model, Path(tmp), per_op=args.per_op, seed=args.seed)
    print(report.summary())
    print("cases per operation:")
    for op, n in sorted(report.by_operation.items()):
        print(f"  {n:5d}  {op}")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "cases": report.cases,
                    "seconds": round(report.seconds, 2),
                    "server_errors": report.server_errors,
                    "declared_503": report.retry_later,
                    "failures": report.failures,
                    "by_status": dict(report.by_status),
                    "by_operation": dict(report.by_operation),
                },
                indent=2,
            )
        )
    return 1 if report.failures or report.server_errors else 0


if __name__ == "__main__":
    sys.exit(main())
