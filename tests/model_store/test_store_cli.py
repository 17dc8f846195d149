from __future__ import annotations

from memfit.cli import main


def test_operator_commands_on_a_store(h, store, capsys, monkeypatch):
    store.jobs.create_job("j1", [{"id": "a", "text": "A"}], {})
    v1 = h.publish_update(store, {1: [1, 2]}, seed=1, docs=["a"], job_id="j1")
    v2 = h.publish_update(store, {1: [5]}, seed=2, docs=["b"])
    s = ["--store", str(store.root)]
    assert main(["versions", *s]) == 0
    out = capsys.readouterr().out
    assert "* 2" in out and "retained" in out
    assert main(["jobs", *s]) == 0 and "j1" in capsys.readouterr().out
    assert main(["rollback", str(v1), *s]) == 0 and store.active() == v1
    assert main(["rollback", "99", *s]) == 1 and "version 99" in capsys.readouterr().err
    assert main(["diff", str(v1), str(v2), *s]) == 0 and "documents added  : b" in capsys.readouterr().out
    assert main(["revert", "--document", "a", *s]) == 0 and store.manifest(store.active())["reverts"] == v1
    assert main(["revert", "--version", str(v1), *s]) == 1  # not in the active chain any more
    assert main(["verify", *s]) == 0 and capsys.readouterr().out.rstrip().endswith("OK")
    monkeypatch.setitem(__import__("sys").modules, "workers.operations", None)  # import fails
    assert main(["replay", "--onto", str(store.base_dir), *s]) == 2
    assert "workers.operations" in capsys.readouterr().err
