"""The documentation: every relative link resolves, and the generated tables match their result rows."""
import re
from pathlib import Path

import pytest

from dds.bench.training import TABLE_BLOCK, regenerate_tables

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_resolves(doc):
    text = doc.read_text()
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
            broken.append(target)
    assert not broken, f"{doc.name}: broken links {broken}"


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    toc = text[: text.index("## Install")]
    assert "own data" in toc and "own training loop" in toc


@pytest.mark.parametrize("doc", [d for d in DOCS if TABLE_BLOCK.search(d.read_text())], ids=lambda p: p.name)
def test_generated_tables_match_their_rows(doc):
    assert regenerate_tables(doc) == doc.read_text(), f"run: dds bench-table --update {doc.relative_to(ROOT)}"
