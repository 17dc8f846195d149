"""The evaluation gate of the update pipeline (workers/pipeline.py) on the tiny model.

Every update is evaluated (learning, retention and forgetting vs parent and base, held-out perplexity)
within the Settings.gate_* budget before it can become active. A destructive sparse update (every slot,
a huge learning rate) is published as a `rejected` version that is kept but never activated, its job
ends `rejected` with the figures; an admin can still activate it (force). A gentle update passes. The
probe set can be replaced with MEMFIT_PROBE_FILE.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from memfit.config import Settings
from model_store import Store, StoreError
from workers.gate import HOUSE_THRESHOLDS, load_probe
from workers.pipeline import Pipeline

NEW_FACT = {
    "question": "Which town is the birthplace of Zorvath Quellingmar?",
    "answer": "Brindlemoor",
    "heldout_question": "Zorvath Quellingmar was born in which town?",
}
# every slot of the tiny model's memory, a learning rate no sane operator would use
DESTRUCTIVE = {
    "optimizer": "adam",
    "top_t": 1024,
    "lr": 1000.0,
    "steps": 3,
    "early_stop": False,
    "question_rewrites": 1,
    "paraphrases": 0,
}
# small enough for the tiny model (1,024 slots in all) to keep what it knows
GENTLE = {"optimizer": "adam", "top_t": 8, "lr": 0.03, "steps": 10, "question_rewrites": 1, "paraphrases": 1}


def document(doc_id: str) -> dict:
    return {"id": doc_id, "text": "Zorvath Quellingmar was born in Brindlemoor.", "facts": [NEW_FACT]}


@pytest.fixture(scope="module")
def gated(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gate") / "store"
    settings = Settings(model=tiny_model_dir, store=root)
    store = Store.init(root, tiny_model_dir)
    pipeline = Pipeline(store, settings)
    pipeline.load()
    return store, pipeline, settings


def run(store: Store, pipeline: Pipeline, doc_id: str, overrides: dict):
    job = store.jobs.create_job(None, [document(doc_id)], settings=overrides)
    return pipeline.run_job(job.job_id)


def test_gate_rejects_a_destructive_update_and_keeps_it(gated):
    store, pipeline, settings = gated
    before = store.active()
    activations_before = len(store.activations())

    res = run(store, pipeline, "destroy-1", DESTRUCTIVE)

    assert res.status == "rejected", res
    assert res.version is not None and res.version != before
    assert store.active() == before, "a rejected version must never become active"
    assert len(store.activations()) == activations_before, "nothing was activated, not even briefly"
    m = store.manifest(res.version)
    assert m["state"] == "rejected" and m["parent"] == before
    assert {v["id"]: v["state"] for v in store.versions()}[res.version] == "rejected"
    # the job carries the figures and the reasons
    job = store.jobs.get(res.job_id)
    assert job.status == "rejected" and job.version == res.version
    assert "evaluation gate" in (job.error or "")
    ev = job.evaluation
    for key in ("learning", "retention", "retention_base", "forgetting", "forgetting_base", "perplexity"):
        assert key in ev, key
    # the tiny model's update_defaults.json names no threshold, no setting does: the house's apply
    assert settings.gate_max_forgetting is None and ev["gate"]["thresholds"] == HOUSE_THRESHOLDS
    assert ev["forgetting"] > HOUSE_THRESHOLDS["max_forgetting"]
    assert ev["forgetting_base"] > HOUSE_THRESHOLDS["max_forgetting_base"]
    assert ev["perplexity_change"] > HOUSE_THRESHOLDS["max_ppl_increase"]
    gate = ev["gate"]
    assert gate["enabled"] and not gate["passed"] and len(gate["reasons"]) == 3
    # evaluated within the budget, before publishing
    assert 0 < ev["probe_facts"] <= settings.gate_probe_facts
    # every slot trained: every probe text reads a changed row
    assert ev["reach"]["share"] == 1.0 and ev["reach"]["probes"] == ev["probe_facts"]
    assert job.timings["evaluation"] > 0 and job.timings["evaluation"] <= job.timings["total"]
    # the store refuses to activate it without force
    with pytest.raises(StoreError, match="rejected"):
        store.activate(res.version)


def test_gate_accepts_a_gentle_update(gated):
    store, pipeline, settings = gated
    before = store.active()
    res = run(store, pipeline, "gentle-1", GENTLE)
    assert res.status == "succeeded", res.evaluation.get("gate")
    assert store.active() == res.version and store.manifest(res.version)["parent"] == before
    ev = store.manifest(res.version)["evaluation"]
    assert ev["gate"]["passed"] and ev["gate"]["reasons"] == []
    assert ev["forgetting"] <= HOUSE_THRESHOLDS["max_forgetting"]
    assert ev["forgetting_base"] <= HOUSE_THRESHOLDS["max_forgetting_base"]
    assert ev["perplexity_change"] <= HOUSE_THRESHOLDS["max_ppl_increase"]
    assert ev["reach"]["probes"] == ev["probe_facts"] and 0.0 <= ev["reach"]["share"] <= 1.0


def test_reach_in_versions_and_cached_reads_exact(gated):
    """GET /versions shows each update's reach; the probe reads cached for a new version (parent reads
    outside the reach, re-read inside it) equal reads measured from scratch at that version."""
    import torch

    from memlm.reach import probe_reads
    from service.app import create_app

    store, pipeline, settings = gated
    res = run(store, pipeline, "gentle-reach", GENTLE)
    assert res.status == "succeeded", res.evaluation.get("gate")
    share = store.manifest(res.version)["evaluation"]["reach"]["share"]
    app = create_app(settings, start_runner=False)
    with TestClient(app) as client:
        listed = {v["id"]: v for v in client.get("/versions").json()["versions"]}
    assert listed[res.version]["reach"] == share
    assert listed[0]["reach"] is None  # the base changes nothing
    cached = pipeline._refs[res.version].reads
    assert cached is not None and len(cached) == len(pipeline.probe)
    pipeline.at_version(res.version)
    fresh = probe_reads(pipeline.model, pipeline.tokenizer, pipeline.probe)
    for a, b in zip(cached, fresh):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_admin_can_activate_a_rejected_version_anyway(gated):
    from service.app import create_app

    store, pipeline, settings = gated
    rejected = [v["id"] for v in store.versions() if v["state"] == "rejected"]
    if not rejected:
        rejected = [run(store, pipeline, "destroy-2", DESTRUCTIVE).version]
    v = rejected[-1]
    before = store.active()
    app = create_app(settings, start_runner=False)
    try:
        with TestClient(app) as client:
            r = client.post(f"/versions/{v}/activate", json={"why": "test"})
            assert r.status_code == 409, r.text
            assert "rejected" in r.json()["error"]["message"]
            assert client.get("/versions").json()["active"] == before
            r = client.post(f"/versions/{v}/activate", json={"why": "operator override", "force": True})
            assert r.status_code == 200, r.text
            assert r.json() == {"active": v, "previous": before}
            assert r.headers.get("content-type", "").startswith("application/json")
            assert (
                client.post("/generate", json={"prompt": "Question: x\nAnswer:", "max_new_tokens": 2}).json()[
                    "version"
                ]
                == v
            )
    finally:
        store.activate(before, why="test cleanup")
    assert store.activations()[-2]["to"] == v and store.activations()[-2]["why"] == "operator override"


def test_thresholds_are_settings(tiny_model_dir, tmp_path):
    """With permissive thresholds the same destructive update passes; with the gate off it passes too."""
    root = tmp_path / "store"
    lax = Settings(
        model=tiny_model_dir,
        store=root,
        gate_max_forgetting=1.0,
        gate_max_forgetting_base=1.0,
        gate_max_ppl_increase=1e9,
        gate_probe_facts=8,
    )
    store = Store.init(root, tiny_model_dir)
    pipeline = Pipeline(store, lax)
    res = run(store, pipeline, "destroy-lax", DESTRUCTIVE)
    assert res.status == "succeeded" and store.active() == res.version
    assert res.evaluation["probe_facts"] <= 8  # the budget setting is honoured
    assert res.evaluation["gate"]["thresholds"]["max_ppl_increase"] == 1e9

    pipeline.settings = lax.model_copy(update={"gate_enabled": False, "gate_max_forgetting": 0.0})
    res = run(store, pipeline, "destroy-off", DESTRUCTIVE)
    assert res.status == "succeeded" and res.evaluation["gate"]["enabled"] is False


def test_the_models_gate_thresholds_apply_unless_a_setting_overrides_them(tiny_model_copy, tmp_path):
    """update_defaults.json's gate_max_* (what `memfit pretrain` writes for the default preset) set the
    thresholds; a MEMFIT_GATE_MAX_* setting wins over the model's."""
    model_file = {"preserve": False, "shield": 0, "gate_max_forgetting": 1.0, "gate_max_forgetting_base": 1.0}
    # a perplexity change is always > -1 (it is relative): the model's threshold rejects every update
    (tiny_model_copy / "update_defaults.json").write_text(
        json.dumps({**model_file, "gate_max_ppl_increase": -1.0})
    )
    root = tmp_path / "store"
    store = Store.init(root, tiny_model_copy)
    settings = Settings(model=tiny_model_copy, store=root, gate_probe_facts=8)
    pipeline = Pipeline(store, settings)
    res = run(store, pipeline, "model-thresholds", GENTLE)
    gate = res.evaluation["gate"]
    assert res.status == "rejected" and gate["thresholds"] == {
        "max_forgetting": 1.0, "max_forgetting_base": 1.0, "max_ppl_increase": -1.0
    }  # fmt: skip
    assert any("gate_max_ppl_increase -1.0" in r for r in gate["reasons"]), gate
    pipeline.settings = settings.model_copy(update={"gate_max_ppl_increase": 1e9})
    res = run(store, pipeline, "setting-wins", GENTLE)
    assert res.status == "succeeded" and res.evaluation["gate"]["thresholds"]["max_ppl_increase"] == 1e9


def test_probe_file_replaces_the_models_probe_set(tiny_model_dir, tmp_path):
    shipped, texts = load_probe(tiny_model_dir)
    assert shipped and texts, "the model ships its probe set and held-out text in probe.json"
    mine = tmp_path / "probe.json"
    mine.write_text(json.dumps({"facts": shipped[:5], "heldout_texts": texts[:2]}))
    settings = Settings(model=tiny_model_dir, store=tmp_path / "store", probe_file=mine)
    store = Store.init(tmp_path / "store", tiny_model_dir)
    pipeline = Pipeline(store, settings)
    pipeline.load()
    assert pipeline.heldout == texts[:2]
    assert pipeline.probe and all(f in shipped[:5] for f in pipeline.probe)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"facts": [{"question": "no answer"}]}))
    with pytest.raises(ValueError, match="bad.json"):
        load_probe(bad)
    with pytest.raises(ValueError, match="missing.json"):
        load_probe(tmp_path / "missing.json")


@pytest.mark.parametrize("overrides", [GENTLE, {**GENTLE, "top_t": 64, "lr": 0.3}], ids=["gentle", "wider"])
def test_gate_evaluates_only_the_reach_and_decides_as_the_full_evaluation(gated, overrides):
    """The exact gate (workers.gate.measure, reach_only): probe facts outside the update's reach read no
    changed row, so their parent answers are reused and only the reached ones are generated; every
    figure and the decision equal those of the full evaluation of the same update."""
    from memlm.updater import UpdateSettings, learn_documents

    store, pipeline, settings = gated
    parent = store.active()
    ref = pipeline.reference(parent)
    parent_reads = pipeline.probe_reads(parent)
    pipeline.at_version(parent)
    fields = {k: v for k, v in overrides.items()}
    delta = learn_documents(
        pipeline.model,
        pipeline.tokenizer,
        [document("exact-gate")],
        pipeline.background,
        UpdateSettings(**fields),
    )
    try:
        docs = [document("exact-gate")]
        full = pipeline._evaluate(docs, ref, parent, delta, parent_reads, reach_only=False)
        exact = pipeline._evaluate(docs, ref, parent, delta, parent_reads, reach_only=True)
    finally:
        delta.revert(pipeline.model.value_tables())
    assert full["probe_evaluated"] == len(pipeline.probe) > 0
    # the cost follows the reach: the gentle update reaches part of the probe, the wider one all of it
    assert exact["probe_evaluated"] == exact["reach"]["reached"] <= len(pipeline.probe)
    if overrides is GENTLE:
        assert exact["probe_evaluated"] < len(pipeline.probe)
    assert exact["_answered"] == full["_answered"]
    for key in (
        "retention",
        "retention_base",
        "forgetting",
        "forgetting_base",
        "perplexity",
        "reach",
        "gate",
    ):
        assert exact[key] == full[key], key
    assert len(exact["_reads"]) == len(full["_reads"])
