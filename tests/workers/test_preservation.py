"""Protection in the service (workers/preservation.py): with MEMFIT_UPDATE_PRESERVE the known probe facts
the gate does not measure are kept out of every update's selection, so they answer bit-identically
after it; MEMFIT_UPDATE_SHIELD adds the served format's own reads."""

from __future__ import annotations

import pytest
import torch

from memfit.config import Settings
from memlm.reach import probe_texts
from model_store import Store
from workers.pipeline import Pipeline
from workers.preservation import preservation_facts

DOC = {
    "id": "goju",
    "text": "Goju Theipouquis was born in Peivistead.",
    "facts": [{"question": "Where was Goju Theipouquis born?", "answer": "Peivistead"}],
}
QUICK = {"steps": 3, "early_stop": False, "question_rewrites": 1, "paraphrases": 0, "lr": 2000.0}


def _settings(model, store, **kw) -> Settings:
    return Settings(
        **{
            "model": model,
            "store": store,
            "gate_enabled": False,
            "gate_probe_facts": 8,
            "gate_heldout_tokens": 256,
            **kw,
        }
    )


@torch.no_grad()
def _logits(model, tokenizer, texts):
    return [model(tokenizer(t, return_tensors="pt").input_ids, use_cache=False).logits for t in texts]


def test_preserved_facts_answer_bit_identically_after_an_update(tiny_model_dir, tmp_path):
    store = Store.init(tmp_path / "store", tiny_model_dir)
    pipe = Pipeline(
        store, _settings(tiny_model_dir, tmp_path / "store", update_preserve=True, update_shield=3)
    )
    pipe.load()
    assert pipe.protected is not None
    protected = {layer: int(m.sum()) for layer, m in pipe.protected.items()}
    assert all(n > 0 for n in protected.values())
    facts = __import__("json").loads((tiny_model_dir / "probe.json").read_text())["facts"]
    keep = preservation_facts(pipe.model, pipe.tokenizer, facts, pipe.settings)
    assert keep and not any(f in facts[:8] for f in keep)  # never the gate's probe
    pipe.at_version(0)
    texts = probe_texts(pipe.model, pipe.tokenizer, keep)
    before = _logits(pipe.model, pipe.tokenizer, texts)

    job = store.jobs.create_job(None, [DOC], QUICK)
    res = pipe.run_job(job.job_id)
    assert res.status == "succeeded", res
    m = store.manifest(res.version)
    assert m["slots_changed"]["total"] > 0  # the update still trained rows
    assert m["report"]["slots_protected"] == {str(k): v for k, v in protected.items()}
    pipe.at_version(res.version)
    after = _logits(pipe.model, pipe.tokenizer, texts)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_preservation_without_known_facts_left_is_a_named_error(tiny_model_dir, tmp_path):
    store = Store.init(tmp_path / "store", tiny_model_dir)
    settings = _settings(tiny_model_dir, tmp_path / "store", update_preserve=True, gate_probe_facts=100_000)
    with pytest.raises(ValueError, match="MEMFIT_UPDATE_PRESERVE"):
        Pipeline(store, settings).load()


def test_protection_is_off_for_a_model_that_does_not_ask_for_it(tiny_model_dir, tmp_path):
    """The tiny preset's update_defaults.json turns neither on, and no setting does."""
    import json

    assert json.loads((tiny_model_dir / "update_defaults.json").read_text()) == {
        "preserve": False,
        "shield": 0,
        "repair": False,
    }
    store = Store.init(tmp_path / "store", tiny_model_dir)
    pipe = Pipeline(store, _settings(tiny_model_dir, tmp_path / "store"))
    pipe.load()
    assert pipe.protected is None


def test_the_models_update_defaults_apply_unless_a_setting_overrides_them(tiny_model_copy, tmp_path):
    """A model directory's update_defaults.json (written by `memfit pretrain` from the preset) turns
    protection on and sets the update lr; MEMFIT_UPDATE_* settings and a job's settings win over it."""
    import json

    (tiny_model_copy / "update_defaults.json").write_text(
        json.dumps({"lr": 1234.0, "top_t": 12, "preserve": True, "shield": 3})
    )
    store = Store.init(tmp_path / "store", tiny_model_copy)
    pipe = Pipeline(store, _settings(tiny_model_copy, tmp_path / "store"))
    pipe.load()
    explicit = Pipeline(
        Store.init(tmp_path / "store2", tiny_model_copy),
        _settings(tiny_model_copy, tmp_path / "store2", update_preserve=True, update_shield=3),
    )
    explicit.load()
    assert pipe.protected is not None
    assert all(torch.equal(pipe.protected[k], explicit.protected[k]) for k in explicit.protected)
    off = Pipeline(
        Store.init(tmp_path / "store3", tiny_model_copy),
        _settings(tiny_model_copy, tmp_path / "store3", update_preserve=False, update_shield=0),
    )
    off.load()
    assert off.protected is None

    job = store.jobs.create_job(None, [DOC], {k: v for k, v in QUICK.items() if k != "lr"})
    res = pipe.run_job(job.job_id)
    assert res.status == "succeeded", res
    report = store.manifest(res.version)["report"]
    assert report["lr"] == 1234.0 and report["t"] == 12
    job = store.jobs.create_job(None, [DOC], QUICK)  # the job's own lr wins
    assert store.manifest(pipe.run_job(job.job_id).version)["report"]["lr"] == QUICK["lr"]


def test_a_malformed_update_defaults_file_is_a_named_error(tiny_model_copy, tmp_path):
    (tiny_model_copy / "update_defaults.json").write_text('{"lr": "fast"}')
    store = Store.init(tmp_path / "store", tiny_model_copy)
    with pytest.raises(ValueError, match="update_defaults.json: lr"):
        Pipeline(store, _settings(tiny_model_copy, tmp_path / "store")).load()
