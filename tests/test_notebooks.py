"""The five notebooks in `notebooks/` (seeds 000–004 redone with muestra) run top to
bottom at test scale (`MUESTRA_NB_ESCALA=prueba`: the parameter cell's small counts) on
the real models, through `notebooks/execute.py` (the command that writes the docs'
executed copies), show nothing a reader should not see (`execute.problems`: errors,
stderr noise, stuck progress bars, bare numbers, nan), and are committed without outputs.
Every notebook offers Gemma 3 270M behind a visible acceptance of its terms."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import nbformat
import pytest

from conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_five_notebooks_one_per_seed_and_readme_links_them():
    assert [p.name[:3] for p in NOTEBOOKS] == ["000", "001", "002", "003", "004"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for path in NOTEBOOKS:
        assert f"notebooks/{path.name}" in readme, f"README does not link {path.name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_are_committed_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name} cell {index} has outputs: clear them before committing"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_offers_gemma_behind_its_terms_and_says_how_long_it_takes(path: Path):
    nb = nbformat.read(path, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    text = "\n".join(c.source for c in nb.cells)
    assert "ACEPTO_TERMINOS_GEMMA = False" in code and "https://ai.google.dev/gemma/terms" in code
    assert 'ensure_kit("gemma-3-270m", accept_terms=True)' in code
    assert "Cuánto tarda a escala completa" in text, f"{path.name}: say how long it takes"
    assert "SmolLM2" in nb.cells[0].source, f"{path.name}: say what SmolLM2 can show"


def test_problems_finds_what_a_reader_should_not_see():
    from notebooks.execute import problems

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x")]
    nb.cells[0].outputs = [
        nbformat.v4.new_output("execute_result", {"text/plain": "881"}, execution_count=1),
        nbformat.v4.new_output("stream", name="stderr", text="Gemma3 LOAD REPORT from: x"),
        nbformat.v4.new_output("stream", name="stdout", text="AUROC del acuerdo: nan [nan, nan]"),
        nbformat.v4.new_output("display_data", {"text/plain": "  0%|          | 0/16"}),
    ]
    found = problems(nb)
    assert len(found) == 4, found
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text="AUROC 0.75")]
    assert problems(nb) == []


def test_000s_experiments_are_valid_specs_at_full_scale(tiny_kit, tmp_path, monkeypatch):
    """The specs notebook 000 writes at full scale load: its cells up to each
    `mn.experiment` run with the full counts, the experiment only loaded, not run (the
    test scale cannot show this: its 4 samples fitted the beam condition's `num_beams =
    4`, and the full scale's 50 were refused, found when the docs' copies were made)."""
    import muestra.notebook as mn
    from muestra.experiments.spec import load_spec

    env = {"MUESTRA_NB_ESCALA": "completa", "MUESTRA_NB_TRABAJO": str(tmp_path),
           "MUESTRA_NB_SMOL": str(tiny_kit), "MUESTRA_NB_GEMMA": ""}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    loaded = []

    def experiment(path, *args, **kwargs):  # the run's spec, loaded and not run
        loaded.append(load_spec(path))
        return types.SimpleNamespace(stops=None)

    monkeypatch.setattr(mn, "experiment", experiment)
    nb = nbformat.read(ROOT / "notebooks" / "000_personajes.ipynb", as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    first = next(i for i, source in enumerate(code) if "mn.experiment(" in source)
    module = types.ModuleType("cuaderno_000")  # pydantic resolves the schema's types here
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for source in code[: first + 1] + [s for s in code if "ESPEC_SECUENCIAL =" in s]:
        exec(compile(source, "000_personajes", "exec"), module.__dict__)
    sampled, sequential = loaded
    assert sampled.spec.samples == sequential.spec.samples == 50
    assert {c.think.num_beams for c in sampled.conditions} == {50}
    assert not any(c.think.strategy == "beam" for c in sequential.conditions)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_a_notebook_runs_top_to_bottom(path: Path, smol_kit, tmp_path, monkeypatch):
    """As a student who has not accepted Gemma's terms (the default): the SmolLM2 path
    of every section, and the "Sin Gemma" cells. With the terms accepted, whole sections
    run on Gemma 3 270M on torch instead (001's continuations, 002's probe, 004's facts
    and DoLa), whose 262,144-token output layer made them the suite's slowest tests:
    `make docs-notebooks ACCEPT_GEMMA_TERMS=1` runs that path (the docs' copies), and
    `make readme` runs Gemma's findings through the CLI (docs/guide/gemma.md)."""
    from notebooks.execute import execute, figures, problems

    monkeypatch.setenv("MUESTRA_NB_SMOL", str(smol_kit))
    # MUESTRA_NB_GEMMA empty: the notebook's own switch decides, and it is False
    env = {"MUESTRA_NB_ESCALA": "prueba", "MUESTRA_NB_TRABAJO": str(tmp_path),
           "MUESTRA_NB_GEMMA": ""}  # fmt: skip
    nb = execute(path, env, timeout=900)  # a cell that raises fails the test, naming the cell
    assert problems(nb) == []
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    if '"Sin Gemma' in code:  # a section that needs Gemma says why it did not run
        outputs = [str(out) for cell in nb.cells for out in cell.get("outputs", [])]
        assert any("Sin Gemma" in out for out in outputs), f"{path.name} ran without saying so"
    assert figures(nb) or path.name.startswith("003"), f"{path.name} drew no figure"
