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
- `stratified_independence`: the same χ² question when samples come in strata (a
  condition compared within each prompt): Σ of the strata's χ², p-value from permuting
  the labels inside each stratum, so a prompt effect cannot pass for a condition effect.
- `cluster_shares` / `paired_difference`: estimates pooled over prompts, with a two-stage
  cluster bootstrap (resample prompts, then samples inside each prompt), because the
  samples of one prompt are not independent draws from the population of prompts.
- `within_cluster_difference`: the mean of a per-sample score in group a minus group b,
  inside each cluster (a probe's template) and averaged over clusters; p-value from
  permuting the group labels inside each cluster, interval from a two-stage cluster
  bootstrap (templates, then samples inside each template and group).
- `goodness_of_fit`: do one cell's answers follow the reference distribution? Exact
  binomial test for two values; Pearson χ² for more, with a Monte-Carlo p-value (seeded
  multinomial draws from the reference) when an expected count is below 5. Effect size:
  Cohen's w.
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


BOOTSTRAP_RESAMPLES = 2000


def _chi2_statistic(counts: np.ndarray) -> np.ndarray:
    """Pearson χ² of (..., rows, columns) count tables; empty rows/columns add nothing."""
    counts = counts.astype(float)
    rows = counts.sum(axis=-1, keepdims=True)
    columns = counts.sum(axis=-2, keepdims=True)
    total = rows.sum(axis=-2, keepdims=True)
    expected = rows * columns / np.where(total > 0, total, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        cells = np.where(expected > 0, (counts - expected) ** 2 / expected, 0.0)
    return cells.sum(axis=(-2, -1))


def stratified_independence(
    labels: np.ndarray,
    values: np.ndarray,
    strata: np.ndarray,
    seed: int = 0,
    resamples: int = MONTE_CARLO_RESAMPLES,
) -> IndependenceTest | None:
    """Is `values` independent of `labels` within each stratum? Statistic: Σ over strata
    of the stratum's χ²; p-value: share of within-stratum label permutations with a
    statistic at least as large (+1 smoothing). Cramér's V is that of the pooled table.
    None when no stratum has two labels and two values."""
    labels = np.unique(np.asarray(labels), return_inverse=True)[1]
    values = np.unique(np.asarray(values), return_inverse=True)[1]
    strata = np.unique(np.asarray(strata), return_inverse=True)[1]
    n_labels, n_values = labels.max() + 1, values.max() + 1
    informative = [
        s
        for s in range(strata.max() + 1)
        if len(np.unique(labels[strata == s])) > 1 and len(np.unique(values[strata == s])) > 1
    ]
    if not informative:
        return None
    rng = np.random.default_rng(seed)
    cells = n_labels * n_values
    observed, dof = 0.0, 0
    null = np.zeros(resamples)
    for s in informative:
        lab, val = labels[strata == s], values[strata == s]
        table = np.bincount(lab * n_values + val, minlength=cells).reshape(n_labels, n_values)
        observed += float(_chi2_statistic(table))
        used = table[table.sum(axis=1) > 0][:, table.sum(axis=0) > 0]
        dof += (used.shape[0] - 1) * (used.shape[1] - 1)
        for start in range(0, resamples, 500):
            size = min(500, resamples - start)
            shuffled = rng.permuted(np.tile(lab, (size, 1)), axis=1)
            flat = (np.arange(size)[:, None] * cells + shuffled * n_values + val).ravel()
            tables = np.bincount(flat, minlength=size * cells).reshape(size, n_labels, n_values)
            null[start : start + size] += _chi2_statistic(tables)
    p_value = (1 + int((null >= observed - 1e-9).sum())) / (resamples + 1)
    pooled = np.bincount(labels * n_values + values, minlength=cells).reshape(n_labels, n_values)
    pooled = pooled[pooled.sum(axis=1) > 0][:, pooled.sum(axis=0) > 0]
    v = float(stats.contingency.association(pooled, method="cramer"))
    return IndependenceTest("chi2-stratified-permutation", observed, dof, p_value, v)


def _two_stage(counts: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """Resample clusters (rows of a clusters × values count table) with replacement, then
    samples inside each chosen cluster (multinomial on its observed shares).
    Returns (resamples, clusters, values) counts."""
    clusters = counts.shape[0]
    totals = counts.sum(axis=1)
    shares = counts / np.where(totals > 0, totals, 1)[:, None]
    shares[totals == 0] = 1.0 / counts.shape[1]
    chosen = rng.integers(0, clusters, size=(resamples, clusters))
    return rng.multinomial(totals[chosen], shares[chosen])


def cluster_shares(
    counts: np.ndarray, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pooled share of each value over clusters (prompts) — Σ counts ÷ Σ samples — with a
    95% percentile interval from the two-stage cluster bootstrap. `counts` is clusters ×
    values."""
    counts = np.asarray(counts, dtype=np.int64)
    estimate = counts.sum(axis=0) / max(int(counts.sum()), 1)
    draws = _two_stage(counts, np.random.default_rng(seed), resamples).sum(axis=1)
    pooled = draws / np.maximum(draws.sum(axis=1, keepdims=True), 1)
    low, high = np.percentile(pooled, [2.5, 97.5], axis=0)
    return estimate, low, high


def paired_difference(
    counts_a: np.ndarray,
    counts_b: np.ndarray,
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over clusters (prompts) of share_a − share_b per value, each prompt weighing the
    same, with a 95% percentile interval from a paired two-stage cluster bootstrap (the
    same prompts are drawn for both sides; samples are redrawn inside each side).
    `counts_a`, `counts_b`: clusters × values, rows aligned."""
    counts_a = np.asarray(counts_a, dtype=np.int64)
    counts_b = np.asarray(counts_b, dtype=np.int64)

    def shares(counts: np.ndarray) -> np.ndarray:
        return counts / np.maximum(counts.sum(axis=-1, keepdims=True), 1)

    estimate = (shares(counts_a) - shares(counts_b)).mean(axis=0)
    rng = np.random.default_rng(seed)
    clusters = counts_a.shape[0]
    chosen = rng.integers(0, clusters, size=(resamples, clusters))
    draws = []
    for counts in (counts_a, counts_b):
        totals = counts.sum(axis=1)
        draws.append(shares(rng.multinomial(totals[chosen], shares(counts)[chosen])))
    diffs = (draws[0] - draws[1]).mean(axis=1)
    low, high = np.percentile(diffs, [2.5, 97.5], axis=0)
    return estimate, low, high


@dataclass(frozen=True)
class ClusterDifference:
    estimate: float  # mean over clusters of mean(a) - mean(b)
    low: float
    high: float
    p_value: float
    clusters: int  # clusters with samples of both groups


def within_cluster_difference(
    values: np.ndarray,
    in_a: np.ndarray,
    clusters: np.ndarray,
    seed: int = 0,
    resamples: int = 2000,
) -> ClusterDifference | None:
    """Group a − group b of a per-sample score, within clusters (see the module's notes).
    `in_a` is True for group a's samples, False for group b's. The statistic weighs every
    cluster the same; the two-sided p-value counts label permutations (inside each
    cluster) whose |statistic| is at least the observed one (+1 smoothing). None when no
    cluster has samples of both groups."""
    values = np.asarray(values, dtype=float)
    in_a = np.asarray(in_a, dtype=bool)
    clusters = np.unique(np.asarray(clusters), return_inverse=True)[1]
    rng = np.random.default_rng(seed)
    kept = [
        c
        for c in range(clusters.max() + 1 if len(clusters) else 0)
        if in_a[clusters == c].any() and (~in_a[clusters == c]).any()
    ]
    if not kept:
        return None
    observed, null = 0.0, np.zeros(resamples)
    chosen = rng.integers(0, len(kept), size=(resamples, len(kept)))
    parts = []
    for c in kept:
        v, a = values[clusters == c], in_a[clusters == c]
        observed += v[a].mean() - v[~a].mean()
        shuffled = rng.permuted(np.tile(a, (resamples, 1)), axis=1)
        n_a = a.sum()
        null += (shuffled * v).sum(axis=1) / n_a - (~shuffled * v).sum(axis=1) / (len(v) - n_a)
        # bootstrap: samples redrawn inside each side of the cluster
        side_a = rng.choice(v[a], size=(resamples, int(n_a))).mean(axis=1)
        side_b = rng.choice(v[~a], size=(resamples, int(len(v) - n_a))).mean(axis=1)
        parts.append(side_a - side_b)
    observed /= len(kept)
    null /= len(kept)
    per_cluster = np.stack(parts, axis=1)  # resamples x clusters
    boot = np.take_along_axis(per_cluster, chosen, axis=1).mean(axis=1)
    p_value = (1 + int((np.abs(null) >= abs(observed) - 1e-12).sum())) / (resamples + 1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return ClusterDifference(float(observed), float(low), float(high), p_value, len(kept))


def interaction_difference(
    values: np.ndarray,
    in_a: np.ndarray,
    first: np.ndarray,
    clusters: np.ndarray,
    seed: int = 0,
    resamples: int = 2000,
) -> ClusterDifference | None:
    """How much larger the group gap a − b is for the `first` model than for the second,
    within clusters: per cluster (gap of the first) − (gap of the second), every cluster
    weighed the same (a difference in differences). The two-sided p-value permutes the
    model labels inside each cluster × group cell (so each model keeps its group sizes;
    +1 smoothing); the interval is a bootstrap that redraws clusters and, inside them,
    samples within each of the four cells. None when no cluster has all four cells."""
    values = np.asarray(values, dtype=float)
    in_a, first = np.asarray(in_a, dtype=bool), np.asarray(first, dtype=bool)
    clusters = np.unique(np.asarray(clusters), return_inverse=True)[1]
    rng = np.random.default_rng(seed)

    def cells(c: int) -> list[np.ndarray]:
        here = clusters == c
        return [here & (in_a == g) & (first == m) for g in (True, False) for m in (True, False)]

    kept = [c for c in range(clusters.max() + 1 if len(clusters) else 0) if all(
        x.any() for x in cells(c)
    )]  # fmt: skip
    if not kept:
        return None
    observed, null, parts = 0.0, np.zeros(resamples), []
    for c in kept:
        a_first, a_second, b_first, b_second = (values[x] for x in cells(c))
        observed += (a_first.mean() - b_first.mean()) - (a_second.mean() - b_second.mean())
        for side, one, other in ((1.0, a_first, a_second), (-1.0, b_first, b_second)):
            pooled = np.concatenate([one, other])
            shuffled = rng.permuted(np.tile(pooled, (resamples, 1)), axis=1)
            null += side * (
                shuffled[:, : len(one)].mean(axis=1) - shuffled[:, len(one) :].mean(axis=1)
            )
        parts.append(
            rng.choice(a_first, (resamples, len(a_first))).mean(axis=1)
            - rng.choice(b_first, (resamples, len(b_first))).mean(axis=1)
            - rng.choice(a_second, (resamples, len(a_second))).mean(axis=1)
            + rng.choice(b_second, (resamples, len(b_second))).mean(axis=1)
        )
    observed /= len(kept)
    null /= len(kept)
    chosen = rng.integers(0, len(kept), size=(resamples, len(kept)))
    boot = np.take_along_axis(np.stack(parts, axis=1), chosen, axis=1).mean(axis=1)
    p_value = (1 + int((np.abs(null) >= abs(observed) - 1e-12).sum())) / (resamples + 1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return ClusterDifference(float(observed), float(low), float(high), p_value, len(kept))


FIT_RESAMPLES = 20000


@dataclass(frozen=True)
class FitTest:
    method: str  # "binomial", "chi2", "chi2-monte-carlo" or "outside-reference"
    statistic: float  # count of the first value (binomial) or Pearson χ²
    dof: int
    p_value: float
    cohens_w: float  # √Σ (share − reference)² / reference


def _pearson(counts: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Pearson χ² of (..., values) counts against expected counts (all > 0)."""
    return ((counts - expected) ** 2 / expected).sum(axis=-1)


def goodness_of_fit(
    counts: np.ndarray, reference: np.ndarray, seed: int = 0, resamples: int = FIT_RESAMPLES
) -> FitTest | None:
    """Are `counts` (one per value) a sample from the `reference` shares (any positive
    scale)? Two values: exact two-sided binomial test. More: Pearson χ², with a
    Monte-Carlo p-value (`resamples` multinomial draws from the reference, +1 smoothing)
    when an expected count is below 5. Values the reference rules out and nobody chose are
    left out; a count on such a value is impossible under the reference (p = 0). None when
    there are no samples or fewer than two possible values (nothing to test)."""
    counts = np.asarray(counts, dtype=np.int64)
    reference = np.asarray(reference, dtype=float)
    assert counts.shape == reference.shape, f"{counts.shape} counts, {reference.shape} shares"
    assert reference.sum() > 0, "the reference gives every value share 0"
    n, possible = int(counts.sum()), reference > 0
    if n == 0:
        return None
    if counts[~possible].any():
        return FitTest("outside-reference", math.inf, len(counts) - 1, 0.0, math.inf)
    counts, reference = counts[possible], reference[possible] / reference.sum()
    if len(counts) < 2:
        return None
    dof = len(counts) - 1
    w = math.sqrt(float(((counts / n - reference) ** 2 / reference).sum()))
    if len(counts) == 2:
        p_value = stats.binomtest(int(counts[0]), n, float(reference[0])).pvalue
        return FitTest("binomial", float(counts[0]), dof, float(p_value), w)
    expected = n * reference
    statistic = float(_pearson(counts, expected))
    if (expected >= 5).all():
        p_value = stats.chisquare(counts, expected).pvalue
        return FitTest("chi2", statistic, dof, float(p_value), w)
    draws = np.random.default_rng(seed).multinomial(n, reference, size=resamples)
    null = _pearson(draws, expected)  # (resamples,)
    p_value = (1 + int((null >= statistic - 1e-9).sum())) / (resamples + 1)
    return FitTest("chi2-monte-carlo", statistic, dof, p_value, w)
