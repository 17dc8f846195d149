"""The serving footprint of a model directory, measured in a fresh process: how long `memlm.load`
takes, and the process's peak resident memory once the model has loaded and answered one greedy
question (what a serving process holds before any request-level state; safetensors are mapped, so
value rows count once a read touches their pages).

    python -m memlm.footprint MODEL_DIR      # prints {"load_seconds", "serving_rss_bytes", ...}

`measure(model_dir)` runs that child and returns its figures (training_report.json's `footprint`).
A fresh process is the honest measure: the build's own process holds the optimizer and the corpus.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def _child(model_dir: str) -> dict:
    import resource

    import torch

    import memlm
    from memlm.evaluation import format_question, greedy_complete

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    t0 = time.perf_counter()
    model, tokenizer = memlm.load(model_dir)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        greedy_complete(
            model, tokenizer, [format_question("What is the capital of France?")], max_new_tokens=8
        )
    return {
        "load_seconds": round(load_s, 3),
        "first_answer_seconds": round(time.perf_counter() - t0, 3),
        "rss_after_imports_bytes": int(rss_before),
        "serving_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
    }


def measure(model_dir: str | Path, timeout_s: float = 600.0) -> dict:
    """The figures of `_child` from a fresh interpreter; {"error": ...} when the child fails (the build
    itself has succeeded: the report says why the footprint is missing instead of failing it)."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "memlm.footprint", str(model_dir)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": f"footprint child did not run: {e}"}
    if proc.returncode != 0:
        return {"error": f"footprint child exited {proc.returncode}: {proc.stderr.strip()[-500:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m memlm.footprint MODEL_DIR")
    print(json.dumps(_child(sys.argv[1])))
