"""`memfit bench NAME` dispatches to memfit/bench/, the one place the benchmark code lives."""

import importlib

from memfit.cli import build_parser
from memfit.commands.bench import BENCHMARKS
from tests.conftest import ROOT


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
