"""Sphinx configuration of muestra's documentation site (`make docs`).

Pages are MyST Markdown; the table of contents — the site's navigation, in one place —
is the toctree of index.md. The API reference is generated from the docstrings
(sphinx-autodoc2, which reads them as Markdown, as they are written), the CLI and
spec-key references by _ext/muestra_reference.py, and the notebooks are rendered from
their executed copies in notebooks/ (myst-nb, never executed here). Warnings fail the
build (`-W -n`): a broken link, anchor or API reference is an error.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent / "src"))

from muestra.version import __version__  # noqa: E402

project = "muestra"
author = "the muestra authors"
release = version = __version__
language = "en"

extensions = ["myst_nb", "autodoc2", "muestra_reference"]
exclude_patterns = ["_build", "_incoming", "_ext", "cuadernos/figures", "Thumbs.db", ".DS_Store"]

# ---- MyST -----------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 4  # `[text](page.md#a-heading)` links are checked
suppress_warnings: list[str] = []

# ---- notebooks: rendered as executed (docs/notebooks/*.ipynb), never run by the build ---
nb_execution_mode = "off"
nb_merge_streams = True

# ---- API reference from docstrings (Markdown) -------------------------------------------
autodoc2_packages = [
    {
        "path": "../src/muestra",
        # the edges have their own references: the CLI page and the HTTP API (serving)
        "exclude_dirs": ["__pycache__", "cli", "server"],
        "exclude_files": ["__main__.py", "demo.py", "allocator.py"],
    }
]
autodoc2_output_dir = "reference/api"
autodoc2_render_plugin = "myst"
autodoc2_docstring_parser_regexes = [(r".*", "myst")]
autodoc2_hidden_objects = ["private", "dunder", "inherited"]
autodoc2_index_template = None

# Types of other libraries are named, not linked (no network for intersphinx here): a
# missing target is an error only for muestra's own objects.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(?!muestra\b).*"),
    (r"py:.*", r"muestra\..*\._\w+"),  # a private base class or helper: not documented
]

# ---- HTML ------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"muestra {release}"
html_static_path: list[str] = []
