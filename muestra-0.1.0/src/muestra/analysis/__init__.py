"""Analysis of a store: distributions with intervals, tests, adjusted p-values, sentences.

`analyze(frame)` takes the per-sample DataFrame of `muestra.experiments.results` and
returns an `Analysis`:

- for every categorical answer field and every prompt: counts, proportions with Wilson
  95% intervals, total variation / Jensen–Shannon distance to the reference (uniform
  unless `[analysis.reference]` in the spec gives one) and normalised entropy;
- one independence test per field and dimension that varies (prompt, condition, model):
  χ² (Monte-Carlo when expected counts are small) with Cramér's V. When the other
  dimensions vary too, the test is stratified: a condition is compared inside each
  prompt (× model), never across them (Σ of the strata's χ², permutation p-value);
- one goodness-of-fit test per field and prompt × condition × model cell: are the
  answers drawn from the reference distribution? (exact binomial for two values, χ² with
  a Monte-Carlo p-value when expected counts are small for more; see `muestra.analysis.fit`);
- Holm and Benjamini–Hochberg adjustment over every test of the report (both kinds);
- for each condition and model (and for all prompts together): shares pooled over
  prompts with a two-stage prompt-level cluster bootstrap interval, and condition /
  model differences paired over prompts (each prompt weighs the same) with a paired
  cluster-bootstrap interval;
- one plain sentence per significant finding;
- counterfactual pairs (same `group`, different `variant`): difference in proportions
  with Newcombe's interval per value, and the flip rate of the answer between variants
  for the same sample index.

Free-text fields (more than 20 distinct values, or more distinct values than half the
samples) are described but not tested. Only samples without an error count.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from muestra.analysis.columns import answer_fields
from muestra.analysis.fit import FitRow, cell_fits
from muestra.analysis.rewards import RewardAnalysis, analyze_rewards
from muestra.analysis.stats import (
    adjust,
    bootstrap_mean,
    cluster_shares,
    difference,
    distance_to,
    independence,
    paired_difference,
    rank_test,
    stratified_independence,
    wilson,
)
from muestra.errors import InputError

DIMENSIONS = {"prompt": "prompt_id", "condition": "condition", "model": "model"}


@dataclass
class ValueShare:
    value: str
    count: int
    proportion: float
    low: float
    high: float


@dataclass
class Distribution:
    field: str
    group: str
    n: int
    values: list[ValueShare]
    total_variation: float
    jensen_shannon: float
    normalised_entropy: float


@dataclass
class TestRow:
    field: str
    by: str
    method: str
    statistic: float
    dof: int
    p_value: float
    cramers_v: float
    p_holm: float = 1.0
    p_bh: float = 1.0
    sentence: str | None = None


@dataclass
class Counterfactual:
    group: str
    condition: str
    model: str
    field: str
    value: str
    variant_a: str
    variant_b: str
    proportion_a: float
    proportion_b: float
    difference: float
    low: float
    high: float
    flip_rate: float


@dataclass
class Pooled:
    """A value's share pooled over the prompts of one condition or model ("all" = every
    sample), with a prompt-level cluster bootstrap interval."""

    field: str
    by: str
    level: str
    value: str
    share: float
    low: float
    high: float
    prompts: int
    n: int


@dataclass
class Comparison:
    """share_a − share_b of one value between two conditions (or models), averaged over
    the prompts both have (each prompt weighs the same), paired cluster-bootstrap interval."""

    field: str
    by: str
    value: str
    a: str
    b: str
    share_a: float
    share_b: float
    difference: float
    low: float
    high: float
    prompts: int


@dataclass
class NumericSummary:
    field: str
    group: str
    n: int
    mean: float
    mean_low: float
    mean_high: float
    median: float
    median_low: float
    median_high: float


@dataclass
class FieldProbSummary:
    field: str
    group: str
    value: str
    mean_probability: float
    low: float
    high: float
    sampled_share: float
    narrower: float  # Wilson interval width of the sampled share ÷ width of this interval


@dataclass
class TermMentions:
    term: str
    group: str  # the prompt
    condition: str
    n: int
    share: float
    low: float
    high: float


# Default terms looked for in reasoning traces (Spanish and English gender words); they are
# labelled in the traces' language (`default_terms`).
DEFAULT_TERMS = {
    "masculino": r"\b(?:él|hombre|varón|chico|masculino|he|him|his|man|male)\b",
    "femenino": r"\b(?:ella|mujer|chica|femenino|she|her|hers|woman|female)\b",
}
ENGLISH_LABELS = {"masculino": "male", "femenino": "female"}
_ENGLISH = re.compile(r"\b(?:the|and|is|of|to|a|i|you|he|she|it)\b", re.IGNORECASE)
_SPANISH = re.compile(r"\b(?:el|la|los|las|y|es|de|que|un|una|yo|él|ella)\b", re.IGNORECASE)


def default_terms(traces: pd.Series) -> dict[str, str]:
    """`DEFAULT_TERMS`, labelled in English when the traces are mostly English."""
    text = " ".join(traces.dropna().astype(str))
    if len(_ENGLISH.findall(text)) > len(_SPANISH.findall(text)):
        return {ENGLISH_LABELS[label]: pattern for label, pattern in DEFAULT_TERMS.items()}
    return dict(DEFAULT_TERMS)


@dataclass
class Analysis:
    alpha: float
    samples: int
    valid: int
    distributions: list[Distribution] = field(default_factory=list)
    tests: list[TestRow] = field(default_factory=list)
    fits: list[FitRow] = field(default_factory=list)
    counterfactuals: list[Counterfactual] = field(default_factory=list)
    pooled: list[Pooled] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    numeric: list[NumericSummary] = field(default_factory=list)
    field_probs: list[FieldProbSummary] = field(default_factory=list)
    mentions: list[TermMentions] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # caveats a reader must see first
    rewards: RewardAnalysis | None = None  # when `muestra reward score` scored the run

    @property
    def findings(self) -> list[str]:
        return [t.sentence for t in [*self.tests, *self.fits] if t.sentence]

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["findings"] = self.findings
        return data


def _beam_notes(frame: pd.DataFrame) -> list[str]:
    """Rows that are ranked beams, not draws: say so where their numbers are read."""
    notes = []
    for phase in ("think", "answer"):
        column = f"{phase}_beam_rank"
        if column not in frame.columns or frame[column].isna().all():
            continue
        ranked = frame[frame[column].notna()]
        if phase == "answer" and "think_beam_rank" in frame.columns:
            ranked = ranked[ranked["think_beam_rank"].isna()]
        sampled_reasoning = phase == "answer" and (ranked[column] == 0).all()
        if ranked.empty or sampled_reasoning:
            continue  # each answer beam follows a sampled reasoning: the rows are draws
        conditions = ", ".join(sorted(ranked["condition"].astype(str).unique()))
        notes.append(
            f"condition(s) {conditions}: the rows are the most likely {phase} sequences, "
            "ranked by beam search, not random draws; their shares, intervals and tests "
            "describe those beams and do not estimate the model's distribution"
        )
    return notes


def categorical_fields(frame: pd.DataFrame) -> list[str]:
    chosen = []
    for name in answer_fields(frame):
        values = frame[name].dropna()
        if values.empty:
            continue
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        distinct = values.astype(str).nunique()
        if not numeric and distinct <= 20 and distinct <= max(2, len(values) // 2):
            chosen.append(name)
    return chosen


def _levels(
    valid: pd.DataFrame, name: str, column: pd.Series, reference: dict[str, float] | None
) -> list[str]:
    """Observed values plus every allowed value the grammar knew (from `field_probs`) and
    every value of the reference, so a value the model never chose still counts in the
    distance to the reference and in the goodness-of-fit test."""
    allowed = {
        key
        for probs in valid["field_probs"]
        if isinstance(probs, dict) and isinstance(probs.get(name), dict)
        for key in probs[name]
        if key != "<unresolved>"
    }
    return sorted(set(column.unique()) | allowed | set(reference or {}))


def _reference_shares(
    name: str, levels: list[str], given: dict[str, float] | None
) -> np.ndarray | None:
    """The spec's reference for `name` in `levels` order (values it omits get 0); None
    when it gives none (uniform)."""
    if not given:
        return None
    shares = np.array([given.get(level, 0.0) for level in levels], dtype=float)
    if (shares < 0).any() or shares.sum() <= 0:
        raise InputError(
            f"[analysis.reference] {name} = {given}: shares must be ≥ 0 and not all 0; "
            "fix them in the spec"
        )
    return shares


def _shares(values: pd.Series, levels: list[str]) -> list[ValueShare]:
    counts = values.astype(str).value_counts()
    n = len(values)
    shares = []
    for level in levels:
        k = int(counts.get(level, 0))
        low, high = wilson(k, n)
        shares.append(ValueShare(level, k, k / n if n else 0.0, low, high))
    return shares


def analyze(
    frame: pd.DataFrame,
    reference: dict[str, dict[str, float]] | None = None,
    alpha: float = 0.05,
    terms: dict[str, str] | None = None,
) -> Analysis:
    valid = frame[frame["error"].isna()] if len(frame) else frame
    result = Analysis(alpha=alpha, samples=len(frame), valid=len(valid))
    result.notes += _beam_notes(frame)
    for name in categorical_fields(valid):
        column = valid[name].dropna().astype(str)
        given = (reference or {}).get(name)
        levels = _levels(valid, name, column, given)
        ref = _reference_shares(name, levels, given)
        for prompt, rows in valid.loc[column.index].groupby("prompt_id", sort=False):
            shares = _shares(rows[name].astype(str), levels)
            dist = distance_to(np.array([s.count for s in shares]) + 0.0, ref)
            result.distributions.append(
                Distribution(
                    name,
                    str(prompt),
                    len(rows),
                    shares,
                    dist.total_variation,
                    dist.jensen_shannon,
                    dist.normalised_entropy,
                )
            )
        rows = valid.loc[column.index]
        uniform = np.ones(len(levels))
        result.fits += cell_fits(rows, column, name, levels, uniform if ref is None else ref)
        for by, key in DIMENSIONS.items():
            if valid[key].nunique() < 2:
                continue
            table = pd.crosstab(rows[key], column)
            others = [k for k in DIMENSIONS.values() if k != key and valid[k].nunique() > 1]
            if others:
                strata = rows[others].astype(str).agg("\x1f".join, axis=1).to_numpy()
                test = stratified_independence(rows[key].to_numpy(), column.to_numpy(), strata)
            else:
                test = independence(table.to_numpy())
            if key != "prompt_id":
                result.pooled += _pooled(rows, column, name, by, key, levels)
                result.comparisons += _comparisons(rows, column, name, by, key, levels)
            if test is not None:
                row = TestRow(
                    name, by, test.method, test.statistic, test.dof, test.p_value, test.cramers_v
                )
                row.sentence = _sentence_parts(table, name, by)
                result.tests.append(row)
        if rows["prompt_id"].nunique() > 1:
            result.pooled += _pooled(rows, column, name, "all", None, levels)
        result.counterfactuals += _counterfactuals(valid, name, levels)
        result.field_probs += _field_probs(valid, name, levels)
    for name in numeric_fields(valid):
        _numeric(valid, name, result)
    if terms is None:
        terms = default_terms(valid["reasoning"]) if "reasoning" in valid else DEFAULT_TERMS
    result.mentions = _mentions(valid, terms)
    result.rewards = analyze_rewards(frame)
    tests: list[TestRow | FitRow] = [*result.tests, *result.fits]
    holm, bh = adjust([t.p_value for t in tests])
    for test, p_holm, p_bh in zip(tests, holm, bh, strict=True):
        test.p_holm, test.p_bh = p_holm, p_bh
        test.sentence = _finish_sentence(test.sentence, p_holm) if p_holm < alpha else None
    return result


def _sentence_parts(table: pd.DataFrame, name: str, by: str) -> str:
    """The biggest contrast in the table, as words (the p-value is added later)."""
    shares = table.div(table.sum(axis=1), axis=0)
    best = None
    for value in shares.columns:
        column = shares[value]
        high, low = column.idxmax(), column.idxmin()
        gap = column[high] - column[low]
        if best is None or gap > best[0]:
            best = (gap, value, high, low, column[high], column[low])
    assert best is not None
    _, value, high, low, p_high, p_low = best
    if p_low > 0:
        return (
            f"{by} {high} makes {name}={value} {p_high / p_low:.1f}× as likely as {low} "
            f"({p_high:.0%} vs {p_low:.0%})"
        )
    return f"{by} {high} gives {name}={value} in {p_high:.0%} of samples, {low} in none"


def _finish_sentence(text: str | None, p_holm: float) -> str | None:
    if text is None:
        return None
    shown = "p_adj < 0.001" if p_holm < 0.001 else f"p_adj = {p_holm:.3f}"
    return f"{text}; {shown}"


def _counterfactuals(valid: pd.DataFrame, name: str, levels: list[str]) -> list[Counterfactual]:
    found = []
    paired = valid.dropna(subset=["group", "variant", name])
    for (group, condition, model), rows in paired.groupby(["group", "condition", "model"]):
        variants = sorted(rows["variant"].unique())
        for a, b in itertools.combinations(variants, 2):
            left = rows[rows["variant"] == a].set_index("sample")[name].astype(str)
            right = rows[rows["variant"] == b].set_index("sample")[name].astype(str)
            common = left.index.intersection(right.index)
            flips = float((left[common] != right[common]).mean()) if len(common) else float("nan")
            for level in levels:
                k1, k2 = int((left == level).sum()), int((right == level).sum())
                diff, low, high = difference(k1, len(left), k2, len(right))
                found.append(
                    Counterfactual(
                        str(group),
                        str(condition),
                        str(model),
                        name,
                        level,
                        a,
                        b,
                        k1 / len(left),
                        k2 / len(right),
                        diff,
                        low,
                        high,
                        flips,
                    )
                )
    return found


def _per_prompt(rows: pd.DataFrame, column: pd.Series, levels: list[str]) -> pd.DataFrame:
    """prompts × values count table (columns in `levels` order)."""
    table = pd.crosstab(rows["prompt_id"], column)
    return table.reindex(columns=levels, fill_value=0)


def _pooled(
    rows: pd.DataFrame,
    column: pd.Series,
    name: str,
    by: str,
    key: str | None,
    levels: list[str],
) -> list[Pooled]:
    found = []
    groups = [("all", rows)] if key is None else rows.groupby(key, sort=True)
    for level, part in groups:
        counts = _per_prompt(part, column[part.index], levels).to_numpy()
        share, low, high = cluster_shares(counts)
        found += [
            Pooled(
                name, by, str(level), value, float(s), float(lo), float(hi), len(counts), len(part)
            )
            for value, s, lo, hi in zip(levels, share, low, high, strict=True)
        ]
    return found


def _comparisons(
    rows: pd.DataFrame,
    column: pd.Series,
    name: str,
    by: str,
    key: str,
    levels: list[str],
) -> list[Comparison]:
    """Every pair of levels of `key`, paired over the prompts (× the other dimensions that
    vary) both levels have."""
    others = [
        k for k in DIMENSIONS.values() if k != key and (k == "prompt_id" or rows[k].nunique() > 1)
    ]
    unit = rows[others].astype(str).agg("\x1f".join, axis=1)
    found = []
    for a, b in itertools.combinations(sorted(rows[key].unique()), 2):
        tables = []
        for level in (a, b):
            part = rows[rows[key] == level]
            table = pd.crosstab(unit[part.index], column[part.index])
            tables.append(table.reindex(columns=levels, fill_value=0))
        common = tables[0].index.intersection(tables[1].index)
        if not len(common):
            continue
        counts_a, counts_b = (t.loc[common].to_numpy() for t in tables)
        diff, low, high = paired_difference(counts_a, counts_b)
        share_a = (counts_a / counts_a.sum(axis=1, keepdims=True)).mean(axis=0)
        share_b = (counts_b / counts_b.sum(axis=1, keepdims=True)).mean(axis=0)
        found += [
            Comparison(
                name,
                by,
                value,
                str(a),
                str(b),
                float(sa),
                float(sb),
                float(d),
                float(lo),
                float(hi),
                len(common),
            )
            for value, sa, sb, d, lo, hi in zip(
                levels, share_a, share_b, diff, low, high, strict=True
            )
        ]
    return found


def numeric_fields(frame: pd.DataFrame) -> list[str]:
    return [
        name
        for name in answer_fields(frame)
        if pd.api.types.is_numeric_dtype(frame[name])
        and not pd.api.types.is_bool_dtype(frame[name])
        and frame[name].notna().any()
    ]


def _numeric(valid: pd.DataFrame, name: str, result: Analysis) -> None:
    groups = []
    for prompt, rows in valid.groupby("prompt_id", sort=False):
        values = rows[name].dropna().to_numpy(dtype=float)
        if not len(values):
            continue
        groups.append(values)
        mean_low, mean_high = bootstrap_mean(values)
        median_low, median_high = bootstrap_mean(values, statistic="median")
        result.numeric.append(
            NumericSummary(
                name,
                str(prompt),
                len(values),
                float(values.mean()),
                mean_low,
                mean_high,
                float(np.median(values)),
                median_low,
                median_high,
            )
        )
    test = rank_test(groups)
    if test is not None:
        row = TestRow(
            name, "prompt", test.method, test.statistic, len(groups) - 1, test.p_value, test.effect
        )
        means = {s.group: s.mean for s in result.numeric if s.field == name}
        high, low = max(means, key=means.get), min(means, key=means.get)
        row.sentence = (
            f"prompt {high} gives a higher {name} than {low} "
            f"({means[high]:.3g} vs {means[low]:.3g} on average)"
        )
        result.tests.append(row)


def _field_probs(valid: pd.DataFrame, name: str, levels: list[str]) -> list[FieldProbSummary]:
    """Mean field_probs per value with a bootstrap interval, against counting draws."""
    found = []
    for prompt, rows in valid.groupby("prompt_id", sort=False):
        dists = [p[name] for p in rows["field_probs"] if isinstance(p, dict) and name in p]
        if len(dists) < 2:
            continue
        drawn = rows[name].astype(str)
        for level in levels:
            values = np.array([d.get(level, 0.0) for d in dists])
            low, high = bootstrap_mean(values)
            k = int((drawn == level).sum())
            w_low, w_high = wilson(k, len(drawn))
            width = high - low
            found.append(
                FieldProbSummary(
                    name,
                    str(prompt),
                    level,
                    float(values.mean()),
                    low,
                    high,
                    k / len(drawn),
                    (w_high - w_low) / width if width > 0 else float("inf"),
                )
            )
    return found


def _mentions(valid: pd.DataFrame, terms: dict[str, str]) -> list[TermMentions]:
    found = []
    traces = valid.dropna(subset=["reasoning"])
    for term, pattern in terms.items():
        regex = re.compile(pattern, re.IGNORECASE)
        for (prompt, condition), rows in traces.groupby(["prompt_id", "condition"], sort=False):
            hits = int(rows["reasoning"].str.contains(regex).sum())
            low, high = wilson(hits, len(rows))
            found.append(
                TermMentions(
                    term, str(prompt), str(condition), len(rows), hits / len(rows), low, high
                )
            )
    return found
