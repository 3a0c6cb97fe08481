"""The Python API for notebooks (`muestra.notebook`): result objects render as HTML and
text, convert to pandas, and draw figures whose numbers are the analysis' own — the same
ones `muestra report` draws."""

from __future__ import annotations

import re

import numpy as np
import pytest

import muestra.notebook as mn
from muestra.analysis.accuracy import accuracy, discrimination
from muestra.analysis.probes import GroupDifference
from muestra.errors import InputError
from muestra.report import plots

SPEC = """
name = "colores"
seed = 3
samples = 6

[model]
id = "{model}"

[prompt]
user = "Di un color para {{cosa}}"

[[prompt.items]]
id = "cielo"
cosa = "el cielo"

[[prompt.items]]
id = "hierba"
cosa = "la hierba"

[answer]
choice = ["rojo", "azul", "verde"]

[sweep]
"answer.temperature" = [0.5, 1.5]
"""


@pytest.fixture(scope="module")
def run(tiny_kit, tmp_path_factory):
    folder = tmp_path_factory.mktemp("api")
    (folder / "colores.toml").write_text(SPEC.format(model=tiny_kit))
    return mn.experiment(folder / "colores.toml", folder / "colores.db", progress=False)


def _bar_heights(fig) -> list[float]:
    return [p.get_height() for p in fig.axes[0].patches]


def _points(fig) -> list[float]:
    """The x of each point drawn with an error bar (one `errorbar` call per point)."""
    return [c.lines[0].get_xdata()[0] for c in fig.axes[0].containers]


def test_an_experiment_renders_converts_and_reopens(run):
    assert run.status == "done" and len(run.samples) == 24  # 2 prompts × 2 conditions × 6
    html = run._repr_html_()
    assert "<table" in html and "colores" in html and "samples per cell" in html
    assert "run 1 · colores · done · 24 samples" in repr(run)
    again = mn.open_run(run.store)
    assert again.run_id == run.run_id and again.samples.equals(run.samples)
    with pytest.raises(InputError, match="no such store"):
        mn.open_run(run.store.with_name("missing.db"))


def test_the_analysis_table_html_and_text_hold_its_numbers(run):
    view = run.analysis()
    table = view.to_pandas()
    records = [
        (d.group, v.value, v.proportion) for d in view.analysis.distributions for v in d.values
    ]
    assert list(zip(table.group, table.value, table.proportion, strict=True)) == records
    html = view._repr_html_()
    text = repr(view)
    for _, row in table.iterrows():
        assert f"{row.proportion:.3f}" in html and f"{row.proportion:.3f}" in text
    assert set(view.table("comparisons").columns) >= {"a", "b", "difference", "low", "high"}
    with pytest.raises(ValueError, match="not one of"):
        view.table("nothing")


def test_the_bars_are_the_analysis_shares_and_the_reports_too(run):
    """The notebook's bars, the analysis' records and the HTML report's bars: one set of
    numbers."""
    from muestra.evaluation.runs import stored_analysis
    from muestra.report.html import render

    view = run.analysis()
    fig = view.plot("answer")
    dists = [d for d in view.analysis.distributions if d.field == "answer"]
    values = [v.value for v in dists[0].values]
    expected = [  # matplotlib draws one value's bars across the prompts, value by value
        next(s.proportion for s in d.values if s.value == value) for value in values for d in dists
    ]
    assert _bar_heights(fig) == pytest.approx(expected)
    bars = next(c for c in fig.axes[0].containers if hasattr(c, "errorbar"))
    whiskers = bars.errorbar.lines[2][0].get_segments()
    first = next(s for s in dists[0].values if s.value == values[0])
    assert whiskers[0][:, 1] == pytest.approx([first.low, first.high], abs=1e-9)
    found = stored_analysis(run.store)
    report = render(found.run, found.models, found.frame, found.analysis)
    chart = report.split('data-field="answer"')[1].split("</svg>")[0]
    bar = r'class="bar" data-value="[^"]*" data-prompt="[^"]*" data-share="([^"]+)"'
    shares = [float(x) for x in re.findall(bar, chart)]
    report_order = [s.proportion for d in dists for s in d.values]  # prompt by prompt
    assert shares == pytest.approx(report_order, abs=1e-4)


def test_pooled_field_probs_and_forest_plots_show_their_records(run):
    a = run.analysis().analysis
    by_condition = run.analysis().plot("answer", by="condition")
    pooled = [p for p in a.pooled if p.field == "answer" and p.by == "condition"]
    levels = list(dict.fromkeys(p.level for p in pooled))
    values = list(dict.fromkeys(p.value for p in pooled))
    expected = [
        next(p.share for p in pooled if p.level == lv and p.value == v)
        for v in values
        for lv in levels
    ]
    assert _bar_heights(by_condition) == pytest.approx(expected)
    probs = run.analysis().plot_field_probs("answer")
    points = probs.axes[0].lines[0].get_xdata()
    assert list(points) == pytest.approx(
        [r.mean_probability for r in a.field_probs if r.field == "answer"]
    )
    forest = run.analysis().plot_differences()
    assert _points(forest) == pytest.approx([c.difference for c in a.comparisons])
    with pytest.raises(ValueError, match="use prompt, condition or model"):
        run.analysis().plot("answer", by="colour")


def test_an_evaluation_view_plots_its_accuracies(tiny_kit, tmp_path):
    ev = mn.evaluate(str(tiny_kit), "easy-en", "choice,loglik", store=tmp_path / "e.db", n=3,
                     progress=False)  # fmt: skip
    frame = ev.to_pandas()
    assert list(frame.method) == ["choice", "loglik"] and list(frame.total) == [3, 3]
    assert _bar_heights(ev.plot()) == pytest.approx([r.accuracy.value for r in ev.results])
    assert "paired comparisons" in ev._repr_html_() and "easy-en" in repr(ev)
    assert len(ev.items()) == 6
    reopened = mn.open_evaluations(tmp_path / "e.db")
    assert reopened.to_pandas().accuracy.tolist() == frame.accuracy.tolist()
    with pytest.raises(ValueError, match="only `vote` evaluations"):
        ev.plot_votes()


def test_evaluate_refuses_unknown_and_unused_settings_by_name(tiny_kit, tmp_path):
    with pytest.raises(InputError, match="temprature: not a setting"):
        mn.evaluate(str(tiny_kit), "easy-en", "choice", temprature=0.5, progress=False)
    with pytest.raises(InputError, match=r"think_budget \(cot, vote\)"):
        mn.evaluate(str(tiny_kit), "easy-en", "loglik", think_budget=8, progress=False)
    assert not list(tmp_path.iterdir())  # refused before any store


def test_group_differences_and_calibration_plots_draw_their_numbers():
    rows = [
        GroupDifference("lexicon:care", "mujer", "hombre", 0.4, 0.1, 0.3, 0.1, 0.5, 0.01, 10),
        GroupDifference("lexicon:manual", "mujer", "hombre", 0.1, 0.2, -0.1, -0.3, 0.1, 0.3, 10),
    ]
    fig = plots.group_differences(rows)
    assert _points(fig) == pytest.approx([0.3, -0.1])
    found = discrimination([0.9, 0.8, 0.7, 0.3, 0.2, 0.35], [True, True, True, False, False, True])
    fig = plots.calibration(found)
    assert "AUROC" in fig.axes[0].get_title()
    ys = fig.axes[0].lines[1].get_ydata()
    assert list(ys) == pytest.approx([acc.value for *_, acc in found.bins])


def test_discrimination_is_the_probability_a_right_answer_scores_higher():
    assert discrimination([0.9, 0.8, 0.2, 0.1], [True, True, False, False]).auroc == 1.0
    assert discrimination([0.9, 0.8, 0.2, 0.1], [False, False, True, True]).auroc == 0.0
    assert discrimination([0.5, 0.5, 0.5, 0.5], [True, False, True, False]).auroc == 0.5
    # one of the four right/wrong pairs is ordered the wrong way: 3/4
    found = discrimination([0.9, 0.4, 0.5, 0.1], [True, True, False, False])
    assert found.auroc == 0.75 and found.low <= 0.75 <= found.high
    assert [(edge, acc.total) for edge, _, acc in found.bins] == [(0.0, 1), (0.4, 2), (0.8, 1)]
    assert sum(acc.correct for *_, acc in found.bins) == 2
    rng = np.random.default_rng(0)
    scores = rng.random(400)
    found = discrimination(scores, rng.random(400) < scores)  # P(right) = score: AUROC 5/6
    assert found.low < 5 / 6 < found.high
    with pytest.raises(ValueError, match="one score per answer"):
        discrimination([0.1], [True, False])


def test_accuracy_bars_and_whiskers():
    fig = plots.accuracies([("a", accuracy([True, False, True])), ("b", accuracy([False] * 4))])
    assert _bar_heights(fig) == pytest.approx([2 / 3, 0.0])
