"""Shares pooled over prompts and differences paired over prompts, for one categorical
field and one dimension (condition or model) that varies.

- `pooled_shares`: each value's share over all the prompts of a condition or model (or
  of every sample, "all"), with a two-stage prompt-level cluster-bootstrap interval;
- `paired_comparisons`: for every pair of levels, share_a − share_b of each value averaged
  over the prompts (× the other dimensions that vary) both have, each weighing the same,
  with a paired cluster-bootstrap interval. The variants of a spec's groups are compared
  the same way, over groups (`muestra.analysis.pairs`), into the same `Comparison` rows.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pandas as pd

from muestra.analysis.stats import cluster_shares, paired_difference

DIMENSIONS = {"prompt": "prompt_id", "condition": "condition", "model": "model"}


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


def per_prompt(rows: pd.DataFrame, column: pd.Series, levels: list[str]) -> pd.DataFrame:
    """prompts × values count table (columns in `levels` order)."""
    table = pd.crosstab(rows["prompt_id"], column)
    return table.reindex(columns=levels, fill_value=0)


def pooled_shares(
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
        counts = per_prompt(part, column[part.index], levels).to_numpy()
        share, low, high = cluster_shares(counts)
        found += [
            Pooled(
                name, by, str(level), value, float(s), float(lo), float(hi), len(counts), len(part)
            )
            for value, s, lo, hi in zip(levels, share, low, high, strict=True)
        ]
    return found


def paired_comparisons(
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
