"""`memfit pretrain`: build the tokenizer and memory-layer model of a preset from the offline corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# glibc's allocator hands every freed block above its mmap threshold back to the kernel at once; a
# pretraining step allocates and frees gigabyte-sized sparse value gradients, so each step would fault
# every page in again. Keeping freed memory in the process made a 1,048,576-slot step 0.65x as long and
# a 262,144-slot step 0.84x, with identical losses (benchmarks/pretrain_steps.py, docs/internals.md).
# glibc reads these at process start, so the build runs in a child process that has them.
ALLOCATOR_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "17179869184",
    "MALLOC_TOP_PAD_": "1073741824",
}


def run(args) -> int:
    from memlm.paths import default_model_dir

    out = Path(args.out).expanduser() if args.out else default_model_dir(args.preset)
    if (out / "config.json").exists() and not args.force:
        print(f"a model already exists at {out} (use --force to rebuild)")
        report = out / "training_report.json"
        if report.exists():
            from memlm import report_summary

            print(json.dumps(report_summary(json.loads(report.read_text())), indent=2))
        return 0

    from memfit.extras import check

    problem = check("pretrain", "memfit pretrain")
    if problem:
        print(f"memfit pretrain: {problem}", file=sys.stderr)
        return 2

    from memlm.presets import preset_with

    try:
        preset_with(args.preset, getattr(args, "set", None) or [])  # a bad --set fails here, named
    except ValueError as e:
        print(f"memfit pretrain: {e}")
        return 2
    return build(args.preset, out, seed=args.seed, sets=getattr(args, "set", None) or [], force=args.force)


def build(preset: str, out: Path, seed: int = 0, sets: list[str] | None = None, force: bool = False) -> int:
    """Build `preset` (with "FIELD=VALUE" `sets`) into `out`: in a child process started with
    ALLOCATOR_ENV where glibc needs it, else here. Returns the exit status (0: built)."""
    if _needs_allocator_child():
        return _build_in_child(preset, out, seed, sets or [], force)
    from memlm.presets import preset_with
    from memlm.pretrain import pretrain

    print(f"building the {preset} model into {out}", flush=True)
    pretrain(preset_with(preset, sets or []), out, seed=seed, progress=True)
    return 0


def _needs_allocator_child() -> bool:
    """True on glibc Linux when this process lacks ALLOCATOR_ENV (MEMFIT_PRETRAIN_IN_PROCESS=1: never)."""
    if os.environ.get("MEMFIT_PRETRAIN_IN_PROCESS") == "1" or not sys.platform.startswith("linux"):
        return False
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    return any(os.environ.get(k) != v for k, v in ALLOCATOR_ENV.items())


def _build_in_child(preset: str, out: Path, seed: int, sets: list[str], force: bool) -> int:
    """The same build in a child process started with ALLOCATOR_ENV (output and Ctrl-C pass through)."""
    argv = [sys.executable, "-m", "memfit.cli", "pretrain", "--preset", preset, "--out", str(out)]
    argv += ["--seed", str(seed)] + (["--force"] if force else [])
    for assignment in sets:
        argv += ["--set", assignment]
    env = {**os.environ, **ALLOCATOR_ENV, "MEMFIT_PRETRAIN_IN_PROCESS": "1"}
    return subprocess.run(argv, env=env).returncode
