"""Write requirements.lock: the exact versions of memfit's dependency closure, as this virtualenv has them.

    .venv/bin/python tools/lock.py          # (re)write requirements.lock   (make lock)
    .venv/bin/python tools/lock.py --check  # exit 1 when the file is not what this venv would write

Two sections. The runtime closure starts from pyproject's `dependencies` plus the `pretrain` extra
(what the image runs: `memfit serve`, `memfit worker`, `memfit pretrain`); the suite's section adds
what the `bench` and `dev` extras bring on top (the benchmarks' baselines and the test tools). Each
follows the installed distributions' requirements (markers evaluated for this interpreter, extras as
requested), like `pip freeze` restricted to what memfit needs. torch is left out with the packages only
it needs: the Dockerfile and the Makefile install it first, from the wheel index that `TORCH` /
`TORCH_INDEX` name (CPU or CUDA builds). The result is pip-tools style (`name==version` with `# via`
lines) and is used as a constraints file (`pip install -c requirements.lock ...`): the image installs
`.[pretrain]`, so only the runtime section applies to it and two builds resolve the same versions;
`make install` installs `.[dev]`, so the suite runs on exactly the versions pinned here, which are
pyproject's floors (tests/test_packaging.py). Generated on Linux x86_64 for Python 3.11.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
RUNTIME_EXTRAS = ("pretrain",)  # what the image installs with the dependencies
SUITE_EXTRAS = ("bench", "dev")  # what `make install` adds for the benchmarks and the tests
EXCLUDED = {"torch"}  # installed from its own index before the lock applies
HEADER = """\
# requirements.lock: exact versions of memfit's dependency closure (torch excluded: it is installed
# first from TORCH / TORCH_INDEX). A constraints file: `pip install -c requirements.lock ...`. The image
# installs ".[pretrain]" and so takes the runtime section only; `make install` (".[dev]") takes both,
# so the suite runs on these versions, which are pyproject's floors. Linux x86_64, Python 3.11.
# Regenerate after changing pyproject's dependencies: make lock (tools/lock.py); a test checks it.
"""
RUNTIME_HEADER = "# ---- runtime: the dependencies and the pretrain extra (the image, memfit serve / worker)"
SUITE_HEADER = "# ---- the suite: what the bench and dev extras add (make install; not in the image)"


def roots(extras: tuple[str, ...]) -> list[Requirement]:
    """pyproject's dependencies and `extras`, memfit's references to its own extras expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for raw in optional[extra]:
            req = Requirement(raw)
            if canonicalize_name(req.name) == "memfit":  # e.g. dev's "memfit[bench,pretrain]"
                todo += sorted(req.extras)
            else:
                reqs.append(req)
    return reqs


def _applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": e}) for e in extras | {""})


def closure(extras: tuple[str, ...]) -> dict[str, tuple[str, str, set[str]]]:
    """canonical name -> (distribution name, installed version, names that require it)."""
    found: dict[str, tuple[str, str, set[str]]] = {}
    requested: dict[str, set[str]] = {}
    todo: list[tuple[Requirement, str]] = [(r, "memfit") for r in roots(extras) if _applies(r, set())]
    while todo:
        req, parent = todo.pop()
        name = canonicalize_name(req.name)
        if name in EXCLUDED:
            continue
        extras = set(req.extras)
        if name in found:
            found[name][2].add(parent)
            if extras <= requested[name]:
                continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(
                f"tools/lock.py: {req.name} (needed by {parent}) is not installed in this venv"
            ) from None
        if name not in found:
            found[name] = (dist.metadata["Name"], dist.version, {parent})
            requested[name] = set()
        requested[name] |= extras
        for raw in dist.requires or []:  # rescanned whenever more extras are asked for: it terminates
            sub = Requirement(raw)
            if _applies(sub, requested[name]):
                todo.append((sub, found[name][0]))
    return found


def render() -> str:
    runtime = closure(RUNTIME_EXTRAS)
    suite = closure(RUNTIME_EXTRAS + SUITE_EXTRAS)
    lines = [HEADER, RUNTIME_HEADER]
    for section in (runtime, {k: v for k, v in suite.items() if k not in runtime}):
        for _, (dist, version, parents) in sorted(section.items()):
            lines.append(f"{dist}=={version}")
            for p in sorted(parents, key=str.lower):
                lines.append(f"    # via {p}")
        if section is runtime:
            lines += ["", SUITE_HEADER]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 when requirements.lock is stale")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if not LOCK.exists() or LOCK.read_text() != text:
            print("requirements.lock is stale: run `make lock` (tools/lock.py)", file=sys.stderr)
            return 1
        return 0
    LOCK.write_text(text)
    print(f"wrote {LOCK} ({sum(1 for line in text.splitlines() if '==' in line)} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
