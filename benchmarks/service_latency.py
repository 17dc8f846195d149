"""Service latency: ingest-to-answerable and /generate latency, against a live `memfit serve`.

    .venv/bin/python benchmarks/service_latency.py [--model DIR] [--gate] [--out FILE]

Starts `memfit serve` on a free port with a fresh store in a temporary directory (the model: --model,
else the default model at ~/.local/share/memfit/models/default, else the tiny test model), then
measures
- ingest-to-answerable for one invented fact: from the POST /ingest to the first /generate that
  answers it (the client polls the job, then asks with min_version = the new version);
- the same for a batch of 100 facts (one request of 100 documents): until the new version is served,
  and the share of the 100 facts it answers;
- POST /generate latency (16 new tokens, greedy) p50/p95 at concurrency 1 and 8.
Prints a table and writes JSON (--out). The gate is off unless --gate (the tiny model forgets most of
its probe set on any update, so the gate would reject it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memfit.bench.load import closed_loop, memfit_serve  # noqa: E402


def find_model(arg: str | None) -> Path:
    if arg:
        return Path(arg).expanduser()
    from memlm.paths import default_model_dir

    default = default_model_dir("default")
    if (default / "model.safetensors").exists():
        return default
    from _models import tiny_model

    return tiny_model()[0]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def question_prompt(q: str) -> str:
    from memlm.evaluation import format_question

    return format_question(q)


def answered(text: str, answer: str) -> bool:
    from memlm.evaluation import is_answered

    return is_answered(text, answer)


def ingest_to_answerable(
    c: httpx.Client, facts: list[dict], check: int, settings: dict | None = None
) -> dict:
    docs = [{"id": f"bench-{i}-{int(time.time() * 1e3)}", "text": f["text"], "facts": [{"question": f["question"], "answer": f["answer"]}]} for i, f in enumerate(facts)]  # fmt: skip
    t0 = time.perf_counter()
    r = c.post("/ingest", json={"documents": docs, **({"settings": settings} if settings else {})})
    r.raise_for_status()
    t_accepted = time.perf_counter() - t0
    job_id = r.json()["job_id"]
    while True:
        job = c.get(f"/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            break
        time.sleep(0.02)
    t_job = time.perf_counter() - t0
    if job["status"] != "succeeded":
        return {"status": job["status"], "error": job.get("error"), "job_seconds": t_job}
    v = job["version"]
    first = facts[0]
    body = {
        "prompt": question_prompt(first["question"]),
        "max_new_tokens": 16,
        "stop": ["\n"],
        "min_version": v,
    }
    g = c.post("/generate", json=body)
    t_served = time.perf_counter() - t0
    ok_first = g.status_code == 200 and answered(g.json()["text"], first["answer"])
    hits = 0
    for f in facts[:check]:
        g = c.post("/generate", json={**body, "prompt": question_prompt(f["question"])})
        hits += int(answered(g.json()["text"], f["answer"]))
    return {
        "status": "succeeded",
        "facts": len(facts),
        "accepted_seconds": round(t_accepted, 4),
        "job_seconds": round(t_job, 3),
        "ingest_to_answerable_seconds": round(t_served, 3),
        "first_fact_answered": ok_first,
        "answered_share": hits / max(1, min(check, len(facts))),
        "timings": job["timings"],
        "learning": job["evaluation"].get("learning"),
    }


def generate_latency(url: str, prompts: list[str], concurrency: int, requests: int) -> dict:
    def post(c: httpx.Client, i: int) -> None:
        r = c.post("/generate", json={"prompt": prompts[i % len(prompts)], "max_new_tokens": 16})
        r.raise_for_status()

    run = closed_loop(
        post, range(requests), concurrency, session=lambda: httpx.Client(base_url=url, timeout=120)
    )
    lat, wall = run.latencies, run.wall_s
    return {
        "concurrency": concurrency,
        "requests": len(lat),
        "p50_ms": round(percentile(lat, 0.5) * 1e3, 1),
        "p95_ms": round(percentile(lat, 0.95) * 1e3, 1),
        "mean_ms": round(statistics.mean(lat) * 1e3, 1),
        "throughput_rps": round(len(lat) / wall, 2),
    }


def main() -> int:
    args = _parse_args()
    model = find_model(args.model)
    one, batch, lat = _measure(args, model)
    result = {
        "model": str(model),
        "gate": bool(args.gate),
        "settings": json.loads(args.settings) if args.settings else None,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "one_fact": one,
        "batch": batch,
        "generate": lat,
    }
    _print_table(result, args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--gate", action="store_true", help="keep the evaluation gate on")
    ap.add_argument("--requests", type=int, default=40, help="/generate requests per concurrency level")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument(
        "--settings", default=None, help="update settings of the ingests, JSON (e.g. '{\"lr\": 1.0}')"
    )
    return ap.parse_args()


def _measure(args: argparse.Namespace, model: Path) -> tuple[dict, dict, list[dict]]:
    """(one fact, the batch, /generate latency per concurrency) against a fresh `memfit serve`."""
    from memlm.data.invented import invented_facts

    home = Path(tempfile.mkdtemp(prefix="memfit-bench-"))
    env = {} if args.gate else {"MEMFIT_GATE_ENABLED": "false"}
    with memfit_serve(model, home, env=env, stop_wait_s=20) as url:
        facts = invented_facts(args.batch + 1, seed=int(time.time()) % 100_000)
        probe_prompts = [question_prompt(f["question"]) for f in facts[:20]]
        with httpx.Client(base_url=url, timeout=600) as c:
            _warm_up(c)
            overrides = json.loads(args.settings) if args.settings else None
            one = ingest_to_answerable(c, facts[:1], check=1, settings=overrides)
            batch = (
                ingest_to_answerable(c, facts[1 : args.batch + 1], check=args.batch, settings=overrides)
                if args.batch
                else {"status": "skipped (--batch 0)"}
            )
        lat = [generate_latency(url, probe_prompts, conc, args.requests) for conc in (1, 8)]
    return one, batch, lat


def _warm_up(c: httpx.Client) -> None:
    """Let the runner load its training copy before the first job is timed."""
    while c.get("/jobs").status_code != 200:
        time.sleep(0.1)
    warm = c.post(
        "/ingest", json={"documents": [{"text": "warm up", "id": "warm"}], "settings": {"steps": 1}}
    )
    wid = warm.json()["job_id"]
    while c.get(f"/jobs/{wid}").json()["status"] in ("queued", "running"):
        time.sleep(0.05)


def _print_table(result: dict, args: argparse.Namespace) -> None:
    one, batch = result["one_fact"], result["batch"]
    print(
        f"model {result['model']} (gate {'on' if args.gate else 'off'}, settings {args.settings or 'default'}); {result['machine']}"
    )
    print(f"{'':34}{'job done':>10}{'answerable':>12}{'answered':>10}")
    for name, r in (("ingest 1 fact", one), (f"ingest {args.batch} facts (1 request)", batch)):
        if r.get("status") != "succeeded":
            print(f"{name:34}{r.get('status')}: {r.get('error')}")
            continue
        print(
            f"{name:34}{r['job_seconds']:>9.2f}s{r['ingest_to_answerable_seconds']:>11.2f}s{r['answered_share']:>10.0%}"
        )
    print(f"{'/generate, 16 tokens':34}{'p50':>10}{'p95':>12}{'req/s':>10}")
    for r in result["generate"]:
        print(
            f"{'  concurrency ' + str(r['concurrency']):34}{r['p50_ms']:>8.0f}ms{r['p95_ms']:>10.0f}ms{r['throughput_rps']:>10.2f}"
        )


if __name__ == "__main__":
    sys.exit(main())
