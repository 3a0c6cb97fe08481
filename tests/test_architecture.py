"""The package's shape, read from its source: imports point down the layers of DESIGN.md,
no two modules import each other (directly or around a circle, counting imports inside
functions and under TYPE_CHECKING), and no module uses another module's private names."""

from __future__ import annotations

import ast
import graphlib
from collections import defaultdict
from pathlib import Path

from conftest import ROOT

SRC = ROOT / "src"

# the layers, bottom up (DESIGN.md); an import must go to a lower rank
RANK = {
    "errors": 0,
    "version": 0,
    "limits": 1,
    "settings": 1,
    "paths": 1,
    "allocator": 1,
    "models": 2,
    "engine": 3,
    "answers": 4,
    "analysis": 5,
    "report": 6,
    "experiments": 7,
    "server": 7,
    "evaluation": 8,
    "cli": 9,
    "notebook": 9,  # the Python API for notebooks: an edge beside the CLI
    "demo": 10,
    "__main__": 11,
    "muestra": 11,  # the package's facade: the names a notebook reaches for
}


def modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "muestra").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def import_edges() -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("muestra"):
                assert node.module is not None
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.append(full if full in known else node.module)
            elif isinstance(node, ast.Import):
                targets += [a.name for a in node.names if a.name.startswith("muestra")]
            edges[name] |= {t for t in targets if t != name}
    return edges


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_no_module_imports_itself_around_a_circle():
    try:
        graphlib.TopologicalSorter(import_edges()).prepare()
    except graphlib.CycleError as error:
        raise AssertionError(f"an import circle: {' -> '.join(error.args[1])}") from None


def test_every_import_points_down_the_layers():
    edges = import_edges()
    unranked = {layer(m) for m in modules()} - set(RANK)
    assert not unranked, f"give these folders/modules a layer in RANK: {sorted(unranked)}"
    upward = sorted(
        f"{a} -> {b}"
        for a, targets in edges.items()
        for b in targets
        if layer(a) != layer(b) and RANK[layer(a)] <= RANK[layer(b)]
    )
    assert not upward, "imports that do not point down:\n" + "\n".join(upward)


def test_no_module_uses_another_modules_private_names():
    """`from muestra.x import _name`, or `thing._name` where no `_name` is defined in the
    module that reads it (a private attribute of another module's class)."""
    found = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        own: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                own.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                own.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("muestra"):
                found += [
                    f"{name}: from {node.module} import {alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_") and not alias.name.startswith("__")
                ]
            elif (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                and node.attr not in own
            ):
                found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "private names used across modules:\n" + "\n".join(found)


# ---- the settings' single declaration ---------------------------------------------------

SETTINGS_MODULE = "muestra.settings"


def sampling_spellings() -> set[str]:
    """Every way code can name a sampling setting: its name (`top_p`), its flag's
    parameter for a phase (`think_top_p`, `answer_top_p`) and its flags (`--top-p`,
    `--think-top-p`, `--answer-top-p`), read from the declaration itself."""
    from muestra.settings import NAMES, flag

    found = set()
    for name in NAMES:
        for prefix in ("", "think_", "answer_"):
            found |= {prefix + name, flag(name, prefix)}
    return found


def string_uses(source: str, spellings: set[str]) -> list[tuple[int, str]]:
    """(line, text) of each string constant in `source` that is exactly a spelling (a
    docstring or a sentence that mentions a setting is not: it is not a key)."""
    return [
        (node.lineno, node.value)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        and node.value in spellings
    ]  # fmt: skip


def test_the_check_finds_a_setting_named_outside_its_declaration():
    spellings = sampling_spellings()
    source = (
        '"""top_p is mentioned here, and that is fine."""\n'
        'FIELDS = ("temperature", "top_p")\n'
        'value = getattr(body, "min_p")\n'
        'flags = {"answer_top_k": 1, "--think-top-p": 2}\n'
        'message = f"top_p {value} must be in (0, 1]"\n'
    )
    found = string_uses(source, spellings)
    assert [text for _, text in found] == [
        "temperature", "top_p", "min_p", "answer_top_k", "--think-top-p"
    ]  # fmt: skip
    assert {line for line, _ in found} == {2, 3, 4}


def test_sampling_settings_are_named_only_where_they_are_declared():
    """A sampling setting's name, phase parameter or flag written as a string anywhere
    in the package but muestra/settings.py is a second declaration of it (a tuple of
    names, a dict key, a hand-written flag): derive it from `muestra.settings` instead."""
    spellings = sampling_spellings()
    found = [
        f"{name}:{line}: {text!r}"
        for name, path in modules().items()
        if name != SETTINGS_MODULE
        for line, text in string_uses(path.read_text(encoding="utf-8"), spellings)
    ]
    assert not found, "sampling settings named outside muestra/settings.py:\n" + "\n".join(found)


def test_the_engine_and_the_declaration_hold_the_same_settings():
    from dataclasses import fields

    from muestra.engine import SamplingParams
    from muestra.settings import DEFAULT, NAMES

    engine = {f.name: f.default for f in fields(SamplingParams) if f.name != "logit_bias"}
    assert set(engine) == set(NAMES)
    assert engine == {name: getattr(DEFAULT, name) for name in NAMES}


LONGEST = 80  # lines; a longer function says in its docstring why it is one piece


def test_no_long_function_without_the_reason_it_is_one_piece():
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if length > LONGEST and "one piece" not in (ast.get_docstring(node) or ""):
                    found.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    assert not found, f"functions over {LONGEST} lines:\n" + "\n".join(found)
