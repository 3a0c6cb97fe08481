"""The Python API for notebooks (`muestra.notebook`): result objects render as HTML and
text, convert to pandas, and draw figures whose numbers are the analysis' own — the same
ones `muestra report` draws."""

from __future__ import annotations

import re

import numpy as np
import pytest
from matplotlib.colors import to_hex

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


def bad_calls(model: str, folder) -> list[tuple[str, object]]:
    """(the argument a refusal must name, a call): wrong types, counts of 0 or less."""
    spec, store = folder / "colores.toml", folder / "s.db"
    spec.write_text(SPEC.format(model=model))
    return [
        ("n=-1", lambda: mn.evaluate(model, "easy-en", "loglik", n=-1, store=store)),
        ("n=0", lambda: mn.evaluate(model, "easy-en", "loglik", n=0, store=store)),
        ("n='5'", lambda: mn.evaluate(model, "easy-en", "loglik", n="5", store=store)),
        ("samples='3'", lambda: mn.evaluate(model, "easy-en", "vote", samples="3", store=store)),
        ("think_budget=0", lambda: mn.evaluate(model, "easy-en", "cot", think_budget=0,
                                               store=store)),
        ("think_budget=1.5", lambda: mn.evaluate(model, "easy-en", "cot", think_budget=1.5,
                                                 store=store)),
        ("n=True", lambda: mn.compare(model, model, "easy-en", n=True, store=store)),
        ("samples='3'", lambda: mn.experiment(spec, store, samples="3")),
        ("samples=0", lambda: mn.experiment(spec, store, samples=0)),
        ("samples=-2", lambda: mn.probe("occupations-es", model, samples=-2, store=store)),
        ("spec=123", lambda: mn.experiment(123)),
        ("store=None", lambda: mn.open_run(None)),
        ("run=-1", lambda: mn.open_run(store, -1)),
        ("alpha=2", lambda: mn.open_probe(store, alpha=2)),
        ("store=None", lambda: mn.open_evaluations(None)),
        ("model=123", lambda: mn.serve(123)),
        ("port='80'", lambda: mn.serve(model, port="80")),
        ("timeout=0", lambda: mn.Server(model, timeout=0)),
        ("progress='no'", lambda: mn.experiment(spec, store, progress="no")),
    ]  # fmt: skip


def test_every_bad_argument_is_one_line_naming_it_before_any_work(tiny_kit, tmp_path):
    """`evaluate(..., n=-1)` scored 39 of 40 questions and stored it as finished;
    `experiment(samples="3")` failed after seconds with "'<' not supported…"; `open_run(None)`
    and `serve(123)` raised bare TypeErrors. Each is one InputError naming the argument and
    its value, and nothing is written."""
    for argument, call in bad_calls(str(tiny_kit), tmp_path):
        with pytest.raises(InputError) as refused:
            call()
        message = str(refused.value)
        assert argument in message and "\n" not in message and len(message) < 160, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["colores.toml"]


def test_eval_settings_refuse_counts_below_one_for_every_caller():
    from muestra.evaluation.evaluate import EvalSettings

    for bad, words in [({"limit": -1}, "--n"), ({"limit": 0}, "--n"),
                       ({"think_budget": 0}, "--think-budget"), ({"top_p": 0.0}, "--top-p"),
                       ({"temperature": -0.5}, "--temperature")]:  # fmt: skip
        with pytest.raises(InputError, match=words):
            EvalSettings(method="cot", **bad)


def test_group_differences_and_calibration_plots_draw_their_numbers():
    rows = [
        GroupDifference("lexicon:care", "mujer", "hombre", 0.4, 0.1, 0.3, 0.1, 0.5, 0.01, 10),
        GroupDifference("lexicon:manual", "mujer", "hombre", 0.1, 0.2, -0.1, -0.3, 0.1, 0.3, 10),
    ]
    fig = plots.group_differences(rows)
    assert _points(fig) == pytest.approx([0.3, -0.1])
    assert not fig.legends  # no finding: nothing is red, and no legend says why
    # red marks the probe's findings (the rule of its sentences), not the intervals: a
    # finding whose interval touches 0 is red, an interval without a finding is not
    rows[0].low, rows[1].low, rows[1].high = -0.01, 0.05, 0.2
    rows[0].sentence = "a finding"
    fig = plots.group_differences(rows, lang="es")
    colors = [to_hex(c.lines[0].get_color()) for c in fig.axes[0].containers]
    assert colors == [to_hex(plots.PALETTE[2]), to_hex(plots.PALETTE[0])]
    (legend,) = fig.legends
    assert legend.get_texts()[0].get_text().startswith("en rojo: un hallazgo")
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


def test_a_misspelt_keyword_is_one_short_message_with_the_nearest_name(tmp_path):
    """In a Jupyter kernel a user's error shows as its message (no 77-line chained
    pydantic traceback), and an unknown keyword names the nearest one."""
    import nbformat
    from nbclient import NotebookClient

    with pytest.raises(InputError, match="sampels=...\\): no such keyword; did you mean 'samples'"):
        mn.experiment(tmp_path / "x.toml", sampels=3)
    with pytest.raises(InputError, match="did you mean 'temperature'"):
        mn.evaluate("m", "easy-en", "choice", temprature=0.5, progress=False)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "import muestra.notebook as mn\nmn.experiment('x.toml', sampels=3)"
    )]  # fmt: skip
    NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # fmt: skip
    (error,) = [o for o in nb.cells[0].outputs if o.output_type == "error"]
    assert error.ename == "InputError" and "did you mean 'samples'" in error.evalue
    assert len("".join(error.traceback).splitlines()) <= 2, error.traceback


def test_figures_speak_the_notebooks_language_and_stay_readable():
    """Spanish labels with lang="es"; eight values get eight colours; the legend sits
    outside the axes; vote curves tick only at the integer k voted; long tick labels are
    wrapped or turned; two scorings of one model on two runtimes get two labels."""
    from dataclasses import replace
    from pathlib import Path

    from muestra.analysis import Distribution, ValueShare
    from muestra.evaluation.compare import comparison_labels
    from muestra.evaluation.evaluate import EvalResult, settings_for

    values = [ValueShare(f"valor {i}", 1, 1 / 8, 0.0, 0.5) for i in range(8)]
    dists = [Distribution("clase", f"una descripción larga número {g}", 8, values, 0, 0, 1)
             for g in range(14)]  # fmt: skip
    fig = plots.distributions(dists, "clase", lang="es")
    ax = fig.axes[0]
    assert ax.get_ylabel() == "proporción de muestras"
    assert len({p.get_facecolor() for p in ax.patches}) == 8
    assert ax.get_legend().get_bbox_to_anchor().transformed(ax.transAxes.inverted()).x0 > 1
    # fourteen long labels do not fit side by side even wrapped: one line each, turned 30°
    assert all(t.get_rotation() == 30 for t in ax.get_xticklabels())
    fig.draw_without_rendering()
    boxes = [t.get_window_extent() for t in ax.get_xticklabels()]
    assert all(a.x0 < b.x0 for a, b in zip(boxes, boxes[1:], strict=False))
    short = plots.distributions(dists[:3], "clase").axes[0].get_xticklabels()
    assert all(t.get_rotation() == 0 and max(map(len, t.get_text().split("\n"))) <= plots.WRAP
               for t in short)  # fmt: skip
    assert plots.distributions(dists, "clase").axes[0].get_ylabel() == "share of samples"
    curve = [(k, accuracy([True] * k + [False])) for k in (1, 3, 5)]
    ax = plots.vote_curves([("vote", curve)], lang="es").axes[0]
    assert list(ax.get_xticks()) == [1, 3, 5] and ax.get_xlabel() == "caminos que votan (k)"
    a, b = comparison_labels("smol", "smol", ({"runtime": "llamacpp"}, {"runtime": "torch"}))
    assert a != b and a.endswith("(llamacpp)")
    result = EvalResult("loglik", "/kits/smol", "easy-es", settings_for("loglik", {}),
                        Path("s.db"), 1, [], accuracy([True]), {})  # fmt: skip
    assert replace(result, tag="torch").label == result.label + " (torch)"


def test_quiet_training_silences_load_reports_bars_and_step_logs():
    """quiet=True: no transformers LOAD REPORT (a warning), no 'Loading weights' bars and
    no per-step loss dicts (transformers' PrinterCallback) — then everything as before."""
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging

    from muestra.evaluation.reward import quiet_logs, run_training

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    with quiet_logs(True):
        assert hf_logging.get_verbosity() == hf_logging.ERROR
        assert not hf_logging.is_progress_bar_enabled()
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == (level, bars)

    class Trainer:  # what run_training touches of a transformers Trainer
        def __init__(self, quiet: bool) -> None:
            self.args = type("Args", (), {"disable_tqdm": quiet})()
            self.removed: list[type] = []

        def remove_callback(self, callback: type) -> None:
            self.removed.append(callback)

        def train(self) -> str:
            return "done"

    quiet, loud = Trainer(True), Trainer(False)
    assert run_training(quiet)[0] == "done" and quiet.removed == [PrinterCallback]
    assert run_training(loud)[0] == "done" and loud.removed == []


def test_a_sequential_runs_bar_ends_on_its_stop_not_on_a_time_left(monkeypatch):
    """In a notebook the bar's last state is what the saved notebook keeps: a sequential
    run whose cells stopped at 90 of at most 600 samples ends saying so, not "90/600 ·
    ETA 25m30s" (notebook 000 at full scale); a run that fails keeps its last state."""
    import IPython.display

    import muestra.notebook as mn
    from muestra.experiments.runner import Progress

    shown: list[str] = []

    class Handle:
        def update(self, data, raw):
            shown.append(data["text/plain"])

    def display(data, raw, display_id):
        shown.append(data["text/plain"])
        return Handle()

    monkeypatch.setattr(mn, "_kernel", lambda: object())
    monkeypatch.setattr(IPython.display, "display", display)
    state = Progress(90, 600, 9_000, 210.0, tokens_per_s=114, eta_s=1_530, rss_bytes=3 * 2**30)
    for finished in (True, False):
        shown.clear()
        bar = mn._Bar("seq", True)
        bar(state)
        if finished:
            bar.finish()
        bar.close()
        assert "seq: 90/600 samples" in shown[0] and "ETA 25m30s" in shown[0]
        if finished:
            assert shown[-1].startswith(
                "seq: 90 samples, every cell stopped before its cap (600 at most) · "
            ), shown[-1]
            assert "ETA" not in shown[-1] and "114 tok/s" in shown[-1]
        else:
            assert shown[-1].startswith("seq: 90/600 samples") and "ETA 25m30s" in shown[-1]
