"""The five notebooks in `notebooks/` (seeds 000–004 redone with muestra) run top to
bottom at test scale (`MUESTRA_NB_ESCALA=prueba`: the parameter cell's small counts) on
the real models, and are committed without outputs."""

from __future__ import annotations

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


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_a_notebook_runs_top_to_bottom(path: Path, smol_kit, gemma_kit, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("MUESTRA_NB_ESCALA", "prueba")
    monkeypatch.setenv("MUESTRA_NB_SMOL", str(smol_kit))
    monkeypatch.setenv("MUESTRA_NB_GEMMA", str(gemma_kit))  # the suite accepts Gemma's terms
    monkeypatch.setenv("MUESTRA_NB_TRABAJO", str(tmp_path))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # a cell that raises fails the test, naming the cell
    shown = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in shown if o.output_type == "error"]
    figures = [o for o in shown if "image/png" in o.get("data", {})]
    assert figures or path.name.startswith("003"), f"{path.name} drew no figure"
