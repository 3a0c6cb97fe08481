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
- Holm and Benjamini–Hochberg adjustment over every test of the report (both kinds),
  except the headline comparison of paired variants, adjusted as a family of its own;
- for each condition and model (and for all prompts together): shares pooled over
  prompts with a two-stage prompt-level cluster bootstrap interval, and condition /
  model differences paired over prompts (each prompt weighs the same) with a paired
  cluster-bootstrap interval;
- one plain sentence per significant finding;
- counterfactual pairs (same `group`, different `variant`): difference in proportions
  with Newcombe's interval per value, and the flip rate of the answer between variants
  for the same sample index beside the rate expected by chance (`muestra.analysis.pairs`);
- when the spec pairs variants, the headline: one test per field of the variants against
  each other inside each group, with a sentence whether it is significant or not
  (`findings`); the other significant tests are `other_findings`.

Free-text fields (a string without enum or const in the run's JSON Schema; without a
schema, see `columns.is_free_text`) are summarised as text (`freetext`) and never tested.
Sentences and notes are in `lang` ("en" or "es", `muestra.analysis.language`). Only
samples without an error count.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from muestra.analysis.columns import answer_fields, is_free_text, schema_kinds
from muestra.analysis.field_probs import FieldProbSummary, field_probs_summaries
from muestra.analysis.fit import FitRow, cell_fits
from muestra.analysis.freetext import TextSummary, summarise_text
from muestra.analysis.language import check, p_text, say
from muestra.analysis.pairs import (
    Counterfactual,
    counterfactuals,
    variant_shares,
    variant_test,
)
from muestra.analysis.pooling import (
    DIMENSIONS,
    Comparison,
    Pooled,
    paired_comparisons,
    pooled_shares,
)
from muestra.analysis.rewards import RewardAnalysis, analyze_rewards
from muestra.analysis.stats import (
    adjust,
    bootstrap_mean,
    distance_to,
    independence,
    rank_test,
    stratified_independence,
    wilson,
)
from muestra.errors import InputError


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
    headline: bool = False  # the comparison of a spec's paired variants: always said


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
    text: list[TextSummary] = field(default_factory=list)  # free-text fields
    notes: list[str] = field(default_factory=list)  # caveats a reader must see first
    rewards: RewardAnalysis | None = None  # when `muestra reward score` scored the run
    untested: list[str] = field(default_factory=list)  # headline comparisons with no test
    lang: str = "en"

    @property
    def findings(self) -> list[str]:
        """The headline: the variants compared (significant or not) when the spec pairs
        them, else every significant test's sentence."""
        head = [t.sentence for t in self.tests if t.headline and t.sentence] + self.untested
        return head or self._significant()

    @property
    def other_findings(self) -> list[str]:
        """Significant tests beside a headline comparison of variants (else empty)."""
        return self._significant() if any(t.headline for t in self.tests) or self.untested else []

    def _significant(self) -> list[str]:
        return [t.sentence for t in [*self.tests, *self.fits] if t.sentence and not
                getattr(t, "headline", False)]  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["findings"] = self.findings
        data["other_findings"] = self.other_findings
        return data


def _beam_notes(frame: pd.DataFrame, lang: str = "en") -> list[str]:
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
        notes.append(say("beam_rows", lang, conditions=conditions, phase=phase))
    return notes


def categorical_fields(frame: pd.DataFrame, kinds: dict[str, str] | None = None) -> list[str]:
    """Answer fields analysed as categories: not numeric, not free text (`kinds`: the
    schema's, `columns.schema_kinds`)."""
    chosen = []
    for name in answer_fields(frame):
        values = frame[name].dropna()
        if values.empty:
            continue
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        if not numeric and not is_free_text(frame, name, kinds):
            chosen.append(name)
    return chosen


def text_fields(frame: pd.DataFrame, kinds: dict[str, str] | None = None) -> list[str]:
    """Answer fields that are free text (summarised as text, never tested)."""
    return [n for n in answer_fields(frame) if is_free_text(frame, n, kinds)]


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
    *,
    schema: dict[str, Any] | None = None,
    lang: str = "en",
    exact: set[str] | None = None,
) -> Analysis:
    """`schema`: the run's JSON Schema (decides which fields are free text); `exact`: the
    conditions whose answers are drawn from the distribution field_probs give (sampled at
    temperature 1, untruncated), for the flip rate's chance level."""
    valid = frame[frame["error"].isna()] if len(frame) else frame
    result = Analysis(alpha=alpha, samples=len(frame), valid=len(valid), lang=check(lang))
    result.notes += _beam_notes(frame, result.lang)
    kinds = schema_kinds(schema)
    free = text_fields(valid, kinds)
    for name in free:
        result.text += summarise_text(valid, name)
    if free:
        result.notes.append(say("free_text", lang, fields=", ".join(free)))
    for name in categorical_fields(valid, kinds):
        _categorical(valid, name, (reference or {}).get(name), result, exact)
    for name in numeric_fields(valid):
        _numeric(valid, name, result)
    if terms is None:
        terms = default_terms(valid["reasoning"]) if "reasoning" in valid else DEFAULT_TERMS
    result.mentions = _mentions(valid, terms)
    result.rewards = analyze_rewards(frame)
    _adjust(result)
    return result


def _categorical(
    valid: pd.DataFrame,
    name: str,
    given: dict[str, float] | None,
    result: Analysis,
    exact: set[str] | None,
) -> None:
    """Distributions, fits, tests, pooled shares, comparisons, variants and field_probs of
    the categorical field `name`."""
    lang = result.lang
    column = valid[name].dropna().astype(str)
    levels = _levels(valid, name, column, given)
    ref = _reference_shares(name, levels, given)
    for prompt, rows in valid.loc[column.index].groupby("prompt_id", sort=False):
        shares = _shares(rows[name].astype(str), levels)
        dist = distance_to(np.array([s.count for s in shares]) + 0.0, ref)
        result.distributions.append(
            Distribution(name, str(prompt), len(rows), shares, dist.total_variation,
                         dist.jensen_shannon, dist.normalised_entropy)
        )  # fmt: skip
    rows = valid.loc[column.index]
    uniform = np.ones(len(levels))
    result.fits += cell_fits(rows, column, name, levels, uniform if ref is None else ref, lang)
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
            result.pooled += pooled_shares(rows, column, name, by, key, levels)
            result.comparisons += paired_comparisons(rows, column, name, by, key, levels)
        if test is not None:
            row = TestRow(
                name, by, test.method, test.statistic, test.dof, test.p_value, test.cramers_v
            )
            row.sentence = _sentence_parts(table, name, by, lang)
            result.tests.append(row)
    if rows["prompt_id"].nunique() > 1:
        result.pooled += pooled_shares(rows, column, name, "all", None, levels)
    _variants(rows, column, name, levels, result)
    result.counterfactuals += counterfactuals(valid, name, levels, exact)
    found, notes = field_probs_summaries(valid, name, levels, result.lang)
    result.field_probs += found
    result.notes += notes


MIN_GROUPS = 5  # groups a paired-difference interval in a headline sentence needs


def _variants(
    rows: pd.DataFrame, column: pd.Series, name: str, levels: list[str], result: Analysis
) -> None:
    """The headline of a spec that pairs variants: `name` compared between them."""
    paired = rows.dropna(subset=["group", "variant"])
    if paired.empty or paired.groupby("group")["variant"].nunique().max() < 2:
        return
    shares = variant_shares(paired, column[paired.index], levels)
    for s in shares:
        result.comparisons.append(
            Comparison(name, "variant", s.value, s.a, s.b, s.share_a, s.share_b,
                       s.difference, s.low, s.high, s.groups)
        )  # fmt: skip
    test = variant_test(paired, column[paired.index], name)
    largest = max(shares, key=lambda s: abs(s.difference), default=None)
    detail = ""
    if largest is not None:  # a bootstrap over fewer than MIN_GROUPS groups is no interval
        key = "variants" if largest.groups >= MIN_GROUPS else "variants_few"
        detail = say(key, result.lang, field=name, value=largest.value, a=largest.a,
                     b=largest.b, share_a=largest.share_a, share_b=largest.share_b,
                     diff=largest.difference, low=largest.low, high=largest.high,
                     groups=largest.groups)  # fmt: skip
    a, b = " / ".join(test.variants[:-1]), test.variants[-1]
    if test.method is None:
        result.untested.append(say("variants_untested", result.lang, a=a, b=b, detail=detail))
        return
    row = TestRow(name, "variant", test.method, test.statistic, test.dof, test.p_value,
                  test.cramers_v, headline=True)  # fmt: skip
    row.sentence = "\x1f".join([a, b, detail])  # finished once the p-value is adjusted
    result.tests.append(row)


def _adjust(result: Analysis) -> None:
    """Holm and BH over two families: the headline tests (the variants compared, one per
    field: the question the spec asks) among themselves, every other test of the report
    among the others. Sentences for the headline and for the significant others."""
    head = [t for t in result.tests if t.headline]
    rest: list[TestRow | FitRow] = [t for t in result.tests if not t.headline] + result.fits
    for family in (head, rest):
        _adjust_family(family, result)
    if head or result.untested:
        pairs = sorted({f"{c.a} / {c.b}" for c in result.comparisons if c.by == "variant"})
        result.notes.append(say("headline_variants", result.lang, pairs=", ".join(pairs)))


def _adjust_family(tests: list[Any], result: Analysis) -> None:
    holm, bh = adjust([t.p_value for t in tests]) if tests else ([], [])
    lang = result.lang
    for test, p_holm, p_bh in zip(tests, holm, bh, strict=True):
        test.p_holm, test.p_bh = p_holm, p_bh
        if isinstance(test, TestRow) and test.headline:
            a, b, detail = (test.sentence or "\x1f\x1f").split("\x1f")
            key = "variants_differ" if p_holm < result.alpha else "variants_same"
            test.sentence = say(key, lang, a=a, b=b, detail=detail, alpha=result.alpha,
                                p=p_text(p_holm))  # fmt: skip
        elif test.sentence is not None:
            test.sentence = f"{test.sentence}; {p_text(p_holm)}" if p_holm < result.alpha else None


def _sentence_parts(table: pd.DataFrame, name: str, by: str, lang: str = "en") -> str:
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
    words = {"by": say(by, lang) if by in ("prompt", "condition", "model") else by,
             "high": high, "low": low, "field": name, "value": value, "p_high": p_high,
             "p_low": p_low}  # fmt: skip
    if p_low > 0:
        return say("makes_likely", lang, ratio=p_high / p_low, **words)
    return say("in_none", lang, **words)


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
        row.sentence = say("higher_numeric", result.lang, high=high, low=low, field=name,
                           mean_high=means[high], mean_low=means[low])  # fmt: skip
        result.tests.append(row)


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
