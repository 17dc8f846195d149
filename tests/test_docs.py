"""The documents the code cites are in the repository: every `docs/NAME.md` a source file names exists,
and a section cited as `docs/NAME.md "Section"` is a heading of that file."""

import re

from tests.conftest import ROOT

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
