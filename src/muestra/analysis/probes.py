"""Group differences in a free-text probe, tested within each template.

A probe samples continuations of templates that differ only in a group word ("The man
worked as" / "The woman worked as"). Every sample carries scores (`scores_json`): lexicon
category counts, the extracted phrase and its category, a judge's answer and its exact
field probabilities. Each scorer (`analysis/probe_scores.py`, which owns both the record
it writes and how it is read back) turns its scores into per-sample *features* — 0/1
indicators ("names a word of the category 'caring'", "the phrase is 'nurse'", "the
judge said sentiment = negative") or numbers (the judge's probability of a value) — and
for every feature and pair of groups:

- the share (mean) per group pooled over templates, with a two-stage cluster-bootstrap
  interval;
- the difference a − b inside each template, averaged over templates, with a stratified
  permutation p-value and a cluster-bootstrap interval (`within_cluster_difference`):
  templates are clusters, so a template effect cannot pass for a group effect;
- for categorical scores (extracted phrase, judge enums) also the omnibus χ² test of
  group × value stratified by template;
- Holm and Benjamini–Hochberg over every test of the probe, and one plain sentence per
  difference significant after Holm.

`compare_models` puts two models' runs of one probe side by side: for every feature and
pair of groups, each model's gap a − b within templates and the difference between the
two gaps (a difference in differences, templates as clusters: `interaction_difference`),
Holm-adjusted over the probe: which model's continuations are more skewed, and whether
that is more than chance.

`top_words` ranks the words (lemmas) of each group's continuations against the other's
by the log-odds ratio with an informative Dirichlet prior (`analysis.text.log_odds`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd

from muestra.analysis.language import LANGUAGES, say
from muestra.analysis.probe_scores import CONTINUATION, EXTRACTION, Feature, features, stored
from muestra.analysis.stats import (
    adjust,
    interaction_difference,
    stratified_independence,
    within_cluster_difference,
)
from muestra.analysis.text import Normaliser, WordScore, log_odds


@dataclass
class GroupMean:
    feature: str
    group: str
    n: int
    mean: float
    low: float
    high: float


@dataclass
class GroupDifference:
    feature: str
    a: str
    b: str
    mean_a: float
    mean_b: float
    difference: float
    low: float
    high: float
    p_value: float
    templates: int
    binary: bool = True  # a share (0/1 feature) rather than a mean score
    p_holm: float = 1.0
    p_bh: float = 1.0
    sentence: str | None = None


@dataclass
class CategoricalTest:
    score: str  # "phrase", "category", "judge.sentiment"
    method: str
    statistic: float
    dof: int
    p_value: float
    cramers_v: float
    p_holm: float = 1.0
    p_bh: float = 1.0


@dataclass
class TopWords:
    group: str
    other: str
    words: list[WordScore]


@dataclass
class ProbeAnalysis:
    alpha: float
    groups: list[str]
    templates: list[str]
    samples: int
    valid: int
    means: list[GroupMean] = field(default_factory=list)
    differences: list[GroupDifference] = field(default_factory=list)
    tests: list[CategoricalTest] = field(default_factory=list)
    words: list[TopWords] = field(default_factory=list)
    phrases: dict[str, dict[str, int]] = field(default_factory=dict)  # group -> phrase -> n
    language: str = "en"  # the probe's texts' language (its figures speak it too)

    @property
    def findings(self) -> list[str]:
        return [d.sentence for d in self.differences if d.sentence]

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["findings"] = self.findings
        return data


def analyze_probe(
    frame: pd.DataFrame,
    *,
    alpha: float = 0.05,
    language: str = "en",
    lemmas: bool = True,
    examples: dict[str, str] | None = None,
    top: int = 10,
    prior_scale: float = 1.0,
    ignore: list[str] | None = None,
    seed: int = 0,
) -> ProbeAnalysis:
    """`frame`: a probe run's samples (`samples_frame`), `group` the template and `variant`
    the group. `examples`: group -> an example prompt, used in sentences."""
    valid = frame[frame["error"].isna()] if len(frame) else frame
    groups = list(dict.fromkeys(valid["variant"].astype(str)))
    templates = list(dict.fromkeys(valid["group"].astype(str)))
    result = ProbeAnalysis(alpha, groups, templates, len(frame), len(valid), language=language)
    scored = features(valid)  # every scorer's (analysis/probe_scores.py)
    found, categorical = scored.features, scored.categorical
    group, template = valid["variant"].astype(str), valid["group"].astype(str)
    for feature in found:
        scored = feature.values.notna()
        for g in groups:
            rows = scored & (group == g)
            result.means += [_mean(feature, g, feature.values[rows], template[rows], seed)]
        for a, b in combinations(groups, 2):
            rows = scored & group.isin([a, b])
            test = within_cluster_difference(
                feature.values[rows].to_numpy(),
                (group[rows] == a).to_numpy(),
                template[rows].to_numpy(),
                seed=seed,
            )
            if test is None:
                continue
            mean_a = float(feature.values[rows & (group == a)].mean())
            mean_b = float(feature.values[rows & (group == b)].mean())
            result.differences.append(
                GroupDifference(
                    feature.name, a, b, mean_a, mean_b, test.estimate, test.low, test.high,
                    test.p_value, test.clusters, feature.binary,
                )
            )  # fmt: skip
    for name, column in categorical.items():
        rows = column.notna()
        test = stratified_independence(
            group[rows].to_numpy(), column[rows].to_numpy(), template[rows].to_numpy(), seed
        )
        if test is not None:
            result.tests.append(
                CategoricalTest(
                    name, test.method, test.statistic, test.dof, test.p_value, test.cramers_v
                )
            )
    if EXTRACTION.phrase in categorical:
        phrase = categorical[EXTRACTION.phrase]
        for g in groups:
            result.phrases[g] = dict(Counter(phrase[group == g].dropna()).most_common())
    result.words = top_words(valid, Normaliser(language, lemmas), top, prior_scale, ignore)
    tests: list[GroupDifference | CategoricalTest] = [*result.differences, *result.tests]
    holm, bh = adjust([t.p_value for t in tests])
    for t, p_holm, p_bh in zip(tests, holm, bh, strict=True):
        t.p_holm, t.p_bh = p_holm, p_bh
    texts = {f.name: f for f in found}
    for d in result.differences:
        if d.p_holm < alpha:
            d.sentence = sentence(d, texts[d.feature], examples or {}, language)
    return result


def _mean(
    feature: Feature, group: str, values: pd.Series, template: pd.Series, seed: int
) -> GroupMean:
    """Pooled mean with a two-stage cluster bootstrap over templates."""
    if values.empty:
        return GroupMean(feature.name, group, 0, np.nan, np.nan, np.nan)
    rng = np.random.default_rng(seed)
    parts = [values[template == t].to_numpy() for t in dict.fromkeys(template)]
    resamples = 1000
    sums = np.stack([rng.choice(p, (resamples, len(p))).sum(axis=1) for p in parts], axis=1)
    sizes = np.array([len(p) for p in parts])
    chosen = rng.integers(0, len(parts), (resamples, len(parts)))
    draws = np.take_along_axis(sums, chosen, axis=1).sum(axis=1) / sizes[chosen].sum(axis=1)
    low, high = np.percentile(draws, [2.5, 97.5])
    return GroupMean(feature.name, group, len(values), float(values.mean()), low, high)


def _p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def sentence(
    d: GroupDifference, feature: Feature, examples: dict[str, str], lang: str = "en"
) -> str:
    """One plain sentence for a significant difference, in `lang` (en or es; another
    language of the probe's texts gets English)."""
    lang = lang if lang in LANGUAGES else "en"

    def who(group: str) -> str:
        example = examples.get(group)
        return f"'{example}…'" if example else f"'{group}'"

    a, b, mean_a, mean_b = d.a, d.b, d.mean_a, d.mean_b
    low, high, diff = d.low, d.high, d.difference
    if feature.binary and diff < 0:  # the group with the higher share first
        a, b, mean_a, mean_b = b, a, mean_b, mean_a
        low, high, diff = -high, -low, -diff
    return say(
        "probe_binary" if feature.binary else "probe_mean", lang,
        a_who=who(a), b_who=who(b), feature=feature_text(feature, lang), a=a, b=b,
        mean_a=mean_a, mean_b=mean_b, diff=diff, low=low, high=high,
        p=_p_text(d.p_holm), templates=d.templates,
    )  # fmt: skip


def feature_text(feature: Feature, lang: str) -> str:
    """How a sentence names `feature` in `lang`: the scorers' own English text, or the
    Spanish of a lexicon, phrase or category feature (a judge's features keep their
    English: the judge's fields are named in the judge's schema)."""
    kind, _, name = feature.name.partition(":" if feature.name.startswith("lexicon:") else "=")
    key = {"lexicon": "feature_lexicon", "phrase": "feature_phrase",
           "category": "feature_category"}.get(kind)  # fmt: skip
    return say(key, lang, name=name) if key and lang == "es" else feature.text


def top_words(
    frame: pd.DataFrame,
    normaliser: Normaliser,
    top: int = 10,
    prior_scale: float = 1.0,
    ignore: list[str] | None = None,
) -> list[TopWords]:
    """For each pair of groups, the `top` words most typical of each side (z > 0), in
    their continuations (the `continuation` score when present, else the answer text)."""
    skip = {normaliser.word(w) for w in ignore or ()}
    texts = stored(frame, CONTINUATION).fillna(frame["answer_text"])
    counts: dict[str, Counter[str]] = {}
    for group, rows in texts.groupby(frame["variant"].astype(str), sort=False):
        counts[str(group)] = Counter(
            w for text in rows for w in normaliser.words(str(text)) if w not in skip
        )
    found = []
    for a, b in combinations(counts, 2):
        scores = log_odds(counts[a], counts[b], prior_scale=prior_scale)
        found.append(TopWords(a, b, [s for s in scores[:top] if s.z > 0]))
        found.append(TopWords(b, a, [_flip(s) for s in scores[::-1][:top] if s.z < 0]))
    return found


def _flip(s: WordScore) -> WordScore:
    return WordScore(s.word, s.count_b, s.count_a, -s.delta, s.variance, -s.z)


@dataclass
class ModelGap:
    """How differently two models treat a pair of groups on one feature."""

    feature: str
    a: str
    b: str
    gap_first: float  # first model's group a − group b, within templates
    gap_second: float
    difference: float  # gap_first − gap_second
    low: float
    high: float
    p_value: float
    templates: int
    binary: bool = True
    p_holm: float = 1.0
    p_bh: float = 1.0
    sentence: str | None = None


@dataclass
class ModelComparison:
    first: str
    second: str
    alpha: float
    gaps: list[ModelGap] = field(default_factory=list)

    @property
    def findings(self) -> list[str]:
        return [g.sentence for g in self.gaps if g.sentence]

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["findings"] = self.findings
        return data


def compare_models(
    frame: pd.DataFrame,
    first: str,
    second: str,
    *,
    alpha: float = 0.05,
    seed: int = 0,
    language: str = "en",
) -> ModelComparison:
    """`frame`: both models' samples of one probe (`model` holds their labels);
    `language`: the probe's texts' (its findings speak it, as `analyze_probe`'s do)."""
    valid = frame[frame["error"].isna() & frame["model"].isin([first, second])]
    result = ModelComparison(first, second, alpha)
    found = features(valid).features
    model, group = valid["model"].astype(str), valid["variant"].astype(str)
    template = valid["group"].astype(str)
    groups = list(dict.fromkeys(group))
    for feature in found:
        scored = feature.values.notna()
        for a, b in combinations(groups, 2):
            rows = scored & group.isin([a, b])
            test = interaction_difference(
                feature.values[rows].to_numpy(),
                (group[rows] == a).to_numpy(),
                (model[rows] == first).to_numpy(),
                template[rows].to_numpy(),
                seed=seed,
            )
            if test is None:
                continue
            gaps = []
            for name in (first, second):
                mine = rows & (model == name)
                one = within_cluster_difference(
                    feature.values[mine].to_numpy(),
                    (group[mine] == a).to_numpy(),
                    template[mine].to_numpy(),
                    seed=seed,
                    resamples=200,
                )
                gaps.append(one.estimate if one is not None else float("nan"))
            result.gaps.append(
                ModelGap(
                    feature.name, a, b, gaps[0], gaps[1], test.estimate, test.low, test.high,
                    test.p_value, test.clusters, feature.binary,
                )
            )  # fmt: skip
    holm, bh = adjust([g.p_value for g in result.gaps])
    texts = {f.name: f for f in found}
    for g, p_holm, p_bh in zip(result.gaps, holm, bh, strict=True):
        g.p_holm, g.p_bh = p_holm, p_bh
        if p_holm < alpha:
            g.sentence = model_sentence(g, texts[g.feature], first, second, language)
    return result


def model_sentence(g: ModelGap, feature: Feature, first: str, second: str, lang: str = "en") -> str:
    """One plain sentence for a significant difference between the two models' gaps, in
    `lang` (en or es; another language of the probe's texts gets English)."""
    lang = lang if lang in LANGUAGES else "en"
    more, less = (first, second) if abs(g.gap_first) >= abs(g.gap_second) else (second, first)

    def unit(value: float) -> str:
        return say("points", lang, value=value * 100) if g.binary else f"{value:+.2f}"

    return say(
        "probe_models", lang, feature=feature_text(feature, lang), a=g.a, b=g.b,
        gap_first=unit(g.gap_first), gap_second=unit(g.gap_second), first=first,
        second=second, more=more, less=less, diff=g.difference, low=g.low, high=g.high,
        p=_p_text(g.p_holm), templates=g.templates,
    )  # fmt: skip
