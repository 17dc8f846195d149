"""Print how a built model uses its memory (memlm.usage) and what it costs to load.

    python benchmarks/memory_usage.py [--model DIR]

One JSON line: per memory layer the memory-output / residual norm ratio, share of slots the held-out
texts read, share of reads on the top 1% of slots, distinct slots a probe QA text reads and the share
of slots all probe texts read together; plus the background's slot share, the model directory size,
load time and the process RSS after loading. Pretraining writes the same figures into
training_report.json; this recomputes them for a model built before it did.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--invented", type=int, default=48,
                    help="new invented facts (tune_sparse's seed 11) whose answer-position reads are "
                         "compared with the probe's: questions no pretraining has seen")  # fmt: skip
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM

    import memlm  # noqa: F401
    from memlm.background import BackgroundStats
    from memlm.data import invented_facts
    from memlm.data.templates import QA_TEMPLATE
    from memlm.paths import default_model_dir
    from memlm.tokenizer import load_tokenizer
    from memlm.usage import answer_key_overlap, answer_key_sharing, memory_usage

    model_dir = Path(args.model) if args.model else default_model_dir("default")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tok = load_tokenizer(model_dir)
    load_s = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    probe = json.loads((model_dir / "probe.json").read_text())
    prompts = [
        QA_TEMPLATE.format(question=f["question"], answer=f["answer"]).rstrip("\n") for f in probe["facts"]
    ]
    usage = memory_usage(model, tok, probe["heldout_texts"], prompts)
    probe_questions = [f["question"] for f in probe["facts"]]
    keys = answer_key_sharing(model, tok, probe_questions)
    new_questions = [f["question"] for f in invented_facts(args.invented, seed=11)]
    new_keys = answer_key_sharing(model, tok, new_questions)
    overlap = answer_key_overlap(model, tok, new_questions, probe_questions)
    bg = BackgroundStats.load(model_dir)
    print(json.dumps({
        "model": str(model_dir),
        "memory_usage": {str(k): v for k, v in usage.items()},
        "answer_key_sharing": {str(k): v for k, v in keys.items()},
        # the same among new invented facts, and their answer-position read weight on the probe's slots
        "answer_key_sharing_new": {str(k): v for k, v in new_keys.items()},
        "answer_key_overlap_new_vs_probe": {str(k): v for k, v in overlap.items()},
        "background_slots_read_share": {str(k): float((df > 0).float().mean()) for k, df in bg.df.items()},
        "background_docs": bg.num_docs,
        "model_dir_bytes": sum(f.stat().st_size for f in model_dir.iterdir() if f.is_file()),
        "load_s": round(load_s, 2),
        "rss_mb_after_load": round(rss_mb),
        "loadavg": os.getloadavg(),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
