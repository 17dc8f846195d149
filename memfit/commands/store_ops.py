"""Operator commands: `memfit jobs | versions | rollback | revert | diff | verify | replay`.

Without `--url` they act on the store directly (`--store`, default $MEMFIT_STORE or the user data
dir; a running server follows the store's ACTIVE pointer within a second). With `--url` they call the
server's HTTP API (`Authorization: Bearer KEY` from --api-key or $MEMFIT_API_KEY).
`revert --document` (when not exact) and `replay` retrain: they call workers.operations.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def _store_dir(args) -> Path:
    if args.store:
        return Path(args.store).expanduser()
    if os.environ.get("MEMFIT_STORE"):
        return Path(os.environ["MEMFIT_STORE"]).expanduser()
    from memlm.paths import default_store_dir

    return default_store_dir()


def _open_store(args):
    from model_store import Store, StoreNotFoundError

    path = _store_dir(args)
    try:
        # in the distributed mode the writer lock lives in Redis: operator writes exclude workers too
        return Store.open(path, os.environ.get("MEMFIT_REDIS_URL") or None)
    except StoreNotFoundError as e:
        _err(f"{e} (pass --store, set MEMFIT_STORE, or create one with `memfit serve --model DIR`)")
        raise SystemExit(2) from e


def _who() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return "cli"


def _when(t: float | None) -> str:
    if not t:
        return "-"
    return _dt.datetime.fromtimestamp(float(t)).strftime("%Y-%m-%d %H:%M:%S")


def _short(items: list[Any] | None, n: int = 3) -> str:
    items = list(items or [])
    s = ",".join(map(str, items[:n]))
    return s + (f",+{len(items) - n}" if len(items) > n else "") if items else "-"


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [[str(c) for c in header]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- HTTP ------------------------------------------------------------------------------------------
def _http(args, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    import httpx

    key = args.api_key or os.environ.get("MEMFIT_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = args.url.rstrip("/") + path
    try:
        r = httpx.request(method, url, json=body, headers=headers, timeout=60.0)
    except httpx.HTTPError as e:
        _err(f"{method} {url}: {e}")
        raise SystemExit(1) from e
    if r.status_code >= 400:
        try:
            detail = r.json().get("error", {}).get("message") or r.text
        except ValueError:
            detail = r.text
        _err(f"{method} {path} -> {r.status_code}: {detail}")
        raise SystemExit(1)
    return r.json()


# -- printing --------------------------------------------------------------------------------------
def _print_jobs(jobs: list[dict[str, Any]]) -> None:
    rows = [
        [
            j.get("job_id"),
            j.get("status"),
            j.get("version"),
            j.get("parent"),
            _short(j.get("documents")),
            _when(j.get("created_at")),
            (j.get("error") or "")[:60],
        ]
        for j in jobs
    ]
    print(
        table(rows, ["job", "status", "version", "parent", "documents", "created", "error"])
        if rows
        else "no jobs"
    )


def _print_versions(versions: list[dict[str, Any]]) -> None:
    rows = []
    for m in sorted(versions, key=lambda m: m["id"], reverse=True):
        sc = m.get("slots_changed")
        slots = sc.get("total") if isinstance(sc, dict) else sc
        label = m.get("kind") or ""
        if m.get("reverts") is not None:
            label = f"revert of {m['reverts']}"
        rows.append(
            [
                ("* " if m.get("active") else "  ") + str(m["id"]),
                m.get("parent"),
                m.get("state"),
                label,
                slots,
                _short(m.get("documents")),
                m.get("job_id"),
                _when(m.get("created_at")),
            ]
        )
    print(table(rows, ["  id", "parent", "state", "kind", "slots", "documents", "job", "created"]))


# -- commands --------------------------------------------------------------------------------------
def cmd_jobs(args) -> int:
    if args.url:
        data = _http(args, "GET", "/jobs")
        _print_jobs(data.get("jobs", data) if isinstance(data, dict) else data)
        return 0
    store = _open_store(args)
    _print_jobs([j.to_dict() for j in store.jobs.list(50)])
    return 0


def cmd_versions(args) -> int:
    if args.url:
        data = _http(args, "GET", "/versions")
        _print_versions(data["versions"])
        return 0
    store = _open_store(args)
    _print_versions(store.versions())
    return 0


def cmd_rollback(args) -> int:
    if args.url:
        r = _http(args, "POST", f"/versions/{args.version}/activate", {"why": args.why})
        print(f"active version: {r.get('to', r.get('active', args.version))} (server)")
        return 0
    from model_store import StoreError

    store = _open_store(args)
    try:
        r = store.activate(args.version, who=_who(), why=args.why)
    except StoreError as e:
        _err(str(e))
        return 1
    print(f"active version: {r['from']} -> {r['to']}")
    return 0


def _pipeline(name: str):
    try:
        mod = importlib.import_module("workers.operations")
        return getattr(mod, name)
    except (ImportError, AttributeError) as e:
        _err(f"this needs retraining, but workers.operations.{name} is not available ({e})")
        raise SystemExit(2) from e


def cmd_revert(args) -> int:
    from model_store import NeedsRetrain, StoreError

    if args.url:
        if args.document is not None:
            r = _http(args, "POST", f"/documents/{args.document}/revert", {})
        else:
            r = _http(args, "POST", f"/versions/{args.version}/revert", {})
        print(json.dumps(r, indent=2))
        return 0
    store = _open_store(args)
    try:
        if args.version is not None:
            v = store.revert(
                args.version, who=_who(), why=f"revert version {args.version} from the command line"
            )
            print(f"published version {v} (reverts {args.version}); active: {store.active()}")
            return 0
        try:
            new = store.revert_document(args.document, who=_who())
            print(
                f"document {args.document} reverted exactly: new version(s) {new}; active: {store.active()}"
            )
            return 0
        except NeedsRetrain as e:
            print(f"{e}; retraining version {e.version}'s batch without it")
            result = _pipeline("revert_document")(store, args.document)
            print(f"result: {result}; active: {store.active()}")
            return 0
    except StoreError as e:
        _err(str(e))
        return 1


def cmd_diff(args) -> int:
    if args.url:
        _err("diff reads the store's deltas: run it without --url on a machine that mounts the store")
        return 2
    store = _open_store(args)
    d = store.diff(args.a, args.b, exact=True)
    print(f"{args.a} -> {args.b} via common ancestor {d['ancestor']}")
    print(f"  versions undone : {d['versions_removed'] or '-'}")
    print(f"  versions applied: {d['versions_added'] or '-'}")
    rows = [[layer, len(s), _short(s, 10)] for layer, s in d["layers"].items()]
    print(table(rows, ["layer", "slots", "first slots"]) if rows else "  no slot differs")
    print(f"  documents added  : {_short(d['documents_added'], 10)}")
    print(f"  documents removed: {_short(d['documents_removed'], 10)}")
    return 0


def cmd_verify(args) -> int:
    if args.url:
        _err("verify checks files on disk: run it without --url on a machine that mounts the store")
        return 2
    store = _open_store(args)
    rep = store.verify()
    bad = {v: s for v, s in rep["versions"].items() if s != "ok"}
    print(f"store {store.root}: active {rep['active']}, chain {_short(rep['active_chain'], 8)}")
    print(f"  base: {rep['base']}")
    print(f"  versions: {len(rep['versions'])} checked, {len(bad)} damaged")
    for v, s in bad.items():
        print(f"    {v}: {s}")
    snaps_bad = [v for v, s in rep["snapshots"].items() if s != "ok"]
    print(f"  snapshots: {len(rep['snapshots'])}, {len(snaps_bad)} damaged {snaps_bad or ''}".rstrip())
    if rep["log_bad_lines"]:
        print(f"  log: {rep['log_bad_lines']} unreadable lines skipped (a crash mid-append)")
    for w in rep["warnings"]:
        print(f"  warning: {w}")
    for p in rep["problems"]:
        print(f"  PROBLEM: {p}")
    print("OK" if rep["ok"] else "FAILED")
    return 0 if rep["ok"] else 1


def cmd_replay(args) -> int:
    if args.url:
        _err("replay builds a new store from this one: run it without --url")
        return 2
    store = _open_store(args)
    onto = Path(args.onto).expanduser()
    out = Path(args.out).expanduser() if args.out else store.root.with_name(store.root.name + "-replayed")
    docs = store.active_chain_documents()
    print(f"replaying {len(docs)} documents of active version {store.active()} onto {onto} -> {out}")
    result = _pipeline("replay")(store, onto, out)
    print(f"result: {result}")
    return 0


COMMANDS = {
    "jobs": cmd_jobs,
    "versions": cmd_versions,
    "rollback": cmd_rollback,
    "revert": cmd_revert,
    "diff": cmd_diff,
    "verify": cmd_verify,
    "replay": cmd_replay,
}


def run(args) -> int:
    try:
        return COMMANDS[args.command](args)
    except SystemExit as e:  # raised by helpers with a printed message; return it as the exit code
        return e.code if isinstance(e.code, int) else 1
