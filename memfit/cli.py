"""`memfit` console script.

The parser is declared here; each subcommand's work lives in `memfit/commands/<name>.py` as
`run(args) -> int` and is imported only when that subcommand runs, so `memfit pretrain` never loads
the web stack and `memfit serve` never loads the benchmark code.
"""

from __future__ import annotations

import argparse
import importlib
import sys


def _add_store(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store", default=None, help="store directory (default $MEMFIT_STORE or the user data dir)"
    )
    p.add_argument("--url", default=None, help="act through a running server instead of on the store")
    p.add_argument("--api-key", default=None, help="API key for --url (default $MEMFIT_API_KEY)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memfit", description="Online knowledge updates for memory-layer LLMs"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_pretrain(sub)
    _add_retrofit(sub)
    _add_background(sub)
    _add_servers(sub)
    _add_ingest(sub)
    _add_store_ops(sub)
    _add_bench(sub)
    return parser


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="build a tokenizer and a memory-layer model from the offline corpus")
    p.add_argument("--preset", choices=["tiny", "default"], default="default")
    p.add_argument("--out", default=None, help="output directory (default: user data dir/models/PRESET)")
    p.add_argument("--force", action="store_true", help="rebuild even if the model exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override one preset field (repeatable; VALUE is JSON, e.g. --set memory_size=262144)",
    )


def _add_retrofit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "retrofit", help="add memory layers to a local Hugging Face model (Llama, Qwen2, GPT-2)"
    )
    p.add_argument("--from", dest="source", required=True, metavar="HF_DIR", help="local model directory")
    p.add_argument("--out", required=True, metavar="DIR", help="where the retrofitted model is written")
    p.add_argument("--layers", default=None, help="comma-separated block indices (default: the middle one)")
    p.add_argument("--mode", choices=["parallel", "replace"], default="parallel")
    p.add_argument("--slots", type=int, default=16384, help="memory slots per layer (a perfect square)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--key-dim", type=int, default=128)
    p.add_argument("--no-gate", action="store_true", help="no Memory+ gate")
    p.add_argument(
        "--warmup-texts", default=None, metavar="FILE", help="generic text to warm the memory up on"
    )
    p.add_argument(
        "--background-texts",
        default=None,
        metavar="FILE",
        help="generic text for the background statistics (default: --warmup-texts, else built-in text)",
    )
    p.add_argument(
        "--probe-facts",
        default=None,
        metavar="FILE",
        help='JSONL of known facts ({"question", "answer"} per line) for the probe set',
    )
    p.add_argument(
        "--max-shard-size",
        default=None,
        help="largest weights file written, e.g. 2GB (default: transformers')",
    )
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--warmup-lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")


def _add_background(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("background", help="compute background slot statistics (the IDF side)")
    p.add_argument("--model", default=None)
    p.add_argument("--to-redis", default=None, metavar="URL", help="also store them in Redis")
    p.add_argument("--unit", choices=["batch", "sequence"], default=None, help="document unit for df")
    p.add_argument(
        "--served-facts",
        type=int,
        default=None,
        metavar="N",
        help="served-format prompts counted in the background (default: the model's preset value)",
    )


def _add_servers(sub: argparse._SubParsersAction) -> None:
    """`serve` (the API) and `worker` (distributed mode's Celery worker)."""
    p = sub.add_parser("serve", help="run the API (embedded mode unless MEMFIT_REDIS_URL is set)")
    p.add_argument("--model", default=None)
    p.add_argument("--store", default=None)
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--insecure", action="store_true", help="allow binding beyond localhost without API keys")

    p = sub.add_parser("worker", help="run a Celery worker (distributed mode)")
    p.add_argument("--model", default=None)
    p.add_argument("--store", default=None)
    p.add_argument("--concurrency", type=int, default=1)


def _add_ingest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="send documents to a server and follow the job")
    p.add_argument("files", nargs="+", help="JSONL of document objects, plain text files, or - for stdin")
    p.add_argument("--url", default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--store", default=None, help="without --url: queue the job on this store directly")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("--top-t", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)


def _add_store_ops(sub: argparse._SubParsersAction) -> None:
    """The operator commands of memfit/commands/store_ops.py, on a store or through --url."""
    p = sub.add_parser("jobs", help="list recent jobs")
    _add_store(p)
    p = sub.add_parser("versions", help="list versions")
    _add_store(p)
    p = sub.add_parser("rollback", help="activate a retained version")
    p.add_argument("version", type=int)
    p.add_argument("--why", default="rollback from the command line")
    _add_store(p)
    p = sub.add_parser("revert", help="revert a version or a document")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--document", default=None)
    g.add_argument("--version", type=int, default=None)
    _add_store(p)
    p = sub.add_parser("diff", help="slots and documents between two versions")
    p.add_argument("a", type=int)
    p.add_argument("b", type=int)
    _add_store(p)
    p = sub.add_parser("verify", help="check every version's checksums and the active chain")
    _add_store(p)
    p = sub.add_parser("replay", help="re-apply the active chain's documents onto a new base model")
    p.add_argument("--onto", required=True, help="new base model directory")
    p.add_argument("--out", default=None, help="new store directory (default: STORE-replayed)")
    _add_store(p)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: print a table, write JSON (+ PNG)")
    p.add_argument("which", choices=["continual", "update", "serve", "swap"])
    p.add_argument("--quick", action="store_true", help="minutes, CI smoke (tiny model if no default)")
    p.add_argument("--small", action="store_true", help="continual: default model, short streams (~5 min)")
    p.add_argument("--out", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument(
        "--report", action="store_true",
        help="continual: train nothing; write results from progress.json (a stream in flight as of its last checkpoint)",
    )  # fmt: skip
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=JSON",
        help="continual: override a BenchConfig field, e.g. --set 'sparse_lr=[1000]' (recorded in results.json)",
    )  # fmt: skip


COMMAND_MODULES = {
    "pretrain": "memfit.commands.pretrain",
    "retrofit": "memfit.commands.retrofit",
    "background": "memfit.commands.background",
    "serve": "memfit.commands.serve",
    "worker": "memfit.commands.worker",
    "ingest": "memfit.commands.ingest",
    "jobs": "memfit.commands.store_ops",
    "versions": "memfit.commands.store_ops",
    "rollback": "memfit.commands.store_ops",
    "revert": "memfit.commands.store_ops",
    "diff": "memfit.commands.store_ops",
    "verify": "memfit.commands.store_ops",
    "replay": "memfit.commands.store_ops",
    "bench": "memfit.commands.bench",
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(COMMAND_MODULES[args.command])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
