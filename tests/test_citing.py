"""docs/citing.md stays complete and well formed: every paper the code cites and every registered estimator and
allocation it implements from a paper has a BibTeX entry, and each entry is one a reference manager can read."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import ebpo  # noqa: F401 - registers every estimator, the shrinkage ones included
from ebpo.allocation import ALLOCATORS
from ebpo.estimators import ESTIMATORS

ROOT = Path(__file__).resolve().parents[1]
CITING = (ROOT / "docs" / "citing.md").read_text()
ENTRIES = re.findall(r"```bibtex\n(.*?)```", CITING, re.DOTALL)
ARXIV_ID = r"\d{4}\.\d{4,5}"
# Allocators that follow no paper: the even split, and ebpo's own Empirical-Bayes allocation (docs/allocation.md).
UNCITED_ALLOCATORS = {"uniform", "eb"}


def fields(entry: str) -> dict[str, str]:
    """``name = {value}`` pairs of one BibTeX entry, values with their inner braces, whitespace collapsed."""
    found: dict[str, str] = {}
    for match in re.finditer(r"^\s*(\w+)\s*=\s*\{", entry, re.MULTILINE):
        depth, start = 1, match.end()
        for end in range(start, len(entry)):
            depth += {"{": 1, "}": -1}.get(entry[end], 0)
            if depth == 0:
                break
        assert depth == 0, f"unclosed value of {match.group(1)!r} in\n{entry}"
        found[match.group(1)] = " ".join(entry[start:end].split())
    return found


def arxiv_entries() -> dict[str, dict[str, str]]:
    """arXiv id -> fields, for every entry that cites an arXiv preprint."""
    by_id: dict[str, dict[str, str]] = {}
    for entry in ENTRIES:
        journal = fields(entry).get("journal", "")
        match = re.fullmatch(rf"arXiv preprint arXiv:({ARXIV_ID})", journal)
        if match:
            assert match.group(1) not in by_id, f"arXiv {match.group(1)} has two entries"
            by_id[match.group(1)] = fields(entry)
    return by_id


def test_entries_parse_with_unique_keys():
    assert len(ENTRIES) >= 14  # the software, EBPO/HA-DW/GBMPO, 8 baselines, 2 allocation papers
    keys = []
    for entry in ENTRIES:
        header = re.match(r"@(\w+)\{([\w:-]+),\n", entry)
        assert header, f"an entry must open with @type{{key,\n{entry}"
        keys.append(header.group(2))
        assert entry.count("{") == entry.count("}"), f"unbalanced braces in {header.group(2)}"
        entry_fields = fields(entry)
        # The software entry leaves the year to the user (the copy they ran); a paper has one.
        required = {"title", "year"} if header.group(1) == "article" else {"title"}
        assert required <= entry_fields.keys(), header.group(2)
        # Authors come from a source that was read, or the entry says where to find them (never a guess).
        assert "author" in entry_fields or re.search(rf"% authors: see arXiv:{ARXIV_ID}", entry), header.group(2)
    assert len(keys) == len(set(keys)), f"duplicate BibTeX keys: {sorted(keys)}"


def test_every_arxiv_entry_is_dated_by_its_id():
    """An arXiv id starts with the year and month of submission (YYMM), so the year field has to match it."""
    entries = arxiv_entries()
    assert entries
    for arxiv_id, entry_fields in entries.items():
        assert entry_fields["year"] == f"20{arxiv_id[:2]}", f"arXiv {arxiv_id}: year {entry_fields['year']}"


def test_every_paper_the_code_cites_has_an_entry():
    cited = {
        match
        for path in (ROOT / "src" / "ebpo").rglob("*.py")
        for match in re.findall(rf"arXiv[ :]({ARXIV_ID})", path.read_text())
    }
    assert cited
    missing = sorted(cited - arxiv_entries().keys())
    assert not missing, f"papers cited in src/ebpo without BibTeX in docs/citing.md: {missing}"


@pytest.mark.parametrize("name", ESTIMATORS.names())
def test_every_estimator_is_cited(name):
    assert f"`--estimator {name}`" in CITING, f"docs/citing.md names no paper for --estimator {name}"


@pytest.mark.parametrize("name", sorted(set(ALLOCATORS.names()) - UNCITED_ALLOCATORS))
def test_every_allocation_from_a_paper_is_cited(name):
    assert f"(allocation `{name}`)" in CITING, f"docs/citing.md names no paper for allocation {name}"


def test_the_readme_points_to_the_bibtex():
    citing_section = (ROOT / "README.md").read_text().split("## Citing", 1)[1].split("\n## ", 1)[0]
    assert "[docs/citing.md](docs/citing.md)" in citing_section
    for method in ("JSPO", "SPO", "KRPO", "GRESO", "Knapsack RL"):
        assert method in citing_section, method
