"""Paired variants: prompts of one `group` that differ only in their `variant` (vecino /
vecina, hombre / mujer), compared with each other.

- `variant_tests(rows, column, name, ...)`: the headline of a spec that pairs variants.
  One test per field of "does the answer depend on the variant?", the variants compared
  inside each group (× condition × model that vary): the stratified permutation χ² of
  `stats.stratified_independence`. Since muestra draws sample i of every variant of a
  group from the same random stream (`engine.seeds`, the "paired" scheme), the variants'
  answers are positively coupled; the permutation null treats them as independent, so the
  test is conservative, never anti-conservative. Beside it, each value's share per
  variant and their difference averaged over the groups (each group weighs the same)
  with a paired cluster-bootstrap interval (`Comparison` rows, by "variant").
- `counterfactuals(valid, name, levels, exact)`: per group × condition × model and pair of
  variants, the difference of each value's share (Newcombe's interval) and the flip rate:
  how often sample i's answer differs between the variants, next to the flip rate expected
  by chance — if the two variants' answers were drawn independently, each from its own
  distribution P: 1 − Σ_v P_a(v) P_b(v). P is the mean of the samples' exact field_probs
  where they are the distribution the answer was drawn from (`exact`: the conditions whose
  answer is sampled at temperature 1, untruncated), else the counted shares (`chance_from`
  says which). Two draws of one unchanged distribution disagree that often too: only a
  flip rate well above chance says the variant changes answers.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd

from muestra.analysis.stats import difference, paired_difference, stratified_independence


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
    flip_rate: float | None  # None: no sample index drawn for both variants
    chance_flip_rate: float | None = None  # expected with independent draws (see module)
    chance_from: str = "shares"  # "field_probs" (exact) or "shares" (counted)


def chance_flip(p_a: np.ndarray, p_b: np.ndarray) -> float:
    """P(two independent draws, one from `p_a`, one from `p_b`, differ)."""
    return float(1.0 - np.dot(p_a / p_a.sum(), p_b / p_b.sum()))


def _distribution(rows: pd.DataFrame, name: str, levels: list[str], exact: bool) -> np.ndarray:
    """Mean field_probs of `name` over `rows` (exact) when every row has them, else the
    counted shares."""
    probs = [p.get(name) for p in rows["field_probs"] if isinstance(p, dict)]
    if exact and len(probs) == len(rows) and all(isinstance(p, dict) for p in probs):
        return np.array([np.mean([p.get(level, 0.0) for p in probs]) for level in levels])
    counts = rows[name].astype(str).value_counts()
    return np.array([counts.get(level, 0) for level in levels], dtype=float)


def counterfactuals(
    valid: pd.DataFrame, name: str, levels: list[str], exact: set[str] | None = None
) -> list[Counterfactual]:
    found = []
    paired = valid.dropna(subset=["group", "variant", name])
    for (group, condition, model), rows in paired.groupby(["group", "condition", "model"]):
        variants = sorted(rows["variant"].unique())
        from_probs = str(condition) in (exact or set()) and "field_probs" in rows
        for a, b in itertools.combinations(variants, 2):
            part_a, part_b = rows[rows["variant"] == a], rows[rows["variant"] == b]
            left = part_a.set_index("sample")[name].astype(str)
            right = part_b.set_index("sample")[name].astype(str)
            common = left.index.intersection(right.index)
            flips = float((left[common] != right[common]).mean()) if len(common) else None
            dist_a = _distribution(part_a, name, levels, from_probs)
            dist_b = _distribution(part_b, name, levels, from_probs)
            exact_probs = from_probs and dist_a.sum() > 0 and not part_a[name].empty
            chance = chance_flip(dist_a, dist_b) if dist_a.sum() and dist_b.sum() else None
            for level in levels:
                k1, k2 = int((left == level).sum()), int((right == level).sum())
                diff, low, high = difference(k1, len(left), k2, len(right))
                found.append(
                    Counterfactual(
                        str(group), str(condition), str(model), name, level, a, b,
                        k1 / len(left), k2 / len(right), diff, low, high, flips, chance,
                        "field_probs" if exact_probs else "shares",
                    )
                )  # fmt: skip
    return found


@dataclass
class VariantTest:
    """Does `field` depend on the variant, compared inside each group?"""

    field: str
    variants: list[str]
    groups: int  # groups holding two or more variants
    method: str | None  # None: no group had two variants and two values (nothing to test)
    statistic: float
    dof: int
    p_value: float
    cramers_v: float


def variant_units(rows: pd.DataFrame) -> pd.Series:
    """The unit inside which variants are compared: the group, × the condition and the
    model when several ran."""
    keys = ["group"] + [k for k in ("condition", "model") if rows[k].nunique() > 1]
    return rows[keys].astype(str).agg("\x1f".join, axis=1)


def variant_test(rows: pd.DataFrame, column: pd.Series, name: str) -> VariantTest:
    """`rows`: the samples of paired prompts (group and variant set); `column`: the field's
    values as strings, indexed like `rows`."""
    units = variant_units(rows)
    groups = int((rows.groupby(units)["variant"].nunique() > 1).sum())
    variants = sorted(rows["variant"].astype(str).unique())
    test = stratified_independence(
        rows["variant"].astype(str).to_numpy(), column.to_numpy(), units.to_numpy()
    )
    if test is None:
        return VariantTest(name, variants, groups, None, 0.0, 0, 1.0, 0.0)
    return VariantTest(
        name, variants, groups, test.method, test.statistic, test.dof, test.p_value,
        test.cramers_v,
    )  # fmt: skip


@dataclass
class VariantShares:
    """Share of `value` under variants a and b, averaged over the units (groups) that have
    both, and their difference with a paired cluster-bootstrap interval."""

    value: str
    a: str
    b: str
    share_a: float
    share_b: float
    difference: float
    low: float
    high: float
    groups: int


def variant_shares(rows: pd.DataFrame, column: pd.Series, levels: list[str]) -> list[VariantShares]:
    units = variant_units(rows)
    found = []
    for a, b in itertools.combinations(sorted(rows["variant"].astype(str).unique()), 2):
        tables = []
        for level in (a, b):
            part = rows[rows["variant"].astype(str) == level]
            table = pd.crosstab(units[part.index], column[part.index])
            tables.append(table.reindex(columns=levels, fill_value=0))
        common = tables[0].index.intersection(tables[1].index)
        if not len(common):
            continue
        counts_a, counts_b = (t.loc[common].to_numpy() for t in tables)
        diff, low, high = paired_difference(counts_a, counts_b)
        share_a = (counts_a / counts_a.sum(axis=1, keepdims=True)).mean(axis=0)
        share_b = (counts_b / counts_b.sum(axis=1, keepdims=True)).mean(axis=0)
        found += [
            VariantShares(value, a, b, float(sa), float(sb), float(d), float(lo), float(hi),
                          len(common))
            for value, sa, sb, d, lo, hi in zip(levels, share_a, share_b, diff, low, high,
                                                strict=True)
        ]  # fmt: skip
    return found
