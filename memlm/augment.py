"""Documents -> training examples and batches for a knowledge update.

A document is `{"id", "text", "facts": [{"question", "answer"}] (optional), "metadata"}`. From it:

- chunks: the text split into pieces of at most `max_seq_len` tokens (sentence boundaries kept when
  they fit); loss on every token.
- paraphrases, made without any external model: template rewrites of each sentence ("In fact, ...",
  "It is recorded that ...", and "X is known to be Y." for a copular "X is Y."), sentences re-ordered.
- QA forms for each fact the document supplies: `format_question(q) + " " + answer + "\n"` with the
  loss on the answer only, in the given wording and in a few rewrites from `TRAINING_QUESTION_TEMPLATES`.

Held-out wordings used in evaluation (memlm.data's held-out templates) must never appear among the
training rewrites; tests/memlm/test_augment.py asserts the two lists are disjoint.

Every example remembers the fact it teaches (`fact_key`), so an update can drop a fact's QA examples
once the fact is answered (per-fact early stopping) while the others keep training.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .evaluation import format_question

# Question rewrites used for TRAINING only. `{q}` is the question as ingested (trailing "?" kept).
# They wrap the question; they never reword the relation, so held-out relation wordings stay unseen.
TRAINING_QUESTION_TEMPLATES: tuple[str, ...] = (
    "{q}",
    "Tell me: {q}",
    "Quick question: {q}",
    "{q} Please answer briefly.",
)

# Rewrites of any declarative sentence ({s}: the sentence, a leading article lower-cased where it is
# embedded) and of a copular statement "X is Y." (X and Y as found in the sentence).
SENTENCE_TEMPLATES: tuple[str, ...] = (
    "In fact, {s}",
    "It is recorded that {s}",
)
COPULA_TEMPLATES: tuple[str, ...] = ("{x} is known to be {y}.",)
STATEMENT_TEMPLATES: tuple[str, ...] = SENTENCE_TEMPLATES + COPULA_TEMPLATES

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_COPULA = re.compile(r"^(?P<x>[A-Z][^.!?]*?)\s+is\s+(?P<y>[^.!?]+?)\s*\.$")
IGNORE = -100


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(text.strip()) if s.strip()]


def _embedded(sentence: str) -> str:
    """The sentence as it reads after 'In fact, ': a leading article loses its capital."""
    first = sentence.split(" ", 1)[0]
    return (
        sentence[0].lower() + sentence[1:]
        if first in ("The", "A", "An", "He", "She", "It", "They")
        else sentence
    )


def statement_rewrites(sentence: str) -> list[str]:
    """Template rewrites of one declarative sentence (copular ones get the 'X is known to be Y' form too)."""
    sentence = sentence.strip()
    if not sentence or sentence[-1] not in ".!":
        return []
    out = [tpl.format(s=_embedded(sentence)) for tpl in SENTENCE_TEMPLATES]
    m = _COPULA.match(sentence)
    if m:
        out += [tpl.format(x=m.group("x").strip(), y=m.group("y").strip()) for tpl in COPULA_TEMPLATES]
    return out


def paraphrases(text: str, rng: random.Random, max_variants: int = 3) -> list[str]:
    """Model-free paraphrases of `text`: template rewrites of its statements and re-ordered sentences."""
    sentences = split_sentences(text)
    out: list[str] = []
    rewrites = [statement_rewrites(s) for s in sentences]
    for v in range(max((len(r) for r in rewrites), default=0)):
        out.append(" ".join(r[v] if len(r) > v else s for s, r in zip(sentences, rewrites)))
    if len(sentences) > 1:
        shuffled = sentences[:]
        for _ in range(4):
            rng.shuffle(shuffled)
            if shuffled != sentences:
                out.append(" ".join(shuffled))
                break
    seen, unique = {text.strip()}, []
    for p in out:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    return unique[:max_variants]


def question_rewrites(question: str, templates: Sequence[str] = TRAINING_QUESTION_TEMPLATES) -> list[str]:
    q = question.strip()
    return list(dict.fromkeys(t.format(q=q) for t in templates))


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # IGNORE where no loss
    doc_id: str | None = None
    fact_key: str | None = None  # set on QA examples: the fact they teach
    kind: str = "text"  # text | paraphrase | qa


@dataclass
class AugmentSettings:
    max_seq_len: int = 128  # tokens per chunk/example; longer text is split
    paraphrases: int = 3  # model-free paraphrases per chunk (statement rewrites, re-ordering)
    question_rewrites: int = 4  # training question wordings per fact (from TRAINING_QUESTION_TEMPLATES)
    text_examples: bool = True  # also train on the document text itself
    answer_only_loss: bool = True  # QA forms: loss on the answer tokens only, not on the question
    seed: int = 0  # paraphrase re-ordering


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def chunk_text(tokenizer, text: str, max_tokens: int) -> list[str]:
    """Split text into pieces of at most `max_tokens` tokens, on sentence boundaries where possible."""
    pieces: list[str] = []
    current: list[str] = []
    current_len = 0
    for sentence in split_sentences(text) or [text]:
        n = len(_encode(tokenizer, " " + sentence))
        if n > max_tokens:  # one very long sentence: cut it by tokens
            if current:
                pieces.append(" ".join(current))
                current, current_len = [], 0
            ids = _encode(tokenizer, sentence)
            for start in range(0, len(ids), max_tokens):
                pieces.append(tokenizer.decode(ids[start : start + max_tokens]))
            continue
        if current_len + n > max_tokens and current:
            pieces.append(" ".join(current))
            current, current_len = [], 0
        current.append(sentence)
        current_len += n
    if current:
        pieces.append(" ".join(current))
    return [p for p in pieces if p.strip()]


def trains_text(documents: Iterable[dict], train_text: bool) -> bool:
    """Whether an update trains on the documents' text: always when asked, else only when no document
    supplies facts (facts are then taught through their QA forms). One rule for every updater."""
    return train_text or not any(d.get("facts") for d in documents)


def fact_key(doc_id: str | None, i: int) -> str:
    return f"{doc_id}#{i}"


def qa_example(
    tokenizer, question: str, answer: str, answer_only: bool = True
) -> tuple[list[int], list[int]]:
    prompt = _encode(tokenizer, format_question(question))
    target = _encode(tokenizer, " " + answer.strip() + "\n")
    ids = prompt + target
    labels = ([IGNORE] * len(prompt) if answer_only else list(prompt)) + target
    return ids, labels


def document_examples(
    tokenizer, documents: Iterable[dict], settings: AugmentSettings | None = None
) -> list[Example]:
    """Every training example for `documents` (chunks, paraphrases, QA forms)."""
    s = settings or AugmentSettings()
    rng = random.Random(s.seed)
    out: list[Example] = []
    for n, doc in enumerate(documents):
        doc_id = str(doc.get("id", f"doc-{n}"))
        text = (doc.get("text") or "").strip()
        if text and s.text_examples:
            for chunk in chunk_text(tokenizer, text, s.max_seq_len):
                ids = _encode(tokenizer, chunk)[: s.max_seq_len]
                out.append(Example(ids, list(ids), doc_id=doc_id, kind="text"))
                for p in paraphrases(chunk, rng, s.paraphrases):
                    pid = _encode(tokenizer, p)[: s.max_seq_len]
                    out.append(Example(pid, list(pid), doc_id=doc_id, kind="paraphrase"))
        for i, fact in enumerate(doc.get("facts") or []):
            key = fact_key(doc_id, i)
            for q in question_rewrites(fact["question"])[: max(1, s.question_rewrites)]:
                ids, labels = qa_example(tokenizer, q, fact["answer"], s.answer_only_loss)
                out.append(Example(ids[: s.max_seq_len], labels[: s.max_seq_len], doc_id, key, "qa"))
    return [e for e in out if any(label != IGNORE for label in e.labels[1:])]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask (0 on padding), labels (-100 on padding)."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
        labels[row, : len(e.labels)] = torch.tensor(e.labels, dtype=torch.long)
        mask[row, : len(e.ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass
class TrainingStream:
    """Batches for an update, with per-fact early stopping: `mark_answered(keys)` drops those facts'
    QA examples from later batches (their text examples stay while any fact of the document is open)."""

    examples: list[Example]
    batch_size: int = 16
    pad_id: int = 0
    answered: set[str] = field(default_factory=set)

    def all_batches(self) -> list[dict[str, torch.Tensor]]:
        """Every example once, in batches (used for access counting)."""
        return [
            collate(self.examples[i : i + self.batch_size], self.pad_id)
            for i in range(0, len(self.examples), self.batch_size)
        ]

    def active(self) -> list[Example]:
        open_docs = {e.doc_id for e in self.examples if e.fact_key and e.fact_key not in self.answered}
        has_facts = {e.doc_id for e in self.examples if e.fact_key}
        keep = []
        for e in self.examples:
            if e.fact_key is not None:
                if e.fact_key not in self.answered:
                    keep.append(e)
            elif e.doc_id not in has_facts or e.doc_id in open_docs:
                keep.append(e)
        return keep

    def mark_answered(self, keys: Iterable[str]) -> None:
        self.answered.update(keys)

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, step: int) -> dict[str, torch.Tensor] | None:
        """The batch for training step `step` (cycling over the active examples); None when none is left."""
        active = self.active()
        if not active:
            return None
        per_epoch = max(1, (len(active) + self.batch_size - 1) // self.batch_size)
        start = (step % per_epoch) * self.batch_size
        return collate(active[start : start + self.batch_size], self.pad_id)


def build_stream(
    tokenizer, documents: Sequence[dict], batch_size: int = 16, settings: AugmentSettings | None = None
) -> TrainingStream:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return TrainingStream(
        document_examples(tokenizer, documents, settings), batch_size=batch_size, pad_id=pad
    )


def document_facts(documents: Sequence[dict]) -> dict[str, dict]:
    """{fact_key: fact} for every fact the documents supply (keys as in the training examples)."""
    out: dict[str, dict] = {}
    for n, doc in enumerate(documents):
        doc_id = str(doc.get("id", f"doc-{n}"))
        for i, fact in enumerate(doc.get("facts") or []):
            out[fact_key(doc_id, i)] = fact
    return out
