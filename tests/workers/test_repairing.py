"""Repair in the service (workers/repairing.py, memlm.repair): with MEMFIT_UPDATE_REPAIR every update
checks the facts earlier versions taught that read a row it wrote, and trains the lost ones again beside
its own documents; the version published is both updates composed. The taught facts of a version are
rebuilt from the store after a restart, without the facts of a reverted document."""

from __future__ import annotations

import pytest

from memfit.bench.continual_stream import fact_document
from memfit.config import Settings
from memlm.data import invented_facts
from memlm.evaluation import answered
from model_store import Store
from workers.pipeline import Pipeline

# the benchmark's repair test's setting: on the tiny model, later updates break earlier facts
AGGRESSIVE = {"optimizer": "adam", "lr": 1.0, "top_t": 128, "steps": 30}
FACTS = invented_facts(9, seed=0)[3:]


def _settings(model, store, **kw) -> Settings:
    return Settings(
        model=model, store=store, gate_enabled=False, gate_probe_facts=8, gate_heldout_tokens=256, **kw
    )


def _teach(root, model, **kw) -> tuple[Store, Pipeline, list]:
    store = Store.init(root, model)
    pipe = Pipeline(store, _settings(model, root, **kw))
    results = []
    for fact in FACTS:
        job = store.jobs.create_job(None, [fact_document(fact)], dict(AGGRESSIVE))
        results.append(pipe.run_job(job.job_id))
        assert results[-1].status == "succeeded", results[-1]
    return store, pipe, results


def _final_recall(pipe: Pipeline, store: Store) -> float:
    pipe.at_version(store.active())
    hits = answered(
        pipe.model, pipe.tokenizer, [{"question": f["question"], "answer": f["answer"]} for f in FACTS]
    )
    return sum(hits) / len(hits)


@pytest.fixture(scope="module")
def repaired(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("repair") / "store"
    return _teach(root, tiny_model_dir, update_repair=True)


def test_repair_keeps_what_earlier_versions_taught(repaired, tiny_model_dir, tmp_path):
    store, pipe, results = repaired
    reports = [store.manifest(r.version)["report"] for r in results]
    assert sum(r.get("repaired", 0) for r in reports) > 0, reports
    assert all("repair_checked" in r for r in reports)
    with_repair = _final_recall(pipe, store)
    _, plain_pipe, _ = _teach(tmp_path / "plain", tiny_model_dir, update_repair=False)
    without = _final_recall(plain_pipe, plain_pipe.store)
    assert with_repair == 1.0 > without


def test_taught_facts_are_rebuilt_after_a_restart_without_reverted_ones(repaired, tiny_model_dir):
    store, pipe, results = repaired
    live = pipe.taught.at(store.active(), pipe.model, pipe.tokenizer)
    fresh = Pipeline(store, _settings(tiny_model_dir, store.root, update_repair=True))
    fresh.load()
    rebuilt = fresh.taught.at(store.active(), fresh.model, fresh.tokenizer)
    # after a restart every fact of the chain counts as taught (the live pipeline kept those it answered)
    assert [d["facts"][0]["question"] for d in rebuilt.docs] == [f["question"] for f in FACTS]
    assert {d["facts"][0]["question"] for d in live.docs} <= {f["question"] for f in FACTS}
    # the reads of a served text never move under value-only updates: the same rows either way
    for doc, reads in zip(live.docs, live.reads):
        i = [d["facts"][0]["question"] for d in rebuilt.docs].index(doc["facts"][0]["question"])
        assert all(bool((reads[k] == rebuilt.reads[i][k]).all()) for k in reads)
    v = store.revert(results[-1].version, who="test", why="drop the last fact")
    after = [d["facts"][0]["question"] for d in fresh.taught.at(v, fresh.model, fresh.tokenizer).docs]
    assert after == [f["question"] for f in FACTS[:-1]]


def test_the_models_file_turns_repair_on(tiny_model_copy, tmp_path):
    import json

    from workers.repairing import repairing

    (tiny_model_copy / "update_defaults.json").write_text(
        json.dumps({"preserve": False, "shield": 0, "repair": True})
    )
    import memlm

    defaults = memlm.update_defaults(tiny_model_copy)
    assert repairing(_settings(tiny_model_copy, tmp_path), defaults) is True
    assert repairing(_settings(tiny_model_copy, tmp_path, update_repair=False), defaults) is False
    assert repairing(_settings(tiny_model_copy, tmp_path), {}) is False
