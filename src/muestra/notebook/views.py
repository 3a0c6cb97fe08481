"""Result objects for a notebook cell: each renders as HTML tables in Jupyter
(`_repr_html_`), as plain text elsewhere (`repr`), converts to pandas (`to_pandas`, or
`table(name)`) and draws matplotlib figures (`plot*`, from `muestra.report.plots`).

They hold the analysis' own records (`Analysis`, `EvalResult`, `ProbeAnalysis`): what
`muestra analyze`, `muestra eval` and `muestra report` show, with the same numbers.
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from muestra.analysis import Analysis
from muestra.analysis.language import check, say
from muestra.analysis.probes import ProbeAnalysis
from muestra.errors import InputError
from muestra.evaluation.evaluate import EvalResult, PairedComparison
from muestra.report import plots


def _records(rows: list[Any]) -> pd.DataFrame:
    return pd.DataFrame([asdict(r) for r in rows])


MAX_ROWS = 40  # rows of a table shown in a cell; `table(...)` / `to_pandas()` has them all


def _shown(frame: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    if len(frame) <= MAX_ROWS:
        return frame, ""
    return frame.head(
        MAX_ROWS
    ), f"… {len(frame) - MAX_ROWS} more rows (the whole table: .table() or .to_pandas())"


def _html(title: str, lines: list[str], tables: list[tuple[str, pd.DataFrame]]) -> str:
    parts = [f"<h4>{html.escape(title)}</h4>"]
    if lines:
        parts.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in lines) + "</ul>")
    for caption, frame in tables:
        if frame.empty:
            continue
        head, more = _shown(frame)
        parts.append(f"<p><b>{html.escape(caption)}</b></p>")
        parts.append(head.to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0))
        if more:
            parts.append(f"<p><i>{html.escape(more)}</i></p>")
    return "<div class='muestra'>" + "".join(parts) + "</div>"


def _text(title: str, lines: list[str], tables: list[tuple[str, pd.DataFrame]]) -> str:
    parts = [title, *(f"- {x}" for x in lines)]
    for caption, frame in tables:
        if not frame.empty:
            head, more = _shown(frame)
            parts += ["", f"{caption}:", head.to_string(index=False, float_format="{:.3f}".format)]
            parts += [more] if more else []
    return "\n".join(parts)


class _Shown:
    """`_repr_html_` and `repr` from one `_parts()`: a title, lines, and captioned tables."""

    def _parts(self) -> tuple[str, list[str], list[tuple[str, pd.DataFrame]]]:
        raise NotImplementedError

    def _repr_html_(self) -> str:
        return _html(*self._parts())

    def __repr__(self) -> str:
        return _text(*self._parts())


def _rounded(frame: pd.DataFrame) -> pd.DataFrame:
    """Numbers to three decimals, undefined ones (None: no interval) as a dash, not NaN."""
    shown = frame.copy()
    for column in shown.columns:
        if shown[column].map(lambda v: v is None or isinstance(v, float)).all():
            shown[column] = shown[column].map(lambda v: "—" if pd.isna(v) else f"{v:.3f}")
    return shown


@dataclass(repr=False)
class AnalysisView(_Shown):
    """An experiment run's `Analysis`: distributions with Wilson intervals, tests with
    adjusted p-values and their sentences (`findings`: when the spec pairs variants, their
    comparison), fits, paired differences, field_probs, free-text summaries (`text`).
    `fields` names the answer's fields: a `choice` or `regex` answer is one field named
    `answer`. Figures and sentences speak the analysis' language (the spec's
    `[analysis] language`), or the `lang=` given to a plot."""

    analysis: Analysis
    frame: pd.DataFrame  # the samples it was computed from
    name: str = ""

    TABLES = (
        "distributions",
        "tests",
        "fits",
        "pooled",
        "comparisons",
        "counterfactuals",
        "numeric",
        "field_probs",
        "mentions",
        "rewards",
        "text",
    )

    @property
    def lang(self) -> str:
        return self.analysis.lang

    @property
    def findings(self) -> list[str]:
        """The headline: the variants compared when the spec pairs them (significant or
        not), else every significant test; see `other_findings`."""
        return self.analysis.findings

    @property
    def other_findings(self) -> list[str]:
        return self.analysis.other_findings

    @property
    def notes(self) -> list[str]:
        return self.analysis.notes

    def table(self, name: str = "distributions") -> pd.DataFrame:
        """One of the analysis' tables as a DataFrame (`TABLES` names them)."""
        if name not in self.TABLES:
            raise ValueError(f"table {name!r} is not one of {', '.join(self.TABLES)}")
        if name == "distributions":
            return pd.DataFrame(
                [
                    {"field": d.field, "group": d.group, "n": d.n, **asdict(v)}
                    for d in self.analysis.distributions
                    for v in d.values
                ]
            )
        if name == "rewards":
            r = self.analysis.rewards
            return _records(r.cells) if r is not None else pd.DataFrame()
        if name == "text":
            return _records(self.analysis.text)
        return _records(getattr(self.analysis, name))

    def to_pandas(self) -> pd.DataFrame:
        return self.table("distributions")

    @property
    def fields(self) -> list[str]:
        """The categorical answer fields (a choice or regex answer: `answer`)."""
        return list(dict.fromkeys(d.field for d in self.analysis.distributions))

    @property
    def text_fields(self) -> list[str]:
        """The free-text answer fields, summarised in `table("text")`, never tested."""
        return list(dict.fromkeys(t.field for t in self.analysis.text))

    def plot(self, field: str | None = None, by: str = "prompt", lang: str | None = None) -> Any:
        """Each value's share with its interval: per prompt (`by="prompt"`, Wilson), or per
        condition or model pooled over the prompts (`by="condition"`/`"model"`, cluster
        bootstrap). `field` defaults to the first categorical answer field."""
        if not self.fields:
            raise ValueError("the run has no categorical answer field to plot")
        chosen = field or self.fields[0]
        if chosen not in self.fields:
            extra = " (free text: see table('text'))" if chosen in self.text_fields else ""
            raise ValueError(f"field {chosen!r} is not one of {', '.join(self.fields)}{extra}")
        if by == "prompt":
            return plots.distributions(self.analysis.distributions, chosen,
                                       lang=lang or self.lang)  # fmt: skip
        if by not in ("condition", "model"):
            raise ValueError(f"by={by!r}: use prompt, condition or model")
        return plots.pooled(self.analysis.pooled, chosen, by, lang=lang or self.lang)

    def plot_field_probs(self, field: str | None = None, lang: str | None = None) -> Any:
        """Exact field probabilities next to the shares counted in the samples."""
        return plots.field_probs(self.analysis.field_probs, field, lang=lang or self.lang)

    def plot_differences(self, lang: str | None = None) -> Any:
        """The forest plot of paired differences between conditions, models or variants."""
        return plots.forest(self.analysis.comparisons, lang=lang or self.lang)

    def plot_rewards(self, lang: str | None = None) -> Any:
        """Mean reward per prompt and model (before/after alignment side by side)."""
        if self.analysis.rewards is None:
            raise ValueError("the run has no rewards: score it with `muestra reward score`")
        return plots.rewards(self.analysis.rewards.cells, lang=lang or self.lang)

    def _parts(self) -> tuple[str, list[str], list[tuple[str, pd.DataFrame]]]:
        a, lang = self.analysis, self.lang
        tests = self.table("tests")
        if not tests.empty:
            tests = tests[["field", "by", "method", "p_value", "p_holm", "cramers_v"]]
        tables = [(say("cap_distributions", lang), self.table("distributions")),
                  (say("cap_tests", lang), tests)]  # fmt: skip
        if a.text:
            tables.append((say("cap_text", lang), self.table("text")))
        if a.comparisons:
            tables.append((say("cap_comparisons", lang), self.table("comparisons")))
        if a.counterfactuals:
            cf = self.table("counterfactuals")[["group", "condition", "field", "value",
                "variant_a", "variant_b", "difference", "low", "high", "flip_rate",
                "chance_flip_rate", "chance_from"]]  # fmt: skip
            tables.append((say("cap_counterfactuals", lang), _rounded(cf)))
        if a.field_probs:
            tables.append((say("cap_field_probs", lang), _rounded(self.table("field_probs"))))
        title = say("valid_of", lang, name=self.name, valid=a.valid, samples=a.samples,
                    alpha=a.alpha)  # fmt: skip
        lines = [say("note", lang, text=n) for n in a.notes] + a.findings
        lines += [say("also", lang, text=f) for f in a.other_findings]
        if not a.findings:
            lines.append(say("no_finding", lang, alpha=a.alpha))
        return title, lines, tables


@dataclass(repr=False)
class ExperimentView(_Shown):
    """One stored run: its samples (`samples`, `to_pandas`) and their `analysis()`."""

    store: Path
    run_id: int
    name: str
    status: str
    samples: pd.DataFrame
    models: list[dict[str, Any]] = field(default_factory=list)
    stop_rule: dict[str, Any] | None = None  # a sequential run's [stop] rule
    stop_cells: list[dict[str, Any]] = field(default_factory=list)  # where each cell stopped
    notes: list[str] = field(default_factory=list)  # e.g. field_probs that are not shares
    lang: str = "en"  # the spec's [analysis] language: the summary's words
    counted: set[str] = field(default_factory=set)  # conditions whose field_probs are no share

    def to_pandas(self) -> pd.DataFrame:
        return self.samples

    @property
    def stops(self) -> pd.DataFrame:
        """Where each cell of a sequential run stopped: why, after how many samples, its
        estimate and anytime-valid band there (empty for a fixed-n run)."""
        return pd.DataFrame(self.stop_cells)

    def sequence(self, field: str | None = None, value: str | None = None) -> pd.DataFrame:
        """Each cell's estimate and anytime-valid 95% band after every sample, by counting
        and by the mean of field_probs (`analysis.sequential.curves`); `field`/`value`
        default to the run's [stop] rule."""
        from muestra.analysis.sequential import curves

        field, value = self._tracked(field, value)
        alpha = (self.stop_rule or {}).get("alpha", 0.05)
        return curves(self.samples, field, value, alpha)

    def plot_sequence(
        self,
        prompt: str | None = None,
        field: str | None = None,
        value: str | None = None,
        lang: str = "es",
        condition: str | None = None,
        model: str | None = None,
    ) -> Any:
        """One cell's estimate and band against the number of samples, for both
        estimators, with where the run stopped (`lang`: es or en). The field_probs line is
        drawn only where they estimate the share (answers drawn at T 1 unfiltered)."""
        from muestra.report.plots import sequence_bands

        field, value = self._tracked(field, value)
        found = self.sequence(field, value)
        if found.empty:
            raise InputError(f"run {self.run_id} has no answers to {field} to draw")
        picks = {"prompt_id": prompt, "condition": condition, "model": model}
        for column, wanted in picks.items():
            wanted = wanted if wanted is not None else found[column].iloc[0]
            if wanted not in set(found[column]):
                shown = ", ".join(map(str, found[column].unique()))
                raise InputError(f"{column} {wanted!r} is not in run {self.run_id}: {shown}")
            found, picks[column] = found[found[column] == wanted], wanted
        if picks["condition"] in self.counted:
            found = found[found["estimator"] == "counts"]  # field_probs are not the share
        stop = next(
            (
                c
                for c in self.stop_cells
                if (c["prompt"], c["condition"], c["model"])
                == (picks["prompt_id"], picks["condition"], picks["model"])
            ),
            None,
        )
        reference = (self.stop_rule or {}).get("reference")
        at, used = (stop["samples"], stop["used"]) if stop is not None else (None, None)
        return sequence_bands(found, value, at, reference, lang, used)

    def _tracked(self, field: str | None, value: str | None) -> tuple[str, str]:
        rule = self.stop_rule or {}
        field, value = field or rule.get("field"), value or rule.get("value")
        if field is None or value is None:
            raise InputError(
                f"run {self.run_id} is not a sequential run: name the field and value to draw"
            )
        return field, value

    def analysis(self, alpha: float | None = None, lang: str | None = None) -> AnalysisView:
        """The run's analysis; sentences and figures in `lang` (default: the spec's
        `[analysis] language`, else English)."""
        from muestra.evaluation.runs import stored_analysis

        found = stored_analysis(self.store, alpha, self.run_id, check(lang) if lang else None)
        return AnalysisView(found.analysis, found.frame, self.name)

    def plot(self, field: str | None = None, lang: str | None = None) -> Any:
        return self.analysis(lang=lang).plot(field)

    def _parts(self) -> tuple[str, list[str], list[tuple[str, pd.DataFrame]]]:
        counts = (
            self.samples.groupby(["prompt_id", "condition", "model"], sort=False)
            .size()
            .reset_index(name="samples")
            if not self.samples.empty
            else pd.DataFrame()
        )
        lang = self.lang
        title = say("run_title", lang, run=self.run_id, name=self.name, status=self.status,
                    samples=len(self.samples))  # fmt: skip
        tables = [(say("cap_samples_per_cell", lang), counts)]
        if self.stop_cells:
            tables.append((say("cap_cell_stops", lang), self.stops))
        lines = [say("store_line", lang, store=self.store)]
        lines += [say("note", lang, text=n) for n in self.notes]
        return title, lines, tables


@dataclass(repr=False)
class EvaluationView(_Shown):
    """One or more scorings of a question set, compared where they share questions."""

    results: list[EvalResult]
    comparisons: list[PairedComparison]
    lang: str = "en"  # of figures and captions: the question set's language

    def to_pandas(self) -> pd.DataFrame:
        """One row per scoring: accuracy and its interval, expected accuracy, acc_norm."""
        rows = []
        for r in self.results:
            row = {"run": r.run_id, "task": r.task, "label": r.label, "method": r.method,
                   **r.accuracy.as_dict()}  # fmt: skip
            if r.expected is not None:
                row.update(expected=r.expected[0], expected_low=r.expected[1],
                           expected_high=r.expected[2])  # fmt: skip
            if r.acc_norm is not None:
                row["acc_norm"] = r.acc_norm.value
            row["seconds"] = r.seconds
            if r.timing:  # `compare`: how fast each model ran
                row.update({k: v for k, v in r.timing.items() if k != "model"})
            rows.append(row)
        return pd.DataFrame(rows)

    def items(self) -> pd.DataFrame:
        """Every question of every scoring: predicted, right or not, p(right)."""
        return pd.DataFrame(
            [{"label": r.label, **asdict(item)} for r in self.results for item in r.items]
        )

    def comparisons_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            [
                {
                    "a": p.a,
                    "b": p.b,
                    "questions": p.questions,
                    "same_answer": p.agreement,
                    "difference": p.difference[0],
                    "low": p.difference[1],
                    "high": p.difference[2],
                    "mcnemar_p": p.mcnemar.p_value,
                }  # fmt: skip
                for p in self.comparisons
            ]
        )

    def plot(self, lang: str | None = None) -> Any:
        """Accuracy per scoring with Wilson intervals."""
        rows = [(r.label, r.accuracy) for r in self.results]
        return plots.accuracies(rows, lang=lang or self.lang)

    def plot_votes(self, lang: str | None = None) -> Any:
        """Vote curves: accuracy of the majority of the first k paths."""
        curves = [(r.label, r.curve) for r in self.results if r.curve]
        return plots.vote_curves(curves, lang=lang or self.lang)

    def _parts(self) -> tuple[str, list[str], list[tuple[str, pd.DataFrame]]]:
        task = ", ".join(dict.fromkeys(r.task for r in self.results))
        notes = [say("note", self.lang, text=n) for r in self.results for n in r.notes]
        tables = [(say("cap_accuracy", self.lang), _rounded(self.to_pandas()))]
        if self.comparisons:
            tables.append((say("cap_paired", self.lang), self.comparisons_frame()))
        return f"{task}: {len(self.results)} scoring(s)", notes, tables


@dataclass(repr=False)
class ProbeView(_Shown):
    """A probe run: group means and differences per feature (paired over templates)."""

    store: Path
    run_id: int
    name: str
    analysis: ProbeAnalysis
    stop_rule: dict[str, Any] | None = None  # a sequential probe's [stop] rule
    stop_cells: list[dict[str, Any]] = field(default_factory=list)  # where each cell stopped
    notes: list[str] = field(default_factory=list)  # what the stop rule's bands assume

    @property
    def findings(self) -> list[str]:
        return self.analysis.findings

    @property
    def stops(self) -> pd.DataFrame:
        """Where each template × group of a sequential probe stopped: why, after how many
        samples, its estimate and anytime-valid band there (empty for a fixed-n probe)."""
        return pd.DataFrame(self.stop_cells)

    def to_pandas(self) -> pd.DataFrame:
        return _records(self.analysis.differences)

    def means(self) -> pd.DataFrame:
        return _records(self.analysis.means)

    @property
    def lang(self) -> str:
        return self.analysis.language if self.analysis.language in ("en", "es") else "en"

    def plot(self, feature: str | None = None, lang: str | None = None) -> Any:
        """Differences between groups per feature with bootstrap intervals; `feature`
        keeps those whose name contains it."""
        rows = [d for d in self.analysis.differences if feature is None or feature in d.feature]
        return plots.group_differences(rows, title=self.name, lang=lang or self.lang)

    def _parts(self) -> tuple[str, list[str], list[tuple[str, pd.DataFrame]]]:
        a = self.analysis
        diffs = self.to_pandas()
        if not diffs.empty:
            diffs = diffs[["feature", "a", "b", "mean_a", "mean_b", "difference", "low",
                           "high", "p_holm"]]  # fmt: skip
        title = (
            f"probe {self.name} · run {self.run_id}: {a.valid} valid of {a.samples} samples, "
            f"groups {', '.join(a.groups)} over {len(a.templates)} templates"
        )
        tables = [(say("cap_groups", self.lang), diffs)]
        if self.stop_cells:
            tables.append((say("cap_stops", self.lang), self.stops))
        lines = [say("note", self.lang, text=n) for n in self.notes] + a.findings
        return title, lines, tables
