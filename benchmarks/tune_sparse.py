"""Tune sparse memory finetuning on a dev stream disjoint from `memfit bench continual`'s streams.

    python benchmarks/tune_sparse.py [--facts 12] [--probe 64] [--model DIR] \
        '{"optimizer": "sgd", "lr": 3000, "top_t": 1000}' '{"lr": 0.1, "steps": 100}' ...

Each JSON argument is one setting (UpdateSettings fields; "kind": "full" or "lora" for a baseline).
Every setting teaches the same facts one per update from a fresh copy of the model, then prints one
JSON line: learning right after each update (ingested / held-out wording), recall of the stream at the
end, retention of the base-answered probe facts, held-out perplexity change, seconds per update.
The facts are invented with seed 11 and any fact of the benchmark's own dev/test streams (seed 0) is
dropped, so settings chosen here are not tuned on the benchmark's test stream.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("settings", nargs="+", help="JSON objects of UpdateSettings fields")
    ap.add_argument("--facts", type=int, default=12)
    ap.add_argument("--probe", type=int, default=64)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--model", default=None)
    args = ap.parse_args(argv)

    import torch

    from memfit.bench.continual import BenchConfig, Context, MethodSpec, run_stream
    from memfit.bench.continual_stream import mean_of
    from memlm.data import invented_facts
    from memlm.paths import default_model_dir

    model_dir = Path(args.model) if args.model else default_model_dir("default")
    cfg = BenchConfig.small()
    cfg.probe_facts, cfg.heldout_tokens = args.probe, 1024
    ctx = Context(model_dir, cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    bench = BenchConfig()
    reserved = {f["id"] for f in invented_facts(bench.dev_facts + bench.test_facts, seed=bench.seed)}
    facts = [f for f in invented_facts(args.facts * 2 + 50, seed=args.seed) if f["id"] not in reserved]
    facts = facts[: args.facts]
    print(
        json.dumps({"model": str(model_dir), "facts": len(facts), "probe": len(ctx.probe),
                    "base_perplexity": ctx.base_perplexity, "threads": torch.get_num_threads()}),
        flush=True,
    )  # fmt: skip
    for raw in args.settings:
        setting = json.loads(raw)
        kind = setting.pop("kind", "sparse")
        t0 = time.perf_counter()
        r = run_stream(ctx, MethodSpec(kind, kind, setting), facts, eval_every=len(facts))
        f = r["final"]
        print(
            json.dumps({
                "kind": kind, "settings": setting, "learning": f["learning"],
                "learning_heldout": f["learning_heldout"], "recall_end": f["recall"],
                "retention": f["retention"], "retention_by_relation": f.get("retention_by_relation"),
                "perplexity_change": f["perplexity_change"],
                "reach_mean": r["reach_mean"], "rows_read_changed": r["rows_read_changed_mean"],
                "rows_per_update": r["rows_changed_per_update"], "s_per_update": r["seconds_per_update"], "steps_per_update": r["steps_per_update"],
                "distinct_rows": r["distinct_rows_changed"], "wall_s": time.perf_counter() - t0,
                "rehearsed_per_update": mean_of(x.get("rehearsed", 0) for x in r.get("records", [])),
                "repaired_per_update": mean_of(x.get("repaired", 0) for x in r.get("records", [])),
                "load_average": os.getloadavg(),
            }),
            flush=True,
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
