"""`memfit serve` and `memfit worker` build their Settings one way (memfit.commands.settings_from_args):
the environment, with the options given on the command line on top."""

from __future__ import annotations

from pathlib import Path

from memfit.cli import build_parser
from memfit.commands import settings_from_args


def test_given_options_win_and_absent_ones_stay_unset(monkeypatch, tmp_path):
    for var in ("MEMFIT_MODEL", "MEMFIT_STORE", "MEMFIT_HOST", "MEMFIT_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MEMFIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MEMFIT_PORT", "9000")

    serve = settings_from_args(build_parser().parse_args(["serve", "--model", "~/m", "--host", "0.0.0.0"]))
    assert serve.model == tmp_path / "m" and serve.host == "0.0.0.0" and serve.port == 9000
    assert serve.store == tmp_path / "home" / "store"
    assert "model" in serve.model_fields_set and "store" not in serve.model_fields_set

    worker = settings_from_args(build_parser().parse_args(["worker", "--store", "~/s"]))
    assert worker.store == tmp_path / "s" and worker.model == tmp_path / "home" / "models" / "default"
    assert "model" not in worker.model_fields_set and isinstance(worker.store, Path)
