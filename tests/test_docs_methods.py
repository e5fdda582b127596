"""docs/methods.md stays in step with the code: anchors that code cites exist, every registered name is documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import ebpo
from ebpo.curriculum import list_curricula
from ebpo.train.presets import list_methods

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "docs" / "methods.md"


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub generates for the headings of ``markdown``.

    Lower case; characters other than letters, digits, spaces, hyphens and
    underscores dropped; spaces become hyphens; a repeated heading gets -1, -2, ...
    Headings inside fenced code blocks are not headings.
    """
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    in_fence = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if in_fence or not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def cited_anchors() -> dict[str, list[str]]:
    """anchor -> files citing it: ``docs/methods.md#x`` in src/ and tests/, ``methods.md#x`` links in docs/ and README."""
    citations: dict[str, list[str]] = {}
    sources = [(p, r"docs/methods\.md#([\w-]+)") for p in sorted((ROOT / "src").rglob("*.py"))]
    sources += [(p, r"docs/methods\.md#([\w-]+)") for p in sorted((ROOT / "tests").rglob("*.py"))]
    sources += [(p, r"\(methods\.md#([\w-]+)\)") for p in sorted((ROOT / "docs").glob("*.md"))]
    sources += [(ROOT / "README.md", r"\(docs/methods\.md#([\w-]+)\)")]
    for path, pattern in sources:
        if path == Path(__file__).resolve():
            continue  # this file's own examples are not citations
        for anchor in re.findall(pattern, path.read_text(encoding="utf-8")):
            citations.setdefault(anchor, []).append(str(path.relative_to(ROOT)))
    return citations


def test_github_anchor_rule():
    text = "# Title\n## Dr. GRPO\n## Hierarchical prior (per topic)\n```\n## not a heading\n```\n## KL-Cov\n## KL-Cov\n"
    assert github_anchors(text) == {"title", "dr-grpo", "hierarchical-prior-per-topic", "kl-cov", "kl-cov-1"}


def test_every_cited_section_exists():
    anchors = github_anchors(METHODS.read_text(encoding="utf-8"))
    citations = cited_anchors()
    assert len(citations) >= 8, "the docstrings cite docs/methods.md sections; the scan found almost none"
    missing = {anchor: files for anchor, files in citations.items() if anchor not in anchors}
    assert not missing, f"sections cited but absent from docs/methods.md: {missing}"


def test_nothing_cites_the_internal_spec():
    offenders = [
        str(path.relative_to(ROOT))
        for path in [
            *(ROOT / "src").rglob("*.py"),
            *(ROOT / "tests").rglob("*.py"),
            *(ROOT / "docs").glob("*.md"),
            ROOT / "README.md",
        ]
        if path != Path(__file__).resolve() and re.search(r"METHODS\.md", path.read_text(encoding="utf-8"))
    ]
    assert not offenders, f"cite docs/methods.md, not the internal METHODS.md: {offenders}"


@pytest.mark.parametrize(
    "kind,names",
    [
        ("estimator", ebpo.list_estimators()),
        ("weighting", ebpo.list_weightings()),
        ("policy loss", ebpo.list_policy_losses()),
        ("aggregation", ebpo.list_aggregations()),
        ("divergence", ebpo.list_divergences()),
        ("curriculum", list_curricula()),
        ("--method preset", list_methods()),
    ],
)
def test_every_registered_name_is_documented(kind, names):
    text = METHODS.read_text(encoding="utf-8")
    assert names, f"no {kind} registered"
    undocumented = [name for name in names if f"`{name}`" not in text]
    assert not undocumented, f"{kind} names missing from docs/methods.md (write them as `name`): {undocumented}"


def test_every_test_the_page_names_exists():
    text = METHODS.read_text(encoding="utf-8")
    named = set(re.findall(r"`(test_\w+)`", text))
    defined = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(encoding="utf-8"), re.MULTILINE))
    assert len(named) >= 40
    assert not named - defined, f"docs/methods.md names tests that do not exist: {sorted(named - defined)}"
