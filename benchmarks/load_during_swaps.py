"""/generate under load while versions are published and rolled back every second.

Starts `memfit serve` (tiny preset from the test cache unless --model) on a fresh store in a temporary
directory, then runs tests/faults/loadswap.py: --clients threads (default 32) send /generate
(--max-new-tokens, default 32, greedy; every third request streams) for --duration seconds (default
60) while a new synthetic version is published into the store and activated through the replica, then
rolled back, every --swap-every seconds. Prints requests, failures, responses whose version was not
active during their request, latency p50/p95/max, streaming time to first token, and the swaps.

    .venv/bin/python benchmarks/load_during_swaps.py [--clients 32] [--duration 60] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tiny_model() -> Path:
    from _models import tiny_model as find_tiny

    return find_tiny()[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--swap-every", type=float, default=1.0)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from model_store import Store
    from tests.faults.loadswap import run_load, summary
    from tests.service.conftest import ServerProcess

    model = args.model or tiny_model()
    with tempfile.TemporaryDirectory(prefix="memfit-load-") as tmp:
        store = Path(tmp) / "store"
        Store.init(store, model)
        server = ServerProcess(model, store, Path(tmp), {"OMP_NUM_THREADS": "1"}).start()
        try:
            res = run_load(
                server.url,
                store,
                clients=args.clients,
                duration_s=args.duration,
                max_new_tokens=args.max_new_tokens,
                swap_every_s=args.swap_every,
            )
        finally:
            server.kill()
    print(summary(res))
    for line in (res.failures + res.wrong_version)[:10]:
        print("  ", line)
    if args.out:
        args.out.write_text(
            json.dumps({"clients": args.clients, "duration_s": args.duration, **res.figures()}, indent=2)
        )
    return 1 if res.failures or res.wrong_version else 0


if __name__ == "__main__":
    sys.exit(main())
