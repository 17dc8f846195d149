"""The byte-level BPE tokenizer: trains, saves, reloads through AutoTokenizer and round-trips real text."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from memlm.data import wiki_leads
from memlm.tokenizer import EOS_TOKEN, PAD_TOKEN, build_tokenizer, encode_texts, load_tokenizer

SAMPLES = [
    "Question: What is the capital of Saint Barthélemy?\nAnswer: Gustavia\n",
    "São Paulo — the largest city in Brazil — has ~12 million people (2020).",
    "  leading spaces, tabs\tand emoji 😀 and 中文 survive.\n\n",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    texts = [t for _, t in wiki_leads()[:800]]
    tok = build_tokenizer(texts, vocab_size=600)
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(str(path))
    return tok, path, texts


def test_special_tokens(trained):
    tok, _, _ = trained
    assert tok.convert_tokens_to_ids(EOS_TOKEN) == 0 == tok.eos_token_id == tok.bos_token_id
    assert tok.convert_tokens_to_ids(PAD_TOKEN) == 1 == tok.pad_token_id
    assert len(tok) == 600


def test_roundtrip_after_save_and_load(trained):
    tok, path, texts = trained
    for loaded in (AutoTokenizer.from_pretrained(str(path)), load_tokenizer(path)):
        for text in SAMPLES + texts[:20]:
            ids = loaded(text)["input_ids"]
            assert ids, "encodes to [] (the GPT2TokenizerFast(vocab_file=...) pitfall)"
            assert ids == tok(text)["input_ids"]
            assert 0 not in ids and 1 not in ids  # nothing added automatically
            assert loaded.decode(ids) == text


def test_compresses_real_text(trained):
    tok, _, texts = trained
    text = texts[0]
    assert len(tok(text)["input_ids"]) < len(text.encode()) / 2


def test_encode_texts_matches(trained):
    tok, _, texts = trained
    long = " ".join(texts[:30])  # longer than the model length: no warning, no truncation
    assert encode_texts(tok, [long, SAMPLES[0]]) == [tok.encode(long), tok.encode(SAMPLES[0])]
