"""The documentation as a door: a short README, every docs page reachable from it, and no broken relative link."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def relative_links(page: Path) -> list[str]:
    """The link targets of a Markdown page that point into the repository (no web address, no anchor alone)."""
    targets = LINK.findall(page.read_text(encoding="utf-8"))
    return [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def test_the_readme_is_at_most_300_lines() -> None:
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 300


def test_every_relative_link_resolves_to_a_file() -> None:
    broken = [f"{page.relative_to(REPO)}: {target}" for page in PAGES for target in relative_links(page)
              if not (page.parent / target).exists()]
    assert not broken, broken


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(REPO / target).resolve() for target in relative_links(REPO / "README.md")}
    assert [p for p in PAGES[1:] if p.resolve() not in linked] == []
