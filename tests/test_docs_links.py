"""Every relative link in README.md and docs/*.md reaches a file of the repository, and every
``#anchor`` a heading of its target (GitHub's heading ids), so the documentation cannot point
outside the repository or at a section that was renamed."""

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's id of a heading: lower case, markup and punctuation dropped, spaces -> '-'."""
    text = heading.replace("`", "").lower()
    keep = (c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return "".join(keep).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    out, seen = set(), {}
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        slug = _slug(line.lstrip("#").strip())
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)        # inline code: `layers[i](hidden)` is no link
    return [m.group(1) for m in LINK.finditer(text)]


def test_slug_matches_githubs_rule():
    assert _slug("The pipeline (epmq_jax.pipeline)") == "the-pipeline-epmq_jaxpipeline"
    assert _slug("E-PMQ's layer objective") == "e-pmqs-layer-objective"
    assert _slug("Limits, and what they tell you") == "limits-and-what-they-tell-you"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    links = _links(page)
    for link in links:
        if re.match(r"[a-z]+:", link):        # http(s), mailto: not checked here
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.is_relative_to(ROOT), f"{page.name}: {link} points outside the repository"
        assert target.exists(), f"{page.name}: {link} does not exist"
        if anchor:
            assert anchor in _anchors(target), f"{page.name}: {link}: no heading with id '{anchor}' in {target.name}"


def test_readme_documentation_links_only_to_the_repository():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Documentation"):].split("\n## ", 1)[0]
    assert "../" not in section and "[docs/method.md](docs/method.md)" in section
