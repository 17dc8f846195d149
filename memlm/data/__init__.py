"""Offline data: the corpus splits, the probe set, the fact templates and invented facts."""

from .corpus import Corpus, build_corpus, countries, large_cities, probe_facts, wiki_leads
from .invented import corrections, invented_facts
from .templates import (
    ALL_RELATIONS,
    CAPITAL,
    CITY_COUNTRY,
    CORPUS_RELATIONS,
    CORPUS_TEMPLATES,
    HELDOUT_QUESTION_TEMPLATES,
    INVENTED_RELATIONS,
    QA_TEMPLATE,
    Relation,
    heldout_fragments,
    template_fragments,
)

__all__ = [
    "ALL_RELATIONS",
    "CAPITAL",
    "CITY_COUNTRY",
    "CORPUS_RELATIONS",
    "CORPUS_TEMPLATES",
    "HELDOUT_QUESTION_TEMPLATES",
    "INVENTED_RELATIONS",
    "QA_TEMPLATE",
    "Corpus",
    "Relation",
    "build_corpus",
    "corrections",
    "countries",
    "heldout_fragments",
    "invented_facts",
    "large_cities",
    "probe_facts",
    "template_fragments",
    "wiki_leads",
]
