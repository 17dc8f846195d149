"""`memfit bench NAME` dispatches to memfit/bench/, the one place the benchmark code lives."""

import importlib

from memfit.cli import build_parser
from memfit.commands.bench import BENCHMARKS
from tests.conftest import ROOT, python_c


def test_every_bench_name_dispatches_to_a_module_of_memfit_bench():
    sub = next(a for a in build_parser()._subparsers._group_actions if a.dest == "command")
    names = set(next(a for a in sub.choices["bench"]._actions if a.dest == "which").choices)
    assert names == set(BENCHMARKS)
    for name, module in BENCHMARKS.items():
        assert module.startswith("memfit.bench."), (name, module)
        assert callable(importlib.import_module(module).run), module


def test_no_benchmark_module_inside_the_library_packages():
    stray = [
        str(p.relative_to(ROOT))
        for pkg in ("memlm", "model_store", "workers", "service")
        for p in (ROOT / pkg).rglob("*.py")
        if p.stem.startswith("bench") or p.stem == "baselines"
    ]
    assert not stray, f"benchmark code belongs in memfit/bench/: {stray}"


def test_bench_modules_import_without_the_bench_extra():
    """peft, rank_bm25 and matplotlib load only where a baseline or a plot needs them, so `memfit bench
    update|serve|swap` run on the runtime install."""
    code = (
        "import sys\n"
        "for m in ('peft', 'rank_bm25', 'matplotlib'):\n"
        "    sys.modules[m] = None  # as if memfit[bench] were not installed\n"
        "import memfit.bench.continual, memfit.bench.update, memfit.bench.serve, memfit.bench.swap\n"
    )
    res = python_c(code)
    assert res.returncode == 0, res.stderr[-2000:]
