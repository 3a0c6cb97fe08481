"""Statistics on generated answers, each a thin, checked call into scipy/statsmodels.

- `wilson`: a proportion's 95% interval (Wilson score; sound at 0% and 100%, where
  seed 000's answers often are).
- `independence`: is a categorical field independent of the prompt (or condition, or
  model)? χ² on the contingency table; when an expected count is below 5, a Monte-Carlo
  permutation version of the same χ² statistic (fixed seed, 9,999 resamples) replaces
  the asymptotic p-value. Effect size: Cramér's V.
- `distance_to`: total variation and Jensen–Shannon distance (base 2) to a reference
  distribution (uniform unless the spec gives one), and entropy normalised to [0, 1].
- `adjust`: Holm and Benjamini–Hochberg over every test of a report.
- `difference`: difference of two proportions with Newcombe's interval (counterfactual
  pairs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats
from scipy.spatial.distance import jensenshannon
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import confint_proportions_2indep, proportion_confint

MONTE_CARLO_RESAMPLES = 9999


def wilson(successes: int, total: int, level: float = 0.95) -> tuple[float, float]:
    if total == 0:
        return (0.0, 1.0)
    low, high = proportion_confint(successes, total, alpha=1 - level, method="wilson")
    return float(low), float(high)


@dataclass(frozen=True)
class IndependenceTest:
    method: str  # "chi2" or "chi2-monte-carlo"
    statistic: float
    dof: int
    p_value: float
    cramers_v: float


def independence(table: np.ndarray, seed: int = 0) -> IndependenceTest | None:
    """χ² test of a (groups × values) count table; None when it has fewer than 2×2 cells
    with data (nothing to compare)."""
    table = np.asarray(table, dtype=np.int64)
    table = table[table.sum(axis=1) > 0][:, table.sum(axis=0) > 0]
    if table.shape[0] < 2 or table.shape[1] < 2:
        return None
    result = stats.chi2_contingency(table, correction=False)
    method, p_value = "chi2", float(result.pvalue)
    if (result.expected_freq < 5).any():
        monte_carlo = stats.chi2_contingency(
            table,
            correction=False,
            method=stats.PermutationMethod(
                n_resamples=MONTE_CARLO_RESAMPLES, rng=np.random.default_rng(seed)
            ),
        )
        method, p_value = "chi2-monte-carlo", float(monte_carlo.pvalue)
    v = float(stats.contingency.association(table, method="cramer"))
    return IndependenceTest(method, float(result.statistic), int(result.dof), p_value, v)


@dataclass(frozen=True)
class Distance:
    total_variation: float
    jensen_shannon: float
    normalised_entropy: float


def distance_to(probabilities: np.ndarray, reference: np.ndarray | None = None) -> Distance:
    p = np.asarray(probabilities, dtype=float)
    p = p / p.sum()
    q = np.full_like(p, 1 / len(p)) if reference is None else np.asarray(reference, float)
    q = q / q.sum()
    entropy = float(stats.entropy(p) / math.log(len(p))) if len(p) > 1 else 0.0
    return Distance(
        total_variation=float(0.5 * np.abs(p - q).sum()),
        jensen_shannon=float(jensenshannon(p, q, base=2)),
        normalised_entropy=entropy,
    )


def adjust(p_values: list[float]) -> tuple[list[float], list[float]]:
    """(Holm, Benjamini–Hochberg) adjusted p-values, in the input order."""
    if not p_values:
        return [], []
    holm = multipletests(p_values, method="holm")[1]
    bh = multipletests(p_values, method="fdr_bh")[1]
    return [float(v) for v in holm], [float(v) for v in bh]


def bootstrap_mean(
    values: np.ndarray, seed: int = 0, statistic: str = "mean"
) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean (or median), 2,000 resamples, fixed seed."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2 or np.all(values == values[0]):
        return float(values[0]), float(values[0])
    fn = np.mean if statistic == "mean" else np.median
    result = stats.bootstrap(
        (values,), fn, n_resamples=2000, method="percentile", rng=np.random.default_rng(seed)
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


@dataclass(frozen=True)
class RankTest:
    method: str  # "mann-whitney" or "kruskal-wallis"
    statistic: float
    p_value: float
    effect: float  # rank-biserial r (two groups) or epsilon squared (more)


def rank_test(groups: list[np.ndarray]) -> RankTest | None:
    groups = [np.asarray(g, dtype=float) for g in groups if len(g)]
    if len(groups) < 2 or len(np.unique(np.concatenate(groups))) < 2:
        return None
    if len(groups) == 2:
        u = stats.mannwhitneyu(groups[0], groups[1], alternative="two-sided")
        r = 1 - 2 * float(u.statistic) / (len(groups[0]) * len(groups[1]))
        return RankTest("mann-whitney", float(u.statistic), float(u.pvalue), r)
    h = stats.kruskal(*groups)
    n = sum(len(g) for g in groups)
    return RankTest(
        "kruskal-wallis", float(h.statistic), float(h.pvalue), float(h.statistic) / (n - 1)
    )


def difference(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float, float]:
    """p1 − p2 with Newcombe's 95% interval."""
    low, high = confint_proportions_2indep(k1, n1, k2, n2, method="newcomb", compare="diff")
    return k1 / n1 - k2 / n2, float(low), float(high)
