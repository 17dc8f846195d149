"""The offline corpus: reproducible, three disjoint splits, a fixed probe set, held-out wordings."""

from __future__ import annotations

import re
import time

import pytest

from memlm.data import (
    ALL_RELATIONS,
    CORPUS_TEMPLATES,
    HELDOUT_QUESTION_TEMPLATES,
    QA_TEMPLATE,
    build_corpus,
    corrections,
    heldout_fragments,
    invented_facts,
    probe_facts,
)


@pytest.fixture(scope="module")
def corpus():
    t0 = time.perf_counter()
    c = build_corpus(0)
    assert time.perf_counter() - t0 < 30  # ~3 s on 2 cores; generous for a loaded machine
    return c


def test_sizes(corpus):
    assert len(corpus.pretrain) > 8000
    assert len(corpus.background) > 500
    assert len(corpus.evaluation) > 200
    assert len(corpus.probe) >= 220
    assert {f["relation"] for f in corpus.probe} == {"capital"}
    with_cities = build_corpus(0, probe_cities=150)
    assert {f["relation"] for f in with_cities.probe} == {"capital", "city_country"}
    assert len(with_cities.fact_texts) == 3 * len(with_cities.probe)
    assert not set(with_cities.pretrain) & set(with_cities.background)
    assert set(corpus.fact_texts) < set(with_cities.fact_texts)


def test_reproducible(corpus):
    again = build_corpus(0)
    assert again.split_hashes() == corpus.split_hashes()
    assert build_corpus(1).split_hashes()["pretrain"] != corpus.split_hashes()["pretrain"]


def test_splits_disjoint(corpus):
    pre, bg, ev = set(corpus.pretrain), set(corpus.background), set(corpus.evaluation)
    assert not pre & bg
    assert not pre & ev
    assert not bg & ev


def test_heldout_templates_never_in_pretraining_text(corpus):
    assert not set(CORPUS_TEMPLATES) & set(HELDOUT_QUESTION_TEMPLATES)
    fragments = heldout_fragments()
    assert fragments
    text = "\n".join(corpus.pretrain)
    for frag in fragments:
        assert frag not in text, f"held-out wording {frag!r} occurs in the pretraining split"
    for f in corpus.probe:
        assert f["heldout_question"] not in text
        assert f["heldout_question"] != f["question"]


def test_probe_facts_are_in_pretraining_in_corpus_wording(corpus):
    pre = set(corpus.pretrain)
    for f in corpus.probe:
        rel = ALL_RELATIONS[f["relation"]]
        assert f["question"] == rel.question.format(subject=f["subject"])
        assert QA_TEMPLATE.format(question=f["question"], answer=f["answer"]) in pre
        assert rel.statements[0].format(subject=f["subject"], answer=f["answer"]) in pre
        assert any(f["heldout_question"] == t.format(subject=f["subject"]) for t in rel.heldout)
        # the answer is not copied from the question
        assert f["answer"].lower() not in f["question"].lower()
        assert f["subject"].lower() not in f["answer"].lower()


def test_probe_facts_share_tokens():
    capitals = probe_facts()
    words = [set(re.findall(r"\w+", f["subject"])) for f in capitals]
    assert sum(1 for i, a in enumerate(words) for b in words[i + 1 :] if a & b) > 5  # Guinea, Islands, ...
    probe = probe_facts(150)
    answers = [f["answer"] for f in probe]
    assert len(set(answers)) < len(answers)  # several cities of one country
    subjects = {f["subject"] for f in probe if f["relation"] == "capital"}
    assert {f["answer"] for f in probe if f["relation"] == "city_country"} & subjects  # answers are countries
    words = [set(re.findall(r"\w+", f["subject"])) for f in probe]
    assert sum(1 for i, a in enumerate(words) for b in words[i + 1 :] if a & b) > 5


def test_probe_is_fixed_before_training():
    assert probe_facts() == probe_facts()
    assert build_corpus(3).probe == build_corpus(0).probe


def test_small_slices(corpus):
    small = build_corpus(0, max_wiki=300, max_probe=20)
    assert len(small.probe) == 20
    assert len(small.fact_texts) == 60
    assert set(small.fact_texts) <= set(small.pretrain)
    assert not set(small.pretrain) & set(small.evaluation)


def test_invented_facts_are_new_and_deterministic(corpus):
    facts = invented_facts(40, seed=0)
    assert facts == invented_facts(40, seed=0)
    assert facts != invented_facts(40, seed=1)
    assert len({f["subject"] for f in facts}) == 40
    assert {f["relation"] for f in facts} == {
        "birthplace",
        "occupation",
        "founder",
        "language",
        "invented_capital",
    }
    text = "\n".join(corpus.pretrain)
    for f in facts:
        assert f["subject"] not in text
        if f["relation"] != "occupation":
            assert f["answer"] not in text
        rel = ALL_RELATIONS[f["relation"]]
        assert f["text"] in [t.format(subject=f["subject"], answer=f["answer"]) for t in rel.statements]
        assert f["question"] == rel.question.format(subject=f["subject"])
        assert f["heldout_question"] in [t.format(subject=f["subject"]) for t in HELDOUT_QUESTION_TEMPLATES]


def test_corrections_change_known_capitals():
    probe = {f["id"]: f for f in probe_facts()}
    fixes = corrections(20, seed=0)
    assert fixes == corrections(20, seed=0)
    for f in fixes:
        assert f["id"] in probe
        assert f["old_answer"] == probe[f["id"]]["answer"]
        assert f["answer"] != f["old_answer"]
        assert f["question"] == probe[f["id"]]["question"]


def test_shaping_texts_name_no_entity_of_a_measured_stream():
    from memlm.data.invented import measured_names, unmeasured_facts
    from memlm.pretrain import format_matched_background, served_background

    facts = unmeasured_facts(300, seed=30_000)
    assert len(facts) == 300 and len({f["id"] for f in facts}) == 300
    assert len({f["relation"] for f in facts}) == 5  # every relation kept (occupation words are shared)
    assert not {n for f in facts for n in (f["subject"], f["answer"])} & measured_names()
    assert unmeasured_facts(300, seed=30_000) == facts  # deterministic
    import re

    named = re.compile("|".join(rf"\b{re.escape(n)}\b" for n in sorted(measured_names())))
    for text in served_background(300, 0) + format_matched_background(100, 0):
        assert not named.search(text), text
