"""Distributed-mode latency: ingest -> answerable on every replica, and publish -> last replica serving.

Starts a private redis-server on a free port, one `memfit worker` and two `memfit serve` replicas on a
fresh store in a temporary directory, then measures

1. one fact: POST /ingest -> the job's version served (and the fact answered) by both replicas;
2. a burst of 100 single-document ingests (merged into batched updates by the workers) and one request
   of 100 documents: first POST -> the last job's version served by both replicas;
3. publish -> last replica: the store's ACTIVE flip (activations log time) -> the time the last
   replica serves the version, for worker publishes and for rollbacks made through one replica.

Model: --model, else ~/.local/share/memfit/models/default when it exists, else the tiny preset (the
test cache's copy, or built). The evaluation gate is switched off (the tiny model forgets its probe set
when it learns, and the gate's decision does not change the latency: the evaluation runs either way).

    .venv/bin/python benchmarks/distributed_latency.py [--model DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memfit.bench.load import free_port  # noqa: E402


def pick_model(arg: str | None) -> tuple[Path, str]:
    from memlm.paths import default_model_dir

    if arg:
        return Path(arg).expanduser(), "given"
    default = default_model_dir("default")
    if (default / "config.json").exists() and (default / "background.safetensors").exists():
        return default, "default"
    from _models import tiny_model

    return tiny_model()


class Cluster:
    def __init__(self, model: Path, workdir: Path, replicas: int = 2) -> None:
        self.workdir = workdir
        self.redis_port = free_port()
        self.redis = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.store = workdir / "store"
        from model_store import Store

        Store.init(self.store, model)
        env = {
            **os.environ,
            "MEMFIT_HOME": str(workdir / "home"),
            "MEMFIT_REDIS_URL": self.url,
            "MEMFIT_GATE_ENABLED": "false",
            "MEMFIT_LOG_LEVEL": "WARNING",
            "MEMFIT_WORKER_METRICS_PORT": "0",
            "PYTHONUNBUFFERED": "1",
        }
        self.procs: list[subprocess.Popen] = []
        time.sleep(0.3)

        def spawn(name: str, args: list[str], **extra: str) -> subprocess.Popen:
            log = open(workdir / f"{name}.log", "ab")
            p = subprocess.Popen([sys.executable, "-m", "memfit.cli", *args], cwd=ROOT, env={**env, **extra}, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            self.procs.append(p)
            return p

        self.worker = spawn("worker", ["worker", "--store", str(self.store)], MEMFIT_LOG_LEVEL="INFO")
        self.ports = [free_port() for _ in range(replicas)]
        for i, port in enumerate(self.ports):
            spawn(
                f"api-{i}", ["serve", "--model", str(model), "--store", str(self.store), "--port", str(port)]
            )
        self.clients = [httpx.Client(base_url=f"http://127.0.0.1:{p}", timeout=120) for p in self.ports]
        try:
            self._wait_up(workdir)
        except BaseException:
            self.close()
            raise

    def _wait_up(self, workdir: Path) -> None:
        deadline = time.time() + 600
        for c in self.clients:
            while True:
                try:
                    if c.get("/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline or any(p.poll() is not None for p in self.procs):
                    raise SystemExit(f"cluster did not start; logs in {workdir}")
                time.sleep(0.2)
        while "ready." not in (workdir / "worker.log").read_text(errors="replace"):
            if time.time() > deadline or self.worker.poll() is not None:
                raise SystemExit(f"worker did not start; see {workdir / 'worker.log'}")
            time.sleep(0.2)

    def close(self) -> None:
        for c in self.clients:
            c.close()
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        self.redis.terminate()
        self.redis.wait(10)


def ask(c: httpx.Client, question: str, max_new_tokens: int = 16) -> dict:
    r = c.post("/generate", json={"prompt": f"Question: {question}\nAnswer:", "max_new_tokens": max_new_tokens,
                                  "stop": ["\n"]})  # fmt: skip
    r.raise_for_status()
    return r.json()


def wait_jobs(c: httpx.Client, ids: list[str], timeout: float = 3600) -> list[dict]:
    deadline = time.time() + timeout
    pending = list(ids)
    done: dict[str, dict] = {}
    while pending:
        if time.time() > deadline:
            raise SystemExit(f"{len(pending)} jobs unfinished after {timeout} s")
        still = []
        for j in pending:
            job = c.get(f"/jobs/{j}").json()
            if job["status"] in ("queued", "running"):
                still.append(j)
            else:
                done[j] = job
        pending = still
        if pending:
            time.sleep(0.2)  # latency is measured by the Watcher, not here
    return [done[j] for j in ids]


class Watcher:
    """Records, per replica, each change of the version it serves as (time.time(), version).

    To measure without loading the machine the workers train on, a thread reads the store's ACTIVE
    file every 2 ms (a local file read) and polls a replica's GET /readyz (its live version) every
    2 ms only while the replica lags ACTIVE; otherwise every 0.5 s."""

    def __init__(self, clients: list[httpx.Client], store_dir: Path) -> None:
        self.active_file = store_dir / "ACTIVE"
        self.changes: list[list[tuple[float, int]]] = [[] for _ in clients]
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i, c), daemon=True) for i, c in enumerate(clients)
        ]
        for t in self._threads:
            t.start()

    def _active(self) -> int | None:
        try:
            return int(self.active_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _run(self, i: int, c: httpx.Client) -> None:
        last: int | None = None
        next_poll = 0.0
        while not self._stop.is_set():
            now = time.time()
            active = self._active()
            if active != last or now >= next_poll:
                try:
                    v = c.get("/readyz", timeout=5).json()["active_version"]
                except Exception:
                    v = None
                if v is not None and v != last:
                    self.changes[i].append((time.time(), v))
                    last = v
                next_poll = now + 0.5
            self._stop.wait(0.002)

    def served_at(self, version: int, after: float, timeout: float = 120) -> list[float]:
        """Per replica, when it first served `version` after time `after` (waits for it)."""
        deadline = time.time() + timeout
        while True:
            out = []
            for ch in self.changes:
                hit = [t for t, v in list(ch) if v == version and t >= after]
                out.append(hit[0] if hit else None)
            if all(x is not None for x in out):
                return out
            if time.time() > deadline:
                raise SystemExit(
                    f"version {version} not served by every replica after {timeout} s: {self.changes}"
                )
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()


def activation_time(store_dir: Path, to: int) -> float:
    for rec in reversed(
        [json.loads(x) for x in (store_dir / "log" / "activations.jsonl").read_text().splitlines() if x]
    ):
        if rec.get("to") == to:
            return float(rec["time"])
    raise KeyError(to)


def docs_for(facts: list[dict], prefix: str) -> list[dict]:
    return [{"id": f"{prefix}-{i}", "text": f["text"], "facts": [{"question": f["question"], "answer": f["answer"]}]}
            for i, f in enumerate(facts)]  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=None, help="also write the figures as JSON here")
    ap.add_argument("--burst", type=int, default=100)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, store)")
    args = ap.parse_args()
    from memlm.data.invented import invented_facts

    model, which = pick_model(args.model)
    print(f"model: {which} ({model})", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="memfit-dist-bench-"))
    t_start = time.time()
    try:
        cluster = Cluster(model, workdir)
    except BaseException:
        print(f"logs kept in {workdir}", file=sys.stderr)
        raise
    print(
        f"cluster up in {time.time() - t_start:.1f} s: 1 worker, {len(cluster.clients)} replicas, redis {cluster.url}"
    )
    watch = Watcher(
        [httpx.Client(base_url=str(c.base_url), timeout=30) for c in cluster.clients], cluster.store
    )
    res: dict = {"model": which, "model_dir": str(model), "cpu_count": os.cpu_count()}
    try:
        facts = invented_facts(2 * args.burst + 1, seed=123)
        n = args.burst
        res["one_fact"] = one_fact(cluster, watch, facts[0])
        res["burst_single_ingests"] = burst(cluster, watch, facts[1 : 1 + n])  # single-document ingests
        res["one_request_of_batch"], top = one_request(cluster, watch, facts[1 + n : 1 + 2 * n])
        res["rollback_to_other_replica_s"] = rollbacks(cluster, watch, top)  # through replica 0
    finally:
        watch.stop()
        cluster.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}")
    print(json.dumps(res, indent=2))
    print()
    print_table(res)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


def ingest_once(cluster: Cluster, watch: Watcher, docs: list[dict]) -> tuple[dict, float, float]:
    """One POST /ingest of `docs` through replica 0: (the finished job, when it was posted, when the
    last replica first served its version)."""
    a = cluster.clients[0]
    t0 = time.time()
    job_id = a.post("/ingest", json={"documents": docs}).json()["job_id"]
    (job,) = wait_jobs(a, [job_id])
    return job, t0, max(watch.served_at(job["version"], t0))


def one_fact(cluster: Cluster, watch: Watcher, fact: dict) -> dict:
    """One fact: POST /ingest -> its version served by both replicas, and the fact asked on each."""
    job, t0, last_served = ingest_once(cluster, watch, docs_for([fact], "one"))
    answers = [ask(c, fact["question"])["text"] for c in cluster.clients]
    return {
        "ingest_to_all_replicas_s": round(last_served - t0, 3),
        "job_total_s": job["timings"].get("total"),
        "training_s": job["timings"].get("training"),
        "evaluation_s": job["timings"].get("evaluation"),
        "answered_on_replicas": [fact["answer"].lower() in t.lower() for t in answers],
        "publish_to_last_replica_s": round(last_served - activation_time(cluster.store, job["version"]), 4),
    }


def one_request(cluster: Cluster, watch: Watcher, facts: list[dict]) -> tuple[dict, int]:
    """One request of many documents -> its version on both replicas: (the figures, the version)."""
    docs = docs_for(facts, "batch")
    job, t0, last_served = ingest_once(cluster, watch, docs)
    hits = sum(f["answer"].lower() in ask(cluster.clients[0], f["question"])["text"].lower() for f in facts)
    return {
        "documents": len(docs),
        "ingest_to_all_replicas_s": round(last_served - t0, 3),
        "job_total_s": job["timings"].get("total"),
        "answered_after": f"{hits}/{len(docs)}",
        "publish_to_last_replica_s": round(last_served - activation_time(cluster.store, job["version"]), 4),
    }, job["version"]


def burst(cluster: Cluster, watch: Watcher, facts: list[dict]) -> dict:
    """One single-document ingest per fact, back to back -> the last job's version on every replica."""
    a = cluster.clients[0]
    docs = docs_for(facts, "burst")
    t0 = time.time()
    ids = [a.post("/ingest", json={"documents": [d]}).json()["job_id"] for d in docs]
    t_sent = time.time() - t0
    jobs = wait_jobs(a, ids)
    last_v = max(j["version"] for j in jobs if j["version"] is not None)
    served = watch.served_at(last_v, t0)
    versions = sorted({j["version"] for j in jobs})
    hits = sum(f["answer"].lower() in ask(a, f["question"])["text"].lower() for f in facts)
    return {
        "documents": len(docs),
        "posting_s": round(t_sent, 3),
        "ingest_to_all_replicas_s": round(max(served) - t0, 3),
        "versions": len(versions),
        "statuses": sorted({j["status"] for j in jobs}),
        "answered_after": f"{hits}/{len(docs)}",
        "publish_to_last_replica_s": round(max(served) - activation_time(cluster.store, last_v), 4),
    }


def rollbacks(cluster: Cluster, watch: Watcher, top: int, n: int = 10) -> dict:
    """Activations through replica 0, alternately top - 1 and top: ACTIVE flip -> replica 1 serving."""
    samples = []
    for k in range(n):
        target = top - 1 if k % 2 == 0 else top
        r = cluster.clients[0].post(f"/versions/{target}/activate", json={"why": "benchmark"})
        r.raise_for_status()
        t_flip = activation_time(cluster.store, target)
        other = watch.served_at(target, t_flip)[1]
        samples.append(other - t_flip)
    return {"median": round(statistics.median(samples), 4), "max": round(max(samples), 4), "n": len(samples)}


def print_table(res: dict) -> None:
    print(f"{'measure':50s} {'seconds':>10s}")
    o = res["one_fact"]
    print(f"{'one fact: ingest -> both replicas serve it':50s} {o['ingest_to_all_replicas_s']:>10.3f}")
    print(f"{'  of which the job (train + evaluate + publish)':50s} {o['job_total_s']:>10.3f}")
    print(f"{'  publish -> last replica serving':50s} {o['publish_to_last_replica_s']:>10.4f}")
    b = res["burst_single_ingests"]
    label = f"{b['documents']} single ingests -> both replicas serve all"
    print(
        f"{label:50s} {b['ingest_to_all_replicas_s']:>10.3f}   ({b['versions']} versions, answered {b['answered_after']})"
    )
    c = res["one_request_of_batch"]
    label = f"one request of {c['documents']} docs -> both replicas"
    print(f"{label:50s} {c['ingest_to_all_replicas_s']:>10.3f}   (answered {c['answered_after']})")
    print(f"{'  publish -> last replica serving':50s} {c['publish_to_last_replica_s']:>10.4f}")
    r = res["rollback_to_other_replica_s"]
    print(
        f"{'rollback on replica 0 -> replica 1 serves (median)':50s} {r['median']:>10.4f}   (max {r['max']})"
    )


if __name__ == "__main__":
    sys.exit(main())
