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
exclude_patterns = ["_build", "_ext", "cuadernos/figures", "Thumbs.db", ".DS_Store"]

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
# autodoc2 shows a constant's value as reStructuredText: a regex full of `[...]` and `\p{L}`
# reads as broken link targets there (the module docstring names the pattern).
autodoc2_hidden_regexes = [r"muestra\.models\.kit\.tokenizer\.QWEN_PRETOKENIZE_PATTERN"]
autodoc2_index_template = None


def _analyse_muestra_only() -> None:
    """sphinx-autodoc2 reads the source with astroid, which follows every import it meets to
    infer names: into torch and transformers, whole, for each module that imports them —
    60 % of the build's time (276 of 450 s, profiled) for nothing the pages show. astroid
    is told those modules are not there: muestra's own and the built-ins are analysed,
    every other import stays a name."""
    from astroid.exceptions import AstroidImportError
    from astroid.manager import AstroidManager

    load = AstroidManager.ast_from_module_name

    def ours_only(self, modname, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if modname and modname != "builtins" and modname.split(".")[0] != "muestra":
            raise AstroidImportError(f"{modname} is not analysed for muestra's API pages")
        return load(self, modname, *args, **kwargs)

    AstroidManager.ast_from_module_name = ours_only


_analyse_muestra_only()


def _reexports() -> list[tuple[str, str]]:
    """`muestra.engine.Sample` → `muestra.engine.rows.Sample`: a class imported into another
    module is named by its importers' annotations but documented where it is defined."""
    import importlib
    import pkgutil

    import muestra

    skip = ("muestra.cli", "muestra.server", "muestra.allocator", "muestra.demo",
            "muestra.__main__")  # fmt: skip
    found = []
    for info in pkgutil.walk_packages(muestra.__path__, "muestra."):
        if info.name.startswith(skip):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            home = getattr(obj, "__module__", "") or ""
            if isinstance(obj, type) and home.startswith("muestra.") and home != info.name:
                found.append((f"{info.name}.{name}", f"{home}.{obj.__qualname__}"))
    return found


autodoc2_replace_annotations = _reexports()


def _resolve_by_name(app, env, node, contnode):  # noqa: ANN001, ANN202
    """sphinx-autodoc2 reads annotations statically and sometimes names the wrong module
    for a class (`muestra.engine.rows.RowTensors` for batch.py's own `RowTensors`). Such a
    reference resolves when exactly one documented muestra object has that name; any other
    missing reference stays a warning (an error under -W)."""
    from sphinx.util.nodes import make_refnode

    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or not target.startswith("muestra."):
        return None
    name = "." + target.rsplit(".", 1)[-1]
    objects = env.get_domain("py").objects
    matches = [full for full in objects if full.endswith(name) and full.startswith("muestra.")]
    if len(matches) != 1:
        return None
    entry = objects[matches[0]]
    return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode,
                        matches[0])  # fmt: skip


def setup(app):  # noqa: ANN001, ANN201
    app.connect("missing-reference", _resolve_by_name)


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
