"""New facts the model cannot know, for the benchmarks and the update tests.

- `invented_facts(n, seed)`: made-up people, towns, companies and countries with made-up attributes,
  deterministic for a seed. No name occurs in the corpus (checked against every Wikipedia title,
  country, capital and city name, and against the lead texts).
- `corrections(n, seed)`: known probe capitals changed to a new value (another real city of the same
  country where there is one, else an invented town).

A fact is {"id", "relation", "subject", "answer", "text", "question", "heldout_question"}: `text` is the
ingest document (one statement), `question` the ingest wording, `heldout_question` a wording whose
template is in HELDOUT_QUESTION_TEMPLATES (never used for training).
"""

from __future__ import annotations

import random
import re
from functools import lru_cache

from .corpus import countries, large_cities, probe_facts, wiki_leads
from .templates import ALL_RELATIONS, CAPITAL, INVENTED_RELATIONS, Relation, heldout_question

_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "k", "kl", "l", "m", "n", "p", "pr", "r", "s", "st", "t", "th",
           "tr", "v", "z", "sh", "qu", "h", "j"]  # fmt: skip
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou", "ia", "y"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m", "th", "nd", "rk", "x"]
_TOWN_SUFFIXES = ["ton", "vale", "mar", "by", "stead", "holm", "ora", "ith", "wick", "ara"]
_COUNTRY_SUFFIXES = ["ia", "land", "istan", "ora", "eth", "any", "ovia", "ea"]
_COMPANY_SUFFIXES = ["Works", "Industries", "Labs", "Systems", "Foundry", "Textiles", "Motors", "Robotics"]
OCCUPATIONS = ["glassblower", "cartographer", "beekeeper", "violinist", "geologist", "stonemason",
               "lighthouse keeper", "puppeteer", "botanist", "clockmaker", "ferry pilot", "tailor",
               "perfumer", "archivist", "falconer", "bookbinder"]  # fmt: skip


@lru_cache(maxsize=1)
def _known_words() -> frozenset[str]:
    """Lower-cased words of every real name and lead text: an invented name must avoid all of them."""
    words: set[str] = set()
    for title, text in wiki_leads():
        words.update(re.findall(r"[a-z]+", title.lower()))
        words.update(re.findall(r"[a-z]+", text.lower()))
    for c in countries():
        words.update(re.findall(r"[a-z]+", (c["name"] + " " + c["capital"]).lower()))
    for c in large_cities():
        words.update(re.findall(r"[a-z]+", c["name"].lower()))
    return frozenset(words)


class NameMaker:
    """Pronounceable made-up words, unique within one maker and absent from the corpus."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def word(self, syllables: tuple[int, int] = (2, 3), suffix: list[str] | None = None) -> str:
        known = _known_words()
        while True:
            n = self.rng.randint(*syllables)
            w = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(n))
            w += self.rng.choice(suffix) if suffix else self.rng.choice(_CODAS)
            if 4 <= len(w) <= 12 and w not in known and w not in self.used:
                self.used.add(w)
                return w.capitalize()

    def person(self) -> str:
        return f"{self.word((1, 2))} {self.word((2, 3))}"

    def town(self) -> str:
        return self.word((1, 2), _TOWN_SUFFIXES)

    def country(self) -> str:
        return self.word((1, 2), _COUNTRY_SUFFIXES)

    def company(self) -> str:
        return f"{self.word((1, 2))} {self.rng.choice(_COMPANY_SUFFIXES)}"

    def language(self) -> str:
        return self.word((1, 2), ["ish", "ese", "ic", "ian"])


def _make(relation: Relation, subject: str, answer: str, key: int, **extra) -> dict:
    return {
        "id": f"{relation.name}:{subject}",
        "relation": relation.name,
        "subject": subject,
        "answer": answer,
        "text": relation.statements[0].format(subject=subject, answer=answer),
        "question": relation.question.format(subject=subject),
        "heldout_question": heldout_question(relation, subject, key),
        **extra,
    }


def invented_facts(n: int, seed: int = 0, relations: list[str] | None = None) -> list[dict]:
    """`n` facts about invented entities, cycling through `relations` (default: all invented ones)."""
    names = list(relations or INVENTED_RELATIONS)
    unknown = [r for r in names if r not in INVENTED_RELATIONS]
    if unknown:
        raise ValueError(f"unknown invented relations {unknown}; known: {sorted(INVENTED_RELATIONS)}")
    rng = random.Random(f"memfit-invented:{seed}")
    make = NameMaker(rng)
    out = []
    for i in range(n):
        rel = INVENTED_RELATIONS[names[i % len(names)]]
        if rel.name == "birthplace":
            subject, answer = make.person(), make.town()
        elif rel.name == "occupation":
            subject, answer = make.person(), rng.choice(OCCUPATIONS)
        elif rel.name == "founder":
            subject, answer = make.company(), make.person()
        elif rel.name == "language":
            subject, answer = make.country(), make.language()
        else:  # invented_capital
            subject, answer = make.country(), make.town()
        out.append(_make(rel, subject, answer, i))
    return out


# The measured streams: `memfit bench continual` (seed 0: dev then test facts) and
# benchmarks/tune_sparse.py (seed 11). Texts that only shape the model or its statistics (pretraining
# entities, background prompts) must not name any of their entities.
MEASURED_STREAMS: tuple[tuple[int, int], ...] = ((0, 1000), (11, 200))  # (seed, facts)


@lru_cache(maxsize=1)
def measured_names() -> frozenset[str]:
    """Every invented name of the measured streams (MEASURED_STREAMS): subjects, and answers other than
    the shared occupation words."""
    names: set[str] = set()
    for seed, n in MEASURED_STREAMS:
        for f in invented_facts(n, seed=seed):
            names.add(f["subject"])
            if f["answer"] not in OCCUPATIONS:
                names.add(f["answer"])
    return frozenset(names)


def unmeasured_facts(n: int, seed: int) -> list[dict]:
    """`n` invented facts (generator seed `seed`) none of whose names occurs in a measured stream."""
    avoid = measured_names()
    out: list[dict] = []
    ask = n
    while len(out) < n:
        out = [
            f
            for f in invented_facts(ask, seed=seed)
            if f["subject"] not in avoid and f["answer"] not in avoid
        ]
        ask += n - len(out) + 8
    return out[:n]


def corrections(n: int, seed: int = 0) -> list[dict]:
    """`n` known capitals from the probe set, each changed to a new value ("old_answer" keeps the truth).

    The fact id is the probe fact's id, so a benchmark can leave corrected facts out of its retention set.
    """
    rng = random.Random(f"memfit-corrections:{seed}")
    capitals = [f for f in probe_facts() if f["relation"] == CAPITAL.name]
    if n > len(capitals):
        raise ValueError(f"asked for {n} corrections; the probe set has {len(capitals)} capitals")
    other_city = {}
    for c in large_cities():
        other_city.setdefault(c["country"], c["name"])
    make = NameMaker(rng)
    out = []
    for i, f in enumerate(rng.sample(capitals, n)):
        new = other_city.get(f["subject"]) or make.town()
        out.append(_make(CAPITAL, f["subject"], new, i, old_answer=f["answer"]))
    return out


__all__ = ["ALL_RELATIONS", "OCCUPATIONS", "NameMaker", "corrections", "invented_facts"]
