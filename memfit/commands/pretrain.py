"""`memfit pretrain`: build the tokenizer and memory-layer model of a preset from the offline corpus."""

from __future__ import annotations

import json
import sys
from pathlib import Path


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
    from memlm.pretrain import pretrain

    try:
        preset = preset_with(args.preset, getattr(args, "set", None) or [])
    except ValueError as e:
        print(f"memfit pretrain: {e}")
        return 2
    print(f"building the {args.preset} model into {out}", flush=True)
    pretrain(preset, out, seed=args.seed, progress=True)
    return 0
