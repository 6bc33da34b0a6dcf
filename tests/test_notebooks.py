"""The chapters' text as the book's parser reads it, and the values their prose refers to.

Every markdown cell of every source notebook is parsed by MyST's markdown-it parser with the
extensions the book enables (`dollarmath`, `colon_fence`, ...). Heading soup fails: a line of
prose rendered as a heading, maths inside a heading, more than a couple of headings in one cell.
"""

import re

import nbformat
import pytest
from myst_parser.config.main import MdParserConfig
from myst_parser.mdit_to_docutils.base import DocutilsRenderer
from myst_parser.parsers.mdit import create_md_parser

from fasttrain_course.paths import chapters

PARSER = create_md_parser(MdParserConfig(enable_extensions={"dollarmath", "colon_fence", "linkify", "substitution",
                                                             "tasklist"}), DocutilsRenderer)
GLUE_ROLE = re.compile(r"\{glue(?::[a-z]+)?\}`([^`]+)`")


def headings(source: str) -> list[tuple[str, str]]:
    """(tag, text) of every heading in a markdown source."""
    tokens = PARSER.parse(source)
    return [(tok.tag, tokens[i + 1].content) for i, tok in enumerate(tokens) if tok.type == "heading_open"]


def heading_problems(source: str) -> list[str]:
    found = headings(source)
    problems = []
    if len(found) > 2:
        problems.append(f"{len(found)} headings in one cell")
    for tag, text in found:
        if "$" in text or "\\(" in text or "\\[" in text:
            problems.append(f"maths in a heading: {text[:60]!r}")
        if text.startswith("#"):
            problems.append(f"a heading that starts with '#': {text[:60]!r}")
        words = len(text.split())
        if words > 16 or (words > 8 and text.rstrip().endswith((".", ",", ";", ":"))):
            problems.append(f"prose rendered as a heading: {text[:60]!r}")
    return problems


def test_the_check_catches_heading_soup_and_passes_real_headings():
    assert heading_problems("# 3. VGG blocks: what a layer costs\n\nSome text with $x$ maths.") == []
    soup = "# # 3. VGG blocks\n#\n# The first two chapters trained small networks and made the loop fast.\n# $$ x $$"
    assert heading_problems(soup), "commented-out markdown must be caught"
    assert heading_problems("## The rate $\\eta$ and the batch")


@pytest.mark.parametrize("slug", chapters(__import__("pathlib").Path(__file__).resolve().parent.parent))
def test_markdown_cells_render_as_prose_not_as_headings(repo_root, slug):
    nb = nbformat.read(str(repo_root / "solutions" / slug / f"{slug}.ipynb"), as_version=4)
    problems = [f"cell {c.get('id')}: {p}" for c in nb.cells if c.cell_type == "markdown"
                for p in heading_problems(c.source)]
    assert not problems, f"{slug}:\n  " + "\n  ".join(problems)
    titles = [t for c in nb.cells if c.cell_type == "markdown" for tag, t in headings(c.source) if tag == "h1"]
    assert len(titles) == 1, f"{slug} must have exactly one title (h1), has {titles}"


def glue_references(nb: nbformat.NotebookNode) -> set[str]:
    return {key for c in nb.cells if c.cell_type == "markdown" for key in GLUE_ROLE.findall(c.source)}


def glued_keys(nb: nbformat.NotebookNode) -> set[str]:
    return {out.get("metadata", {}).get("scrapbook", {}).get("name") for c in nb.cells if c.cell_type == "code"
            for out in c.get("outputs", []) if out.get("metadata", {}).get("scrapbook")}


def test_every_glue_key_a_recorded_page_refers_to_is_defined_by_its_run(repo_root):
    runs = [p for p in (repo_root / "runs").glob("*/*.ipynb")] + list((repo_root / "_build" / "executed").glob("*/*.ipynb"))
    for path in runs:
        nb = nbformat.read(str(path), as_version=4)
        missing = glue_references(nb) - glued_keys(nb)
        assert not missing, f"{path.relative_to(repo_root)} refers to glue keys its run never defined: {sorted(missing)}"


GLUED_NAME = re.compile(r"\brun\.(?:glue|metric)\(\s*[\"']([A-Za-z0-9_]+)[\"']")


@pytest.mark.parametrize("slug", chapters(__import__("pathlib").Path(__file__).resolve().parent.parent))
def test_no_glue_key_is_defined_twice(repo_root, slug):
    """myst-nb refuses a page whose run glued one key twice (run.metric glues under the metric's name too)."""
    nb = nbformat.read(str(repo_root / "solutions" / slug / f"{slug}.ipynb"), as_version=4)
    names = [name for c in nb.cells if c.cell_type == "code" for name in GLUED_NAME.findall(c.source)]
    twice = sorted({n for n in names if names.count(n) > 1})
    assert not twice, f"{slug} glues {twice} more than once: give each value one name"
