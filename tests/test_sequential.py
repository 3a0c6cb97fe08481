"""Confidence sequences: the authors' own values, and validity under optional stopping shown
by simulation (both estimators), where a Wilson interval looked at again and again fails."""

from __future__ import annotations

import math

import numpy as np
import pytest
from statsmodels.stats.proportion import proportion_confint

from muestra.analysis.sequential import (
    StopRule,
    as_difference,
    band,
    betting_cs,
    first_stop,
)

T = np.arange(1, 201)
SEQUENCES = {  # deterministic, so that any numpy gives the same values
    "bernoulli": ((T * (1 + math.sqrt(5)) / 2) % 1 < 0.3).astype(float),
    "uniform": (T * math.sqrt(2)) % 1,
}
# `confseq.betting.betting_cs(x, alpha, breaks=1000, running_intersection=True)` from the
# authors' package (confseq 0.0.11, pure-Python part, run from its sdist: the package's C++
# part needs Boost and does not build here), bounds rounded to 3 decimals at t = 10, 50, 200
CONFSEQ = {
    ("bernoulli", 0.05): {10: (0.005, 0.683), 50: (0.131, 0.496), 200: (0.192, 0.406)},
    ("bernoulli", 0.1): {10: (0.029, 0.636), 50: (0.144, 0.477), 200: (0.2, 0.397)},
    ("uniform", 0.05): {10: (0.228, 0.754), 50: (0.386, 0.615), 200: (0.437, 0.561)},
    ("uniform", 0.1): {10: (0.258, 0.724), 50: (0.397, 0.603), 200: (0.443, 0.555)},
}


@pytest.mark.parametrize(("name", "alpha"), list(CONFSEQ))
def test_betting_cs_matches_the_authors_reference_code(name, alpha):
    lows, highs = betting_cs(SEQUENCES[name], alpha)
    for n, (low, high) in CONFSEQ[(name, alpha)].items():
        assert lows[n - 1] == pytest.approx(low, abs=1e-9)
        assert highs[n - 1] == pytest.approx(high, abs=1e-9)


def test_betting_cs_shrinks_nests_and_holds_the_mean():
    lows, highs = betting_cs(SEQUENCES["uniform"])
    assert (np.diff(lows) >= 0).all() and (np.diff(highs) <= 0).all()  # intersected
    assert lows[-1] < 0.5 < highs[-1] and highs[-1] - lows[-1] < 0.13
    # a sequence of one value: the band closes in on it from both sides
    lows, highs = betting_cs(np.ones(400))
    assert highs[-1] == 1 and 0.97 < lows[-1] < 1
    b = band([], 0.05)
    assert (b.n, b.low, b.high) == (0, 0.0, 1.0)


def test_the_difference_band_maps_back():
    b = as_difference(band(np.full(100, 0.75)))  # (x − y + 1)/2 = 0.75 → x − y = 0.5
    assert b.estimate == pytest.approx(0.5) and b.low < 0.5 < b.high
    assert b.half_width == pytest.approx(2 * band(np.full(100, 0.75)).half_width)


def test_vectorised_stops_match_the_band_read_at_each_look():
    rule = StopRule(precision=0.1, reference=0.5, min_samples=10, max_samples=120, every=10)
    x = (
        np.random.default_rng(3).random((6, 120)) < [[0.2], [0.5], [0.8], [0.5], [0.3], [0.9]]
    ) + 0.0
    stops = first_stop(x, rule, breaks=1000)
    for row in range(len(x)):
        for n in rule.looks():
            b = band(x[row, :n])
            if rule.reason(b) is not None:
                break
        assert stops.n[row] == n and stops.low[row] == pytest.approx(b.low)
        assert stops.estimate[row] == pytest.approx(b.estimate)


def test_stop_rule_looks_and_reasons():
    rule = StopRule(precision=0.05, reference=None, min_samples=10, max_samples=45, every=10)
    assert rule.looks() == [10, 20, 30, 40, 45]
    b = band(np.full(45, 0.5))
    assert rule.reason(b) == "max_samples"
    assert StopRule(None, 0.9, 10, 50, 5).reason(b) == "reference"
    assert StopRule(0.2, None, 10, 50, 5).reason(b) == "precision"


# ---- validity under optional stopping, by simulation -------------------------------------

RUNS = 1000
RULE = StopRule(precision=0.05, reference=0.5, min_samples=10, max_samples=600, every=5)


def naive_wilson_stops(x: np.ndarray, rule: StopRule) -> tuple[np.ndarray, np.ndarray]:
    """The naive rule, "Wilson until it looks narrow": the fixed-n 95% interval recomputed
    at every look, stopping as soon as it is within ± precision or excludes the reference."""
    stop_low, stop_high = np.zeros(len(x)), np.ones(len(x))
    open_ = np.ones(len(x), dtype=bool)
    sums = np.cumsum(x, axis=1)
    for n in rule.looks():
        low, high = proportion_confint(sums[:, n - 1], n, alpha=rule.alpha, method="wilson")
        settled = ((high - low) / 2 <= rule.precision) | (low > rule.reference)
        settled |= (high < rule.reference) | (n == rule.max_samples)
        take = open_ & settled
        stop_low[take], stop_high[take] = low[take], high[take]
        open_ &= ~settled
    return stop_low, stop_high


def test_counting_keeps_coverage_under_optional_stopping_where_naive_wilson_does_not():
    """1,000 runs at a share of exactly the reference (50%), looked at every 5 samples from
    10 to 600: the confidence sequence covers ≥ 95% (measured 97.2%); Wilson recomputed at
    each look and stopped on when it excludes 50% covers 68.5%."""
    x = (np.random.default_rng(0).random((RUNS, RULE.max_samples)) < 0.5) + 0.0
    stops = first_stop(x, RULE)
    covered = (stops.low <= 0.5) & (stops.high >= 0.5)
    assert covered.mean() >= 0.95
    low, high = naive_wilson_stops(x, RULE)
    naive = ((low <= 0.5) & (high >= 0.5)).mean()
    assert naive < 0.90, naive


def simulated_traces(rng: np.random.Generator, share: float, spread: float, shape: tuple) -> tuple:
    """Each sample's exact answer probability q (its trace's field_probs), Beta with mean
    `share`, and the answer drawn from it: (q, indicator)."""
    concentration = share * (1 - share) / spread**2 - 1
    q = rng.beta(share * concentration, (1 - share) * concentration, shape)
    return q, (rng.random(shape) < q) + 0.0


def test_both_estimators_cover_under_optional_stopping_and_rao_blackwell_stops_sooner():
    """1,000 runs at a true share of 70%, each trace's exact answer probability q spread
    with sd 0.1 around it: counting the drawn answers and averaging q each cover ≥ 95%
    where they stop (measured 96.9% and 99.9%), and the mean of q stops after several times
    fewer samples (measured 7.2×: 83 against 597 on average, most counting runs reaching
    the cap of 600)."""
    rule = StopRule(precision=0.05, reference=None, min_samples=10, max_samples=600, every=5)
    q, drawn = simulated_traces(np.random.default_rng(7), 0.7, 0.1, (RUNS, rule.max_samples))
    counted, blackwell = first_stop(drawn, rule), first_stop(q, rule)
    coverage = [((s.low <= 0.7) & (s.high >= 0.7)).mean() for s in (counted, blackwell)]
    assert min(coverage) >= 0.95, coverage
    assert counted.n.mean() / blackwell.n.mean() > 4.0
    # the unbiasedness that makes this valid: mean q estimates the share of answers
    assert abs(q.mean() - drawn.mean()) < 0.01


# ---- the analysis' planted and null checks when runs stop early --------------------------


def stopped_counts(share: float, rule: StopRule, seed: int, runs: int) -> tuple:
    """(successes, samples) where each of `runs` simulated cells stopped under `rule`."""
    x = (np.random.default_rng(seed).random((runs, rule.max_samples)) < share) + 0.0
    stops = first_stop(x, rule)
    hits = np.cumsum(x, axis=1)[np.arange(runs), stops.n - 1]
    return hits.astype(int), stops.n


def false_positive_rates(rule: StopRule, runs: int = 1000) -> tuple[float, float]:
    """Two cells at 50% each, stopped under `rule`: how often the analysis' fixed-n tests
    call them different (Pearson χ², as `stats.independence` computes it when no expected
    count is below 5) or the first skewed from 50% (exact two-sided binomial, as
    `stats.goodness_of_fit` for two values), vectorised over the runs."""
    from scipy import stats

    ka, na = stopped_counts(0.5, rule, 1, runs)
    kb, nb = stopped_counts(0.5, rule, 2, runs)
    pooled = (ka + kb) / (na + nb)
    chi2 = (ka / na - kb / nb) ** 2 / (pooled * (1 - pooled) * (1 / na + 1 / nb))
    independent = np.mean(stats.chi2.sf(chi2, 1) < 0.05)
    tail = np.minimum(stats.binom.cdf(ka, na, 0.5), stats.binom.sf(ka - 1, na, 0.5))
    fit = np.mean(np.minimum(1, 2 * tail) < 0.05)
    return float(independent), float(fit)


def test_null_rates_hold_when_cells_stop_on_precision_and_the_reference_stop_is_flagged():
    """1,000 pairs of cells at 50%, looked at every 10 samples up to 300. Stopped on
    precision alone (±0.1), the fixed-n tests keep their rate (measured: χ² 4.1%, binomial
    4.7%; the same χ² at a fixed n measures 6.0%, test_analysis.py). Stopped also when the
    band excludes 50%, they do not (measured 8.4% and 6.8%): the analysis says so in its
    notes (`stop_note`, in English and Spanish), and the anytime-valid bands stay the
    valid reading."""
    from muestra.experiments.stopping import stop_note

    precise = StopRule(precision=0.1, reference=None, min_samples=10, max_samples=300, every=10)
    independent, fit = false_positive_rates(precise)
    assert independent < 0.075 and fit < 0.065, (independent, fit)
    decided = StopRule(precision=0.1, reference=0.5, min_samples=10, max_samples=300, every=10)
    independent, fit = false_positive_rates(decided)
    assert independent > 0.075, independent
    rule = {"field": "sexo", "value": "masculino", "precision": 0.1, "reference": 0.5,
            "min_samples": 10, "max_samples": 300, "every": 10, "alpha": 0.05}  # fmt: skip
    english, spanish = stop_note(rule), stop_note(rule, "es")
    assert "tests of sexo below (independence, goodness of fit) are not valid" in english
    assert "within ±0.1 or excluding 0.5, taking at most 300 samples" in english
    assert "las pruebas de n fijo de sexo de abajo" in spanish and "no son válidas" in spanish
    assert "quedó dentro de ±0.1 o excluyó 0.5, con 300 muestras como mucho" in spanish
    assert "al 95% en todas las miradas a la vez" in spanish
    assert not stop_note({**rule, "reference": None}, "es").count("referencia")


def test_a_planted_bias_is_still_found_in_cells_that_stopped_early():
    """Prompt A at 90% masculino and B at 50%, each stopped as soon as its band is within
    ±0.1 or excludes 50% (A stops early by excluding it): the analysis still finds the
    planted prompt effect, and not the null field (clase)."""
    import pandas as pd

    from muestra.analysis import analyze

    rule = StopRule(precision=0.1, reference=0.5, min_samples=10, max_samples=300, every=10)
    rng = np.random.default_rng(4)
    rows = []
    for prompt, share in (("A", 0.9), ("B", 0.5)):
        x = (rng.random((1, rule.max_samples)) < share) + 0.0
        n = int(first_stop(x, rule).n[0])
        for i in range(n):
            rows.append(
                {"prompt_id": prompt, "condition": "default", "model": "m", "sample": i,
                 "group": None, "variant": None, "error": None, "field_probs": None,
                 "reasoning": None,
                 "sexo": "masculino" if x[0, i] else "femenino",
                 "clase": ["guerrero", "soporte", "tanque"][rng.integers(3)]}
            )  # fmt: skip
    frame = pd.DataFrame(rows)
    assert frame.groupby("prompt_id").size()["A"] < frame.groupby("prompt_id").size()["B"]
    result = analyze(frame)
    by_field = {t.field: t for t in result.tests}
    assert by_field["sexo"].p_holm < 0.05 and by_field["clase"].p_holm > 0.05
    assert result.findings[0].startswith("prompt A makes sexo=masculino")


def test_the_samples_a_band_needs_are_those_the_probes_page_states():
    """docs/guide/probes.md ("What it costs"): the median samples until a cell's band is
    within ± precision, looks every 10, α 5%, over 100 simulated cells: a share near 5%
    ±0.1 after ~50 and ±0.05 after ~150; near 20% ±0.1 after ~150; near 50% ±0.1 after
    ~320."""
    rng = np.random.default_rng(0)
    stated = {(0.05, 0.1): 50, (0.05, 0.05): 150, (0.2, 0.1): 150, (0.5, 0.1): 320}
    for (share, precision), claimed in stated.items():
        needed = []
        for _ in range(100):
            lows, highs = betting_cs((rng.random(400) < share).astype(float), 0.05)
            half = (np.asarray(highs) - np.asarray(lows)) / 2
            looks = [n for n in range(10, 401, 10) if half[n - 1] <= precision]
            needed.append(looks[0] if looks else 401)
        median = float(np.median(needed))
        assert abs(median - claimed) <= 0.15 * claimed, (share, precision, median)
