"""What the evaluation gate adds to an update, in seconds.

Runs a few real update jobs through workers.pipeline.Pipeline on a fresh store and reports, per job,
the phases the pipeline records (training, evaluation = the gate's work, publish, total), plus the
one-time cost of measuring the base reference (probe answers + held-out perplexity) at load.

The model: --model, else the default model (~/.local/share/memfit/models/default, `make model`) when it
exists, else the tiny test model (built into a temporary directory when no cached one is found). The
output says which.

    .venv/bin/python benchmarks/gate_cost.py [--model DIR] [--updates 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pick_model(arg: str | None) -> tuple[Path, str]:
    if arg:
        return Path(arg), "given"
    from memlm.paths import default_model_dir

    default = default_model_dir()
    if (default / "model.safetensors").exists():
        return default, "default"
    from _models import tiny_model

    path, how = tiny_model()
    return path, f"{how}; the default model is not built"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (default: the default model, else the tiny one)")
    ap.add_argument("--updates", type=int, default=3, help="update jobs to time (one fact each)")
    ap.add_argument(
        "--top-t", type=int, default=None, help="slots per update (default: the tiny-safe 8 on tiny)"
    )
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    from memfit.config import Settings
    from memlm.data.invented import invented_facts
    from model_store import Store
    from workers.pipeline import Pipeline

    model, which = pick_model(args.model)
    tiny = json.loads((model / "config.json").read_text()).get("memory_size", 0) <= 4096
    overrides = (
        {"top_t": args.top_t} if args.top_t else ({"top_t": 8, "lr": 0.03, "steps": 10} if tiny else {})
    )
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(model=model, store=Path(tmp) / "store")
        store = Store.init(settings.store, model)
        pipeline = Pipeline(store, settings)
        t0 = time.perf_counter()
        pipeline.load()
        load_s = time.perf_counter() - t0
        rows = []
        for i, fact in enumerate(invented_facts(args.updates, seed=7)):
            doc = {
                "id": f"gate-cost-{i}",
                "text": fact["text"],
                "facts": [{k: fact[k] for k in ("question", "answer", "heldout_question")}],
            }
            job = store.jobs.create_job(None, [doc], settings=overrides)
            res = pipeline.run_job(job.job_id)
            t = res.timings
            rows.append(
                {
                    "job": i,
                    "status": res.status,
                    "training_s": t.get("training"),
                    "evaluation_s": t.get("evaluation"),
                    "publish_s": t.get("publish"),
                    "total_s": t.get("total"),
                    "probe_facts": res.evaluation.get("probe_facts"),
                    "probe_evaluated": res.evaluation.get("probe_evaluated"),
                    "learning": res.evaluation.get("learning"),
                    "forgetting": res.evaluation.get("forgetting"),
                    "forgetting_base": res.evaluation.get("forgetting_base"),
                    "perplexity_change": res.evaluation.get("perplexity_change"),
                    "perplexity_change_base": res.evaluation.get("perplexity_change_base"),
                    "reach": (res.evaluation.get("reach") or {}).get("share"),
                }
            )
    ev = [r["evaluation_s"] for r in rows if r["evaluation_s"] is not None]
    tot = [r["total_s"] for r in rows if r["total_s"]]
    out = {
        "model": str(model),
        "model_kind": which,
        "gate_probe_facts": settings.gate_probe_facts,
        "gate_heldout_tokens": settings.gate_heldout_tokens,
        "update_settings": overrides,
        "load_reference_s": round(load_s, 3),
        "jobs": rows,
        "evaluation_median_s": round(statistics.median(ev), 3) if ev else None,
        "evaluation_share_of_update": round(sum(ev) / sum(tot), 3) if ev and tot else None,
    }
    _print(out, rows, settings, load_s)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


def _print(out: dict, rows: list[dict], settings, load_s: float) -> None:
    """The table and summary lines of one run."""
    print(f"model: {out['model']} ({out['model_kind']})")
    print(
        f"gate budget: {settings.gate_probe_facts} probe facts, {settings.gate_heldout_tokens} held-out tokens"
    )
    print(f"one-time at load (base reference: model load, probe answers, perplexity): {load_s:.2f} s")
    print(
        f"{'job':>3} {'status':>9} {'training':>9} {'gate':>7} {'publish':>8} {'total':>7} {'probe':>5} "
        f"{'decoded':>7} {'learned':>7} {'forget/parent':>13} {'forget/base':>11} {'ppl/parent':>10} "
        f"{'ppl/base':>8} {'reach':>6}"
    )
    for r in rows:
        print(
            f"{r['job']:>3} {r['status']:>9} {r['training_s']:>8.2f}s {r['evaluation_s']:>6.2f}s "
            f"{r['publish_s']:>7.2f}s {r['total_s']:>6.2f}s {r['probe_facts']:>5} {_fmt(r['probe_evaluated'], 'd'):>7} "
            f"{_fmt(r['learning'], '.0%'):>7} {_fmt(r['forgetting'], '.3f'):>13} {_fmt(r['forgetting_base'], '.3f'):>11} "
            f"{_fmt(r['perplexity_change'], '+.4f'):>10} {_fmt(r['perplexity_change_base'], '+.4f'):>8} "
            f"{_fmt(r['reach'], '.0%'):>6}"
        )
    for key in ("forgetting", "forgetting_base", "perplexity_change", "perplexity_change_base"):
        vals = [r[key] for r in rows if r[key] is not None]
        if vals:
            print(
                f"{key}: max {max(vals):+.4f}, median {statistics.median(vals):+.4f} over {len(vals)} updates"
            )
    train = [r["training_s"] for r in rows if r["training_s"] is not None]
    if train:
        print(
            f"training per single-fact update: median {statistics.median(train):.2f} s, max {max(train):.2f} s"
        )
    import os

    print(f"load average: {os.getloadavg()}")
    if out["evaluation_median_s"] is not None:
        print(
            f"gate cost per update: median {out['evaluation_median_s']:.2f} s "
            f"({100 * out['evaluation_share_of_update']:.0f}% of the update time)"
        )


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


if __name__ == "__main__":
    main()
