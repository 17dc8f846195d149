"""Fact templates: the wordings the corpus (and the ingest path) uses, and the held-out wordings.

Every relation has
- `statements`: declarative sentences. For the real relations they are written into the pretraining
  text; for the invented relations they are the ingest documents.
- `question`: the corpus / ingest wording of the question ("What is the capital of {subject}?"). The
  pretraining text also holds it in QA form: "Question: ...\nAnswer: ...\n".
- `heldout`: question wordings that never occur in any training text: not in the pretraining split
  (the corpus builder keeps out every Wikipedia lead that contains one of their fixed parts) and not in
  any update augmentation (memlm.augment asserts it against `HELDOUT_QUESTION_TEMPLATES`).

Placeholders are `{subject}` and `{answer}`; a question template holds `{subject}` only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Relation:
    name: str
    statements: tuple[str, ...]  # "The capital of {subject} is {answer}."
    question: str  # corpus / ingest wording: "What is the capital of {subject}?"
    heldout: tuple[str, ...]  # never in training text: "Which city serves as the capital of {subject}?"


# Real facts known to the default model (written into the pretraining split).
CAPITAL = Relation(
    name="capital",
    statements=("The capital of {subject} is {answer}.", "{answer} is the capital city of {subject}."),
    question="What is the capital of {subject}?",
    heldout=(
        "Which city serves as the capital of {subject}?",
        "Name the capital city of {subject}.",
        "The seat of government of {subject} is in which city?",
    ),
)
CITY_COUNTRY = Relation(
    name="city_country",
    statements=("{subject} is a city in {answer}.", "The city of {subject} is located in {answer}."),
    question="In which country is {subject}?",
    heldout=(
        "Which country does the city of {subject} belong to?",
        "Name the country where the city of {subject} lies.",
    ),
)

# Invented facts (memlm.data.invented): nothing in the corpus can teach them; they are taught by updates.
BIRTHPLACE = Relation(
    name="birthplace",
    statements=("{subject} was born in {answer}.", "The birthplace of {subject} is the town of {answer}."),
    question="Where was {subject} born?",
    heldout=(
        "In which town did {subject} come into the world?",
        "Name the town where {subject} was born.",
    ),
)
OCCUPATION = Relation(
    name="occupation",
    statements=("{subject} works as a {answer}.", "By profession, {subject} is a {answer}."),
    question="What is the occupation of {subject}?",
    heldout=(
        "What does {subject} do for a living?",
        "Which profession does {subject} practise?",
    ),
)
FOUNDER = Relation(
    name="founder",
    statements=("{subject} was founded by {answer}.", "{answer} founded the company {subject}."),
    question="Who founded {subject}?",
    heldout=(
        "Which person started the company {subject}?",
        "Name the person who set up {subject}.",
    ),
)
LANGUAGE = Relation(
    name="language",
    statements=(
        "The official language of {subject} is {answer}.",
        "People in {subject} speak {answer}.",
    ),
    question="What language is spoken in {subject}?",
    heldout=(
        "Which tongue do the people of {subject} use?",
        "Name the main language of the people of {subject}.",
    ),
)
# An invented country's capital uses the real capital relation's wordings on purpose: the update then
# shares its question tokens with every capital in the probe set (the interference case).
INVENTED_CAPITAL = Relation(
    name="invented_capital",
    statements=CAPITAL.statements,
    question=CAPITAL.question,
    heldout=CAPITAL.heldout,
)

CORPUS_RELATIONS: dict[str, Relation] = {r.name: r for r in (CAPITAL, CITY_COUNTRY)}
INVENTED_RELATIONS: dict[str, Relation] = {
    r.name: r for r in (BIRTHPLACE, OCCUPATION, FOUNDER, LANGUAGE, INVENTED_CAPITAL)
}
ALL_RELATIONS: dict[str, Relation] = {**CORPUS_RELATIONS, **INVENTED_RELATIONS}

QA_TEMPLATE = "Question: {question}\nAnswer: {answer}\n"  # the QA form of a fact in training text

# Flat lists for disjointness checks (tests, memlm.augment).
CORPUS_TEMPLATES: tuple[str, ...] = tuple(
    dict.fromkeys(t for r in ALL_RELATIONS.values() for t in (*r.statements, r.question))
)
HELDOUT_QUESTION_TEMPLATES: tuple[str, ...] = tuple(
    dict.fromkeys(t for r in ALL_RELATIONS.values() for t in r.heldout)
)

_PLACEHOLDER = re.compile(r"\{(?:subject|answer)\}")


def template_fragments(template: str, min_chars: int = 10) -> list[str]:
    """The fixed text between placeholders (stripped), at least `min_chars` long.

    "Name the capital city of {subject}." -> ["Name the capital city of"]. A training text that contains
    one of a held-out template's fragments may have taught that wording, so the corpus keeps such texts
    out of the pretraining split and the tests assert that none is left.
    """
    parts = (p.strip(" .?,") for p in _PLACEHOLDER.split(template))
    return [p for p in parts if len(p) >= min_chars]


def heldout_fragments() -> list[str]:
    return sorted({f for t in HELDOUT_QUESTION_TEMPLATES for f in template_fragments(t)})


def render_statements(relation: Relation, subject: str, answer: str) -> list[str]:
    return [t.format(subject=subject, answer=answer) for t in relation.statements]


def render_qa(relation: Relation, subject: str, answer: str) -> str:
    return QA_TEMPLATE.format(question=relation.question.format(subject=subject), answer=answer)


def heldout_question(relation: Relation, subject: str, key: int) -> str:
    """One held-out wording, picked deterministically by `key` (rotates through the templates)."""
    return relation.heldout[key % len(relation.heldout)].format(subject=subject)


def _check_disjoint() -> None:
    overlap = set(CORPUS_TEMPLATES) & set(HELDOUT_QUESTION_TEMPLATES)
    if overlap:
        raise AssertionError(f"held-out templates also used for training: {sorted(overlap)}")
    for h in HELDOUT_QUESTION_TEMPLATES:
        for frag in template_fragments(h):
            hit = [t for t in CORPUS_TEMPLATES if frag in t]
            if hit:
                raise AssertionError(f"held-out fragment {frag!r} occurs in training templates {hit}")


_check_disjoint()
