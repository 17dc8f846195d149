"""Fuzz the HTTP API with schemathesis: >= 1,000 generated requests over every operation of
/openapi.json (valid and invalid by the schema), in-process, with an admin API key configured.

Then the boundary pass (tests/service/fuzz_boundaries.py): every integer and number field of every
operation (body, nested, query and path) gets each boundary value (2**63 - 1, 2**63, 2**64, -1,
-(2**63) - 1, 1e300, NaN, Infinity, a 5,000-digit literal, ...), streaming and not; a 422 must name
the field, and every numeric field must have both bounds in the document.

Prints the number of cases per operation and per status code, server errors (any 5xx other than a
declared 503 with Retry-After) and answers the OpenAPI document does not declare (status, content
type, body schema), each with its request. Exit status 1 when any was found.

    .venv/bin/python benchmarks/fuzz_api.py [--per-op 30] [--seed 0] [--model DIR] [--no-boundaries]

Model: --model, else the tiny preset from the test cache (.pytest_cache/memfit-tiny), built when absent.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tiny_model() -> Path:
    from _models import tiny_model as find_tiny

    return find_tiny()[0]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-op", type=int, default=30, help="cases per operation and mode (x2 modes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    ap.add_argument("--no-boundaries", action="store_true", help="skip the boundary-value pass")
    args = ap.parse_args()

    from tests.faults.fuzzing import run_fuzz
    from tests.service.fuzz_boundaries import BOUNDARY_VALUES, run_boundary_fuzz

    run = {
        "command": shlex.join(["benchmarks/fuzz_api.py", *sys.argv[1:]]),
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "commit": git_commit(),
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "load_average_start": load_average(),  # 1, 5, 15 min: the box is shared, figures are upper bounds
    }
    model = args.model or tiny_model()
    with tempfile.TemporaryDirectory(prefix="memfit-fuzz-") as tmp:
        report = run_fuzz(model, Path(tmp), per_op=args.per_op, seed=args.seed)
    runs = {"schemathesis": report}
    unbounded: list[str] = []
    if not args.no_boundaries:
        with tempfile.TemporaryDirectory(prefix="memfit-fuzz-bounds-") as tmp:
            runs["boundaries"], unbounded = run_boundary_fuzz(model, Path(tmp), BOUNDARY_VALUES)
    for name, r in runs.items():
        print(f"== {name}")
        print(r.summary())
        print("cases per operation:")
        for op, n in sorted(r.by_operation.items()):
            print(f"  {n:5d}  {op}")
    if unbounded:
        print("numeric fields without a minimum or a maximum:", *unbounded, sep="\n  ")
    total = sum(r.cases for r in runs.values())
    errors = sum(r.server_errors for r in runs.values())
    failures = sum(len(r.failures) for r in runs.values())
    print(f"total: {total} requests, {errors} server errors, {failures} check failures")
    run["load_average_end"] = load_average()
    for k, v in run.items():
        print(f"{k}: {v}")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "run": run,
                    "cases": total,
                    "server_errors": errors,
                    "unbounded_fields": unbounded,
                    "runs": {
                        name: {
                            "cases": r.cases,
                            "seconds": round(r.seconds, 2),
                            "server_errors": r.server_errors,
                            "declared_503": r.retry_later,
                            "failures": r.failures,
                            "by_status": dict(r.by_status),
                            "by_operation": dict(r.by_operation),
                        }
                        for name, r in runs.items()
                    },
                },
                indent=2,
            )
        )
    return 1 if failures or errors or unbounded else 0


if __name__ == "__main__":
    sys.exit(main())
