"""The sections of an experiment's report, one function each, in the page's order.

Each takes the run's analysis (and its valid samples where it draws them) and returns a
`Section`, or None when the run has nothing for it (no numeric field, no counterfactual
pair…). `analysis_sections` lists them; `report/html.py` puts them on the page.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from muestra.analysis import Analysis, numeric_fields
from muestra.report.charts import bars, forest, histogram
from muestra.report.markup import Section, escape


def budget(frame: pd.DataFrame) -> Section:
    rates = [
        [
            p,
            len(rows),
            int(rows["error"].isna().sum()),
            f"{rows['budget_hit'].mean():.0%}",
            f"{rows['error'].notna().mean():.0%}",
        ]
        for p, rows in frame.groupby("prompt_id", sort=False)
    ]
    headers = ["prompt", "samples", "valid", "budget hit", "errors"]
    return Section("Budget and errors", [(headers, rates)], table_class="rates")


def findings(analysis: Analysis) -> Section:
    said = [f'<p class="finding">{escape(s)}</p>' for s in analysis.findings] or [
        "<p>No significant finding after adjustment.</p>"
    ]
    said += [f'<p class="note">also significant: {escape(s)}</p>' for s in analysis.other_findings]
    headers = ["field", "by", "method", "statistic", "dof", "effect", "p", "p Holm", "p BH"]
    rows = [
        [t.field, t.by, t.method, f"{t.statistic:.3g}", t.dof, f"{t.cramers_v:.2f}",
         f"{t.p_value:.3g}", f"{t.p_holm:.3g}", f"{t.p_bh:.3g}"]
        for t in analysis.tests
    ]  # fmt: skip
    title = f"Findings (α = {analysis.alpha}, Holm)"
    return Section(title, [(headers, rows)], blocks=said, table_class="tests")


def fits(analysis: Analysis) -> Section | None:
    """The goodness-of-fit tests: one row per field and prompt × condition × model cell."""
    if not analysis.fits:
        return None
    note = (
        '<p class="note">Is each field skewed away from the '
        "reference distribution (uniform over the allowed values unless "
        "<code>[analysis.reference]</code> gives one)? Exact binomial test for two values, "
        "χ² for more (Monte-Carlo p-value when an expected count is below 5); p-values "
        "adjusted together with the tests above (a spec's variants compared are a family "
        "of their own). Value: the most over-represented one, "
        "with its Wilson 95% interval.</p>"
    )
    headers = ["field", "prompt", "condition", "model", "method", "value", "n", "share"]
    headers += ["95% interval", "reference", "Cohen's w", "p", "p Holm", "p BH"]
    rows = [
        [f.field, f.prompt, f.condition, f.model, f.method, f.value, f.n, f"{f.share:.2f}",
         f"[{f.low:.2f}, {f.high:.2f}]", f"{f.reference:.2f}", f"{f.cohens_w:.2f}",
         f"{f.p_value:.3g}", f"{f.p_holm:.3g}", f"{f.p_bh:.3g}"]
        for f in analysis.fits
    ]  # fmt: skip
    return Section("Fit to the reference", [(headers, rows)], blocks=[note], table_class="fits")


def answers(analysis: Analysis) -> Section:
    fields = dict.fromkeys(d.field for d in analysis.distributions)
    charts = [f"<h3>{escape(field)}</h3>{bars(analysis, field)}" for field in fields]
    note = "Bars: share of valid samples; whiskers: Wilson 95% intervals."
    return Section("Answers per prompt", notes=[note], blocks=charts)


def free_text(analysis: Analysis) -> Section | None:
    if not analysis.text:
        return None
    note = "Strings without enum in the schema: summarised as text, not tested as categories."
    headers = ["field", "prompt", "n", "mean length", "distinct", "most frequent", "words"]
    rows = [
        [t.field, t.group, t.n, f"{t.mean_chars:.0f}", f"{t.distinct_share:.0%}",
         t.top_answers, t.top_words]
        for t in analysis.text
    ]  # fmt: skip
    return Section("Free-text fields", [(headers, rows)], [note], table_class="text")


def pooled(analysis: Analysis) -> Section | None:
    if not analysis.pooled:
        return None
    note = (
        "Share of each value over all the prompts of a condition or model; 95% interval "
        "from a two-stage prompt-level cluster bootstrap (prompts, then samples), so it "
        "reflects how much prompts differ, not only how many samples there are."
    )
    headers = ["field", "by", "level", "value", "share", "95% interval", "prompts", "n"]
    rows = [
        [p.field, p.by, p.level, p.value, f"{p.share:.2f}", f"[{p.low:.2f}, {p.high:.2f}]",
         p.prompts, p.n]
        for p in analysis.pooled
    ]  # fmt: skip
    return Section("Pooled over prompts", [(headers, rows)], [note], table_class="pooled")


def comparisons(analysis: Analysis) -> Section | None:
    if not analysis.comparisons:
        return None
    note = (
        "Difference in share between two conditions or models, averaged over the prompts "
        "both ran (each prompt weighs the same); 95% paired cluster-bootstrap interval. "
        "Red: the interval excludes 0."
    )
    headers = ["field", "by", "value", "a", "b", "share a", "share b", "a − b"]
    headers += ["95% interval", "prompts"]
    rows = [
        [c.field, c.by, c.value, c.a, c.b, f"{c.share_a:.2f}", f"{c.share_b:.2f}",
         f"{c.difference:+.2f}", f"[{c.low:+.2f}, {c.high:+.2f}]", c.prompts]
        for c in analysis.comparisons
    ]  # fmt: skip
    return Section(
        "Paired comparisons",
        [(headers, rows)],
        [note],
        blocks=[forest(analysis)],
        table_class="comparisons",
    )


def numeric(valid: pd.DataFrame) -> Section | None:
    fields = numeric_fields(valid)
    if not fields:
        return None
    charts = [f"<h3>{escape(field)}</h3>{histogram(valid, field)}" for field in fields]
    return Section("Numeric fields", blocks=charts)


def counterfactuals(analysis: Analysis) -> Section | None:
    if not analysis.counterfactuals:
        return None
    note = (
        '<p class="note">Flip rate: how often sample i\'s answer differs between the variants '
        "(they share sample i's random stream). By chance: the flip rate if the two "
        "variants' answers were independent draws, from the exact probabilities (exact) or "
        "the counted shares.</p>"
    )
    headers = ["group", "condition", "model", "field", "value", "a", "b", "share a"]
    headers += ["share b", "a − b", "95% interval", "flip rate", "flip rate by chance"]
    rows = [
        [c.group, c.condition, c.model, c.field, c.value, c.variant_a, c.variant_b,
         f"{c.proportion_a:.2f}", f"{c.proportion_b:.2f}", f"{c.difference:+.2f}",
         f"[{c.low:+.2f}, {c.high:+.2f}]", _rate(c.flip_rate),
         _rate(c.chance_flip_rate) + (" (exact)" if c.chance_from == "field_probs" else "")]
        for c in analysis.counterfactuals
    ]  # fmt: skip
    return Section("Counterfactual pairs", [(headers, rows)], blocks=[note])


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def field_probs(analysis: Analysis) -> Section | None:
    if not analysis.field_probs:
        return None
    note = (
        "Mean probability the model gave each value at the decision point (bootstrap 95% "
        "interval), next to the share of sampled answers; “× narrower” compares the "
        "interval widths."
    )
    headers = ["field", "prompt", "value", "mean probability", "95% interval"]
    headers += ["sampled share", "× narrower"]
    rows = [
        [f.field, f.group, f.value, f"{f.mean_probability:.3f}",
         "exact" if f.low is None else f"[{f.low:.3f}, {f.high:.3f}]",
         f"{f.sampled_share:.2f}", "—" if f.narrower is None else f"{f.narrower:.1f}"]
        for f in analysis.field_probs
    ]  # fmt: skip
    return Section(
        "Answer probabilities (field_probs)", [(headers, rows)], [note], table_class="field-probs"
    )


def mentions(analysis: Analysis) -> Section | None:
    if not analysis.mentions:
        return None
    note = (
        '<p class="note">Share of reasoning traces that mention each term (regular '
        "expressions from <code>[analysis] terms</code>, Spanish and English gender words by "
        "default), Wilson 95% intervals.</p>"
    )
    headers = ["term", "prompt", "condition", "traces", "share", "95% interval"]
    rows = [
        [m.term, m.group, m.condition, m.n, f"{m.share:.2f}", f"[{m.low:.2f}, {m.high:.2f}]"]
        for m in analysis.mentions
    ]
    return Section("Reasoning traces", [(headers, rows)], blocks=[note], table_class="mentions")


def analysis_sections(analysis: Analysis, frame: pd.DataFrame) -> list[Section]:
    """The analysis's sections, in the page's order (those with nothing to show left out)."""
    valid = frame[frame["error"].isna()] if len(frame) else frame
    built: list[Callable[[], Section | None]] = [
        lambda: findings(analysis),
        lambda: fits(analysis),
        lambda: answers(analysis),
        lambda: free_text(analysis),
        lambda: pooled(analysis),
        lambda: comparisons(analysis),
        lambda: numeric(valid),
        lambda: counterfactuals(analysis),
        lambda: field_probs(analysis),
        lambda: mentions(analysis),
    ]
    return [section for make in built if (section := make()) is not None]
