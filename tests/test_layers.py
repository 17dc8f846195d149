"""Dependencies point one way (docs/design.md "Layers"):

    memlm  <-  memfit.config, memfit.logs  <-  model_store  <-  workers  <-  service  <-  memfit.bench
           <-  memfit (the command line)

Every module of these packages is parsed (nothing is imported), and every import in it counts: at
module level, inside functions, under `if TYPE_CHECKING:`, relative ones (`from . import x`,
`from ..store import Store`) resolved against the module's package, and `importlib.import_module`
of a literal name. An import of a module of a higher
layer fails the test, named as `file:line: from-layer -> to-layer (module)`. Imports of other
distributions (torch, fastapi, ...) are not this test's business (tests/test_imports.py).

A second test keeps the `MEMFIT_*` environment read only where memfit/config.py's docstring says.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

from tests.conftest import ROOT

# (layer, module prefixes), lowest first; a module belongs to the layer of its longest matching prefix
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("memlm", ("memlm",)),
    ("config", ("memfit.config", "memfit.logs")),
    ("model_store", ("model_store",)),
    ("workers", ("workers",)),
    ("service", ("service",)),
    ("bench", ("memfit.bench",)),
    ("cli", ("memfit",)),
]
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}
PACKAGES = ("memlm", "model_store", "workers", "service", "memfit")


def layer_of(module: str) -> str | None:
    best: tuple[int, str] | None = None
    for name, prefixes in LAYERS:
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[0]):
                best = (len(p), name)
    return best[1] if best else None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative imports resolved; for
    `from pkg import name` the submodule `pkg.name` when there is one (`from memfit import config`),
    else `pkg`."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            for a in node.names:
                sub = ROOT.joinpath(*f"{target}.{a.name}".split("."))
                is_module = sub.with_suffix(".py").exists() or (sub / "__init__.py").exists()
                out.append((node.lineno, f"{target}.{a.name}" if is_module else target))
        elif (  # importlib.import_module("workers.distributed"): an import all the same
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and not node.args[0].value.startswith(".")
        ):
            out.append((node.lineno, node.args[0].value))
    return out


def source_files() -> list[Path]:
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def upward_imports(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        here = layer_of(module_name(path))
        assert here is not None, f"{path} is in no layer: add its package to LAYERS"
        seen: set[tuple[int, str]] = set()
        for line, target in imported_modules(path):
            there = layer_of(target)
            if there is None or RANK[there] <= RANK[here] or (line, there) in seen:
                continue
            seen.add((line, there))
            found.append(f"{path.relative_to(ROOT)}:{line}: {here} -> {there} ({target})")
    return found


def test_every_module_is_in_a_layer():
    for path in source_files():
        assert layer_of(module_name(path)) is not None, path


def test_layers_import_only_downwards():
    bad = upward_imports(source_files())
    assert not bad, (
        "imports up the layers (memlm <- config <- model_store <- workers <- service <- cli):\n"
        + ("\n".join(bad))
    )


def scratch_tree(tmp_path: Path, monkeypatch, files: dict[str, str]) -> list[Path]:
    """`files` ({relative path: text}) written under tmp_path, which becomes the ROOT the checks read."""
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    return [tmp_path / rel for rel in files]


def test_an_upward_import_is_caught(tmp_path, monkeypatch):
    """The check itself, on a scratch tree: a function-level import in workers/, a module-level one
    under TYPE_CHECKING in model_store/ and a relative one in memfit/bench/ are each reported with
    file, line and layers; downward and same-layer imports are not."""
    files = {
        "workers/probe.py": (
            "import model_store\n\ndef f():\n    from service.errors import ApiError\n"
            "    return importlib.import_module('service.app')\n"
        ),
        "model_store/probe.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import workers.pipeline\n",
        "memfit/bench/probe.py": "from ..config import Settings\nfrom . import other\nfrom ..commands import serve\n",
        "memfit/commands/serve.py": "",
        "memfit/config.py": "",
    }
    probes = [p for p in scratch_tree(tmp_path, monkeypatch, files) if p.name == "probe.py"]
    assert upward_imports(probes) == [
        "workers/probe.py:4: workers -> service (service.errors)",
        "workers/probe.py:5: workers -> service (service.app)",
        "model_store/probe.py:3: model_store -> workers (workers.pipeline)",
        "memfit/bench/probe.py:3: bench -> cli (memfit.commands.serve)",
    ]


# `MEMFIT_*` variables read outside memfit/config.py, and where (memfit/config.py's docstring says why)
ENV_READ = re.compile(r"""(?:environ(?:\.get)?\s*[\[(]|getenv\s*\()\s*["'](MEMFIT_[A-Z0-9_]+)["']""")
ALLOWED_ENV_READS = {
    ("memlm/paths.py", "MEMFIT_HOME"),
    ("memfit/commands/ingest.py", "MEMFIT_URL"),
    ("memfit/commands/ingest.py", "MEMFIT_API_KEY"),
    ("memfit/commands/store_ops.py", "MEMFIT_STORE"),
    ("memfit/commands/store_ops.py", "MEMFIT_REDIS_URL"),
    ("memfit/commands/store_ops.py", "MEMFIT_API_KEY"),
    ("memfit/bench/serve.py", "MEMFIT_BENCH_THREADS"),
    # set by `memfit pretrain` for its own child process (the build with glibc's allocator settings)
    ("memfit/commands/pretrain.py", "MEMFIT_PRETRAIN_IN_PROCESS"),
}


def test_memfit_env_is_read_through_settings():
    reads = set()
    for path in source_files():
        rel = str(path.relative_to(ROOT))
        if rel == "memfit/config.py":
            continue
        reads |= {(rel, var) for var in ENV_READ.findall(path.read_text())}
    assert reads <= ALLOWED_ENV_READS, f"MEMFIT_* read outside Settings: {sorted(reads - ALLOWED_ENV_READS)}"
    assert ALLOWED_ENV_READS <= reads, (
        f"no longer read (drop from the list): {sorted(ALLOWED_ENV_READS - reads)}"
    )


def import_cycles(paths: list[Path]) -> list[list[str]]:
    """The groups of modules (among `paths`) that import each other in a circle, any import counted
    (a function-level import closes a loop as much as a module-level one)."""
    modules = {module_name(p): p for p in paths}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m, p in modules.items():
        for _, target in imported_modules(p):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != m:
                graph[m].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles_above_the_core():
    """Inside a layer too, modules depend one way: model_store, workers, service and memfit have no
    import loop (the Celery app, its task and the dispatcher were one: workers/distributed.py)."""
    paths = [p for p in source_files() if not module_name(p).startswith("memlm")]
    assert import_cycles(paths) == []


def test_an_import_cycle_is_caught(tmp_path, monkeypatch):
    """The check itself: the Celery loop as it was (celery_app <-> tasks <-> distributed, most arrows
    inside functions, one relative) is one group; a module the loop imports is not in it."""
    files = {
        "workers/__init__.py": "",
        "workers/celery_app.py": "def create_app():\n    from workers import tasks\n",
        "workers/tasks.py": (
            "def register():\n    from .celery_app import soft_limit_s\n"
            "def update():\n    from workers.distributed import worker_runtime\n"
        ),
        "workers/distributed.py": "from workers.tasks import UPDATE_TASK\nfrom . import events\n",
        "workers/events.py": "import logging\n",
    }
    assert import_cycles(scratch_tree(tmp_path, monkeypatch, files)) == [
        ["workers.celery_app", "workers.distributed", "workers.tasks"]
    ]
