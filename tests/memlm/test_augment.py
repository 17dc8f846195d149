import random

import pytest

from memlm.augment import (
    IGNORE,
    SENTENCE_TEMPLATES,
    STATEMENT_TEMPLATES,
    TRAINING_QUESTION_TEMPLATES,
    AugmentSettings,
    build_stream,
    chunk_text,
    document_examples,
    paraphrases,
    question_rewrites,
)
from memlm.data import HELDOUT_QUESTION_TEMPLATES, heldout_fragments, invented_facts
from memlm.evaluation import format_question


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from memlm.tokenizer import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def _docs(facts):
    return [
        {"id": f["id"], "text": f["text"], "facts": [{"question": f["question"], "answer": f["answer"]}]}
        for f in facts
    ]


def test_heldout_wordings_disjoint_from_training_augmentations(tokenizer):
    assert not set(TRAINING_QUESTION_TEMPLATES) & set(HELDOUT_QUESTION_TEMPLATES)
    assert not set(STATEMENT_TEMPLATES) & set(HELDOUT_QUESTION_TEMPLATES)
    fragments = heldout_fragments()
    assert fragments
    facts = invented_facts(40, seed=3)
    for ex in document_examples(tokenizer, _docs(facts)):
        text = tokenizer.decode(ex.ids)
        hits = [frag for frag in fragments if frag in text]
        assert not hits, f"training example {text!r} holds held-out wording {hits}"
    # and the rendered held-out questions themselves never occur in training text
    for f in facts:
        assert all(f["heldout_question"] not in q for q in question_rewrites(f["question"]))


def test_qa_examples_train_the_answer_only(tokenizer):
    doc = {"id": "d", "text": "", "facts": [{"question": "Where was Zorb Quelm born?", "answer": "Tarton"}]}
    examples = document_examples(tokenizer, [doc], AugmentSettings(question_rewrites=2))
    assert [e.kind for e in examples] == ["qa", "qa"]
    first = examples[0]
    prompt_len = len(
        tokenizer.encode(format_question("Where was Zorb Quelm born?"), add_special_tokens=False)
    )
    assert all(label == IGNORE for label in first.labels[:prompt_len])
    assert tokenizer.decode([t for t in first.labels if t != IGNORE]) == " Tarton\n"
    assert first.fact_key == "d#0"


def test_paraphrases_are_model_free_rewrites():
    out = paraphrases("The capital of Zorbia is Quelm. It lies on a river.", random.Random(0), max_variants=5)
    assert "In fact, the capital of Zorbia is Quelm. In fact, it lies on a river." in out
    assert "It lies on a river. The capital of Zorbia is Quelm." in out
    assert len(out) == len(set(out))
    assert all(t.startswith(("In fact", "It is recorded")) for t in SENTENCE_TEMPLATES)


def test_long_documents_are_chunked_by_tokens(tokenizer):
    text = " ".join(f"Sentence number {i} talks about the town of Quelm." for i in range(60))
    chunks = chunk_text(tokenizer, text, max_tokens=40)
    assert len(chunks) > 3
    assert all(len(tokenizer.encode(c, add_special_tokens=False)) <= 40 for c in chunks)
    examples = document_examples(tokenizer, [{"id": "long", "text": text}], AugmentSettings(max_seq_len=40))
    assert all(len(e.ids) <= 40 for e in examples)


def test_stream_drops_answered_facts(tokenizer):
    facts = invented_facts(2, seed=1)
    stream = build_stream(tokenizer, _docs(facts), batch_size=64)
    keys = {e.fact_key for e in stream.examples if e.fact_key}
    assert len(keys) == 2
    full = stream.batch(0)["input_ids"].shape[0]
    stream.answered = {sorted(keys)[0]}
    part = stream.batch(0)["input_ids"].shape[0]
    assert 0 < part < full
    stream.answered = set(keys)
    assert stream.batch(0) is None
    b = stream.all_batches()[0]
    assert (b["labels"][b["attention_mask"] == 0] == IGNORE).all()
