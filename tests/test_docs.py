"""The documentation's own rules, checked fast (`make docs` builds the site, `make readme`
runs its examples): README stays short and links the site, every page is in the site's
navigation, and the rendered notebooks are executed copies of today's notebooks."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from conftest import ROOT
from readme_check import DOCS, README, documents

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
COPIES = DOCS / "cuadernos"
# written by the build itself
GENERATED = {"reference/cli.md", "reference/spec.md", "reference/settings.md"}


def _pages() -> list[Path]:
    return [
        path
        for path in DOCS.rglob("*.md")
        if not path.relative_to(DOCS).parts[0].startswith("_")
        and path.relative_to(DOCS).parts[:2] != ("reference", "api")
        and str(path.relative_to(DOCS)) not in GENERATED
    ]


def test_readme_is_short_and_links_the_site():
    text = README.read_text("utf-8")
    assert len(text.splitlines()) <= 300
    for page in ("docs/getting-started.md", "docs/primeros-pasos.md", "docs/statistics.md"):
        assert f"]({page})" in text, f"README does not link {page}"


def test_every_page_is_in_the_navigation_and_checked_in_order():
    """docs/index.md's toctrees are the navigation and the checker's reading order: a page
    outside them would be neither shown in the menu nor have its examples run."""
    checked = set(documents())
    missing = [str(p.relative_to(ROOT)) for p in _pages() if p not in checked]
    assert missing == [], f"pages not in docs/index.md's toctree: {missing}"


def test_every_page_starts_with_its_one_title():
    for page in _pages():
        lines = page.read_text("utf-8").splitlines()
        outside, fence = [], False
        for line in lines:
            fence ^= line.startswith("```")
            if not fence:
                outside.append(line)
        titles = [line for line in outside if re.match(r"^# \S", line)]
        assert lines[0].startswith("# ") and len(titles) == 1, f"{page}: titles {titles}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_site_renders_an_executed_copy_of_each_notebook(path: Path):
    copy = COPIES / path.name
    assert copy.is_file(), f"no rendered copy of {path.name}: run `make docs-notebooks`"
    source, executed = (nbformat.read(p, as_version=4) for p in (path, copy))
    code = [[c.source for c in nb.cells if c.cell_type == "code"] for nb in (source, executed)]
    assert code[0] == code[1], (
        f"docs/cuadernos/{path.name} is not today's {path.name}: run `make docs-notebooks`"
    )
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    assert outputs, f"docs/cuadernos/{path.name} has no outputs: it was not executed"
    assert not [o for o in outputs if o.output_type == "error"]


def test_no_copy_without_its_notebook():
    names = {p.name for p in NOTEBOOKS}
    assert [p.name for p in COPIES.glob("*.ipynb") if p.name not in names] == []
