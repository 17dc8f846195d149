"""The documents the code cites are in the repository: every `docs/NAME.md` a source file names exists,
and a section cited as `docs/NAME.md "Section"` is a heading of that file; a bare upper-case `NAME.md`
(the old names of docs/contracts.md and docs/design.md) is cited only if the repository root has it."""

import re

from tests.conftest import ROOT

UPPER_DOC = re.compile(r"(?<![/\w.-])([A-Z][A-Z0-9_-]*\.md)\b")
CITE = re.compile(r"docs/([a-z0-9_-]+\.md)(?:\s+\"([^\"]+)\")?")
SOURCES = ["memlm", "model_store", "workers", "service", "memfit", "benchmarks", "tests", "tools"]


def test_cited_docs_and_sections_exist():
    missing = []
    for top in SOURCES:
        for path in sorted((ROOT / top).rglob("*.py")):
            for name, section in CITE.findall(path.read_text()):
                doc = ROOT / "docs" / name
                if not doc.exists():
                    missing.append(f"{path.relative_to(ROOT)}: docs/{name}")
                elif section and not re.search(rf"^#+ .*{re.escape(section)}", doc.read_text(), re.M):
                    missing.append(f'{path.relative_to(ROOT)}: docs/{name} "{section}"')
    assert not missing, "\n".join(missing)


def test_no_citation_of_a_document_outside_the_repository():
    paths = [ROOT / "pyproject.toml"] + [p for top in SOURCES for p in sorted((ROOT / top).rglob("*.py"))]
    paths.remove(ROOT / "tests" / "test_docs.py")  # its own docstring and pattern
    missing = []
    for path in paths:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for name in UPPER_DOC.findall(line):
                if not (ROOT / name).exists():
                    missing.append(f"{path.relative_to(ROOT)}:{lineno}: {name}")
    assert not missing, "\n".join(missing)
