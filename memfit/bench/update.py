"""`memfit bench update [--quick] [--out DIR] [--model DIR]`: how fast new facts go live, embedded mode.

Against a live `memfit serve` (a subprocess on a free port, fresh store in a temporary MEMFIT_HOME,
the default model unless --model; evaluation gate at its default settings), measured in one run:

1. Ingest-to-live for one invented fact: from POST /ingest to the end of the first /generate
   (min_version = the job's version) that answers it; the client polls GET /jobs every 20 ms.
   3 trials (--quick: 2), each a new fact, each from the version the previous one left.
2. Flood: F single-fact ingests posted back to back by 4 client threads (F = 300, --quick 60); the
   embedded runner merges queued jobs into one update (MEMFIT_MAX_BATCH_JOBS). Facts per minute =
   F / (time from the first POST to the last job finished), with how many versions it took and the
   share of the flood's facts the final version answers (a sample of 50).
3. Learning / forgetting per batch size (1, 10, 50, 100 facts in one update; --quick 1, 10, 50):
   each batch ingested as one request from the base (the bench re-activates version 0 first);
   learning (ingested wording and held-out wording), forgetting vs base on the model's probe set,
   held-out perplexity change, job seconds, gate verdict: the trade-off curve.

Invented facts come from memlm.data.invented (entities that exist nowhere in the corpus).
Prints a table and writes JSON to --out (default benchmarks/results/update/update[-quick].json).
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from .load import closed_loop, memfit_serve, write_json


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def _docs(facts: list[dict], tag: str) -> list[dict]:
    return [{"id": f"{tag}-{i}", "text": f["text"], "facts": [{"question": f["question"], "answer": f["answer"]}]}
            for i, f in enumerate(facts)]  # fmt: skip


def _wait_job(c: httpx.Client, job_id: str, poll: float = 0.02) -> dict:
    while True:
        job = c.get(f"/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(poll)


def _ask(c: httpx.Client, question: str, min_version: int | None = None) -> str:
    from memlm.evaluation import format_question

    body: dict[str, Any] = {"prompt": format_question(question), "max_new_tokens": 16, "stop": ["\n"]}
    if min_version is not None:
        body["min_version"] = min_version
    r = c.post("/generate", json=body)
    r.raise_for_status()
    return r.json()["text"]


def ingest_to_live(c: httpx.Client, fact: dict, tag: str) -> dict:
    from memlm.evaluation import is_answered

    t0 = time.perf_counter()
    r = c.post("/ingest", json={"documents": _docs([fact], tag)})
    r.raise_for_status()
    t_accept = time.perf_counter() - t0
    job = _wait_job(c, r.json()["job_id"])
    t_job = time.perf_counter() - t0
    out: dict[str, Any] = {
        "status": job["status"],
        "accepted_s": round(t_accept, 4),
        "job_s": round(t_job, 3),
    }
    if job["status"] != "succeeded":
        out["error"] = job.get("error")
        return out
    text = _ask(c, fact["question"], job["version"])
    out["live_s"] = round(time.perf_counter() - t0, 3)
    out["answered"] = is_answered(text, fact["answer"])
    out["timings"] = job.get("timings")
    return out


def flood(c: httpx.Client, url: str, facts: list[dict], clients: int = 4) -> dict:
    from memlm.evaluation import is_answered

    def post(cc: httpx.Client, item: tuple[int, dict]) -> str:
        i, f = item
        r = cc.post("/ingest", json={"documents": _docs([f], f"flood-{i}")})
        r.raise_for_status()
        return r.json()["job_id"]

    t0 = time.perf_counter()
    jobs = closed_loop(
        post, enumerate(facts), clients, session=lambda: httpx.Client(base_url=url, timeout=120)
    ).results
    t_posted = time.perf_counter() - t0
    finals = [_wait_job(c, j, poll=0.1) for j in jobs]
    wall = time.perf_counter() - t0
    versions = sorted({j["version"] for j in finals if j.get("version") is not None})
    statuses: dict[str, int] = {}
    for j in finals:
        statuses[j["status"]] = statuses.get(j["status"], 0) + 1
    sample = facts[:: max(1, len(facts) // 50)][:50]
    hits = sum(is_answered(_ask(c, f["question"]), f["answer"]) for f in sample)
    return {
        "facts": len(facts),
        "posted_s": round(t_posted, 2),
        "wall_s": round(wall, 2),
        "facts_per_minute": round(len(facts) / wall * 60, 1),
        "versions": len(versions),
        "statuses": statuses,
        "answered_share_sample": round(hits / len(sample), 3),
        "sample": len(sample),
    }


def batch_curve(c: httpx.Client, sizes: list[int], seed: int) -> list[dict]:
    from memlm.data.invented import invented_facts

    rows = []
    for b in sizes:
        r = c.post("/versions/0/activate", json={"reason": "bench update: batch curve from the base"})
        if r.status_code >= 400:
            r = c.post("/versions/0/activate")
        facts = invented_facts(b, seed=seed + b)
        t0 = time.perf_counter()
        resp = c.post("/ingest", json={"documents": _docs(facts, f"curve{b}")})
        resp.raise_for_status()
        job = _wait_job(c, resp.json()["job_id"], poll=0.05)
        ev = job.get("evaluation") or {}
        rows.append({
            "batch_facts": b,
            "status": job["status"],
            "job_s": round(time.perf_counter() - t0, 2),
            "learning": ev.get("learning"),
            "learning_heldout": ev.get("learning_heldout"),
            "forgetting_base": ev.get("forgetting_base"),
            "perplexity_change": ev.get("perplexity_change"),
            "gate_passed": (ev.get("gate") or {}).get("passed"),
            "gate_reasons": (ev.get("gate") or {}).get("reasons"),
        })  # fmt: skip
    return rows


def _print(rep: dict) -> None:
    m = rep["machine"]
    print(
        f"model {rep['model']}; {m['cpu_count']} cores; load {m['loadavg']} -> {rep['machine_after']['loadavg']}"
    )
    print("\ningest-to-live, one fact (POST /ingest -> first /generate that answers it)")
    for i, t in enumerate(rep["ingest_to_live"]):
        if t["status"] != "succeeded":
            print(f"  trial {i}: {t['status']} {t.get('error')}")
        else:
            print(f"  trial {i}: job {t['job_s']:.2f} s, live {t['live_s']:.2f} s, answered {t['answered']}")
    f = rep["flood"]
    print(f"\nflood: {f['facts']} single-fact ingests: {f['wall_s']} s -> {f['facts_per_minute']} facts/min in "
          f"{f['versions']} versions {f['statuses']}; final version answers {f['answered_share_sample']:.0%} "
          f"of a {f['sample']}-fact sample")  # fmt: skip
    print("\nbatch size | status    | job s  | learning | held-out | forgetting vs base | ppl change")
    for r in rep["batch_curve"]:

        def fmt(x, pct=True):
            return "-" if x is None else (f"{x:.0%}" if pct else f"{x:+.3f}")

        print(f"{r['batch_facts']:>10} | {r['status']:<9} | {r['job_s']:>6} | {fmt(r['learning']):>8} | "
              f"{fmt(r['learning_heldout']):>8} | {fmt(r['forgetting_base']):>18} | "
              f"{fmt(r['perplexity_change'], False):>10}")  # fmt: skip


def run(args) -> int:
    from memlm.data.invented import invented_facts
    from memlm.paths import default_model_dir

    quick = bool(getattr(args, "quick", False))
    model = Path(args.model).expanduser() if getattr(args, "model", None) else default_model_dir("default")
    if not (model / "model.safetensors").exists():
        raise SystemExit(f"no model at {model}: pass --model DIR or build one (memfit pretrain)")
    out_dir = Path(args.out) if getattr(args, "out", None) else Path("benchmarks/results/update")
    trials, n_flood = (2, 60) if quick else (3, 300)
    sizes = [1, 10, 50] if quick else [1, 10, 50, 100]
    seed = int(time.time()) % 100_000
    rep: dict[str, Any] = {"model": str(model), "quick": quick, "machine": _machine()}
    home = Path(tempfile.mkdtemp(prefix="memfit-bench-update-"))
    t_start = time.perf_counter()
    with (
        memfit_serve(model, home, env={"MEMFIT_RATE_LIMIT_PER_MINUTE": "0"}) as url,
        httpx.Client(base_url=url, timeout=900) as c,
    ):
        warm = c.post(
            "/ingest", json={"documents": [{"text": "warm up", "id": "warm"}], "settings": {"steps": 1}}
        )
        _wait_job(c, warm.json()["job_id"], poll=0.05)
        facts = invented_facts(trials + n_flood, seed=seed)
        rep["ingest_to_live"] = [ingest_to_live(c, facts[i], f"live-{i}") for i in range(trials)]
        rep["flood"] = flood(c, url, facts[trials:])
        rep["batch_curve"] = batch_curve(c, sizes, seed + 1)
    rep["machine_after"] = _machine()
    rep["seconds"] = round(time.perf_counter() - t_start, 1)
    ok = [t["live_s"] for t in rep["ingest_to_live"] if t.get("live_s") is not None]
    rep["aims"] = {
        "ingest_to_live_s": {"aim": "< 3", "measured_median": sorted(ok)[len(ok) // 2] if ok else None},
        "facts_per_minute": {"aim": ">= 300", "measured": rep["flood"]["facts_per_minute"]},
    }
    _print(rep)
    path = write_json(rep, out_dir, "update-quick.json" if quick else "update.json")
    print(f"\nwrote {path} ({rep['seconds']} s)")
    return 0
