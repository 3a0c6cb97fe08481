"""Statistics against scipy/statsmodels and hand-worked cases; a planted bias is found."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from scipy import stats

from muestra.analysis import analyze
from muestra.analysis.stats import (
    adjust,
    difference,
    distance_to,
    goodness_of_fit,
    independence,
    wilson,
)
from muestra.errors import InputError
from muestra.experiments.results import samples_frame
from muestra.experiments.store import connect


def test_wilson_hand_worked():
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = wilson(0, 50)
    assert low == pytest.approx(0.0, abs=1e-12)
    assert high == pytest.approx(1.96**2 / (50 + 1.96**2), abs=2e-4)


def test_independence_matches_scipy_and_cramers_v():
    table = np.array([[45, 5], [25, 25]])
    test = independence(table)
    reference = stats.chi2_contingency(table, correction=False)
    assert test.method == "chi2" and test.dof == 1
    assert test.statistic == pytest.approx(reference.statistic)
    assert test.p_value == pytest.approx(reference.pvalue)
    assert test.cramers_v == pytest.approx(math.sqrt(reference.statistic / table.sum()))


def test_small_counts_use_monte_carlo_close_to_fisher():
    table = np.array([[6, 1], [1, 6]])
    test = independence(table)
    assert test.method == "chi2-monte-carlo"
    assert test.p_value == pytest.approx(stats.fisher_exact(table).pvalue, abs=0.02)
    assert independence(np.array([[5, 0], [7, 0]])) is None  # one value only: nothing to test


def test_distances_hand_worked():
    d = distance_to(np.array([1.0, 0.0]))
    kl_p = math.log2(1 / 0.75)
    kl_q = 0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)
    assert d.total_variation == pytest.approx(0.5)
    assert d.jensen_shannon == pytest.approx(math.sqrt(0.5 * kl_p + 0.5 * kl_q))
    assert d.normalised_entropy == pytest.approx(0.0)
    assert distance_to(np.array([2.0, 2.0])).normalised_entropy == pytest.approx(1.0)
    assert distance_to(np.array([3.0, 1.0]), np.array([0.75, 0.25])).total_variation == 0


def test_adjustments_hand_worked():
    holm, bh = adjust([0.01, 0.04, 0.03])
    assert holm == pytest.approx([0.03, 0.06, 0.06])
    assert bh == pytest.approx([0.03, 0.04, 0.04])


def test_difference_newcombe():
    diff, low, high = difference(30, 50, 20, 50)
    assert diff == pytest.approx(0.2)
    assert (low, high) == pytest.approx((0.00458, 0.37524), abs=1e-4)


def planted_store(path, seed=0, bias=True, n=100, lift=None):
    """A store with prompt A (90% masculino) vs B (50%), and a null field (clase).
    With `lift`, a second condition "caliente" raises masculino by that much on both
    prompts, and every sample carries a reasoning trace and field_probs."""
    rng = np.random.default_rng(seed)
    db = connect(path)
    conditions = [(1, "default", 0.0)] + ([(2, "caliente", lift)] if lift is not None else [])
    with db:
        db.execute(
            "INSERT INTO runs (id, name, spec_path, spec_text, spec_hash, seed, muestra_version, "
            "created_at, status) VALUES (1, 'planted', 's.toml', '[analysis]\nalpha = 0.05', "
            "'h', 1, 'test', 'now', 'done')"
        )
        db.execute("INSERT INTO models VALUES (1, 1, 'm', 'm', NULL)")
        for cid, label, _ in conditions:
            db.execute("INSERT INTO conditions VALUES (?, 1, ?, '{}', NULL, '{}')", (cid, label))
        for pid, key, variant in ((1, "A", "x"), (2, "B", "y")):
            db.execute(
                "INSERT INTO prompts VALUES (?, 1, ?, ?, '\"p\"', '{}', 'g', ?)",
                (pid, pid - 1, key, variant),
            )
        for cid, _, up in conditions:
            for pid, share in ((1, 0.9 if bias else 0.5), (2, 0.5)):
                for i in range(n):
                    male = rng.random() < share + up
                    answer = {
                        "sexo": "masculino" if male else "femenino",
                        "clase": ["guerrero", "soporte", "tanque"][rng.integers(3)],
                    }
                    extra = (None, "")
                    if lift is not None:
                        p_m = min(share + up, 1.0)
                        probs = {"sexo": {"masculino": p_m, "femenino": 1 - p_m}}
                        extra = (json.dumps(probs), "él es fuerte" if male else "ella es fuerte")
                    db.execute(
                        "INSERT INTO samples (run_id, model_id, condition_id, prompt_id, "
                        "sample_index, seed, reasoning, think_tokens, budget_hit, answer_text, "
                        "answer_json, finish_reason, prompt_tokens, completion_tokens, "
                        "batch_seconds, muestra_version, created_at, field_probs_json) "
                        "VALUES (1, 1, ?, ?, ?, 0, ?, 3, 0, ?, ?, 'stop', 5, 9, 1.0, 'test', "
                        "'now', ?)",
                        (cid, pid, i, extra[1], json.dumps(answer), json.dumps(answer), extra[0]),
                    )
    return db


def test_mentions_per_prompt_and_condition(tmp_path):
    result = analyze(samples_frame(planted_store(tmp_path / "c.db", lift=0.3)))
    shares = {(m.term, m.group, m.condition): m.share for m in result.mentions}
    # the planted traces say "él" for masculino answers: 90% → 100% on A, 50% → 80% on B
    assert shares[("masculino", "A", "caliente")] > shares[("masculino", "A", "default")]
    assert shares[("masculino", "B", "caliente")] - shares[("masculino", "B", "default")] > 0.15
    assert len(shares) == 2 * 2 * 2  # terms × prompts × conditions


def test_planted_bias_found_null_not(tmp_path):
    db = planted_store(tmp_path / "planted.db")
    result = analyze(samples_frame(db))
    by_field = {t.field: t for t in result.tests}
    assert by_field["sexo"].p_holm < 0.001 and by_field["clase"].p_holm > 0.05
    tested = [t.sentence for t in result.tests if t.sentence]
    assert len(tested) == 1 and tested[0].startswith("prompt A makes sexo=masculino")
    # against the uniform reference only prompt A's sexo (90% masculino) is skewed
    fits = {(f.field, f.prompt): f for f in result.fits}
    assert len(fits) == 4 and fits[("sexo", "A")].p_holm < 0.001
    assert fits[("sexo", "A")].sentence.startswith("A: sexo is masculino in ")
    assert result.findings == [*tested, fits[("sexo", "A")].sentence]
    pair = next(c for c in result.counterfactuals if c.field == "sexo" and c.value == "masculino")
    assert pair.difference > 0.25 and pair.low > 0


def test_false_positive_rate_under_the_null():
    """No bias: the share of 'significant' tests stays near α = 0.05 (2,000 simulated pairs
    of prompts with 60 samples each; measured 6.0%, the uncorrected χ² is slightly liberal)."""
    hits = 0
    for seed in range(2000):
        rng = np.random.default_rng(seed)
        a, b = (rng.random(60) < 0.5).sum(), (rng.random(60) < 0.5).sum()
        hits += independence(np.array([[a, 60 - a], [b, 60 - b]])).p_value < 0.05
    assert 0.03 < hits / 2000 < 0.075


def test_analyze_cli_json(cli, tmp_path):
    planted_store(tmp_path / "p.db").close()
    result = cli("analyze", str(tmp_path / "p.db"), "--json")
    assert result.code == 0, result.stderr
    data = result.json()
    assert data["findings"] and data["tests"][0]["p_holm"] <= 1
    fit = next(f for f in data["fits"] if f["field"] == "sexo" and f["prompt"] == "A")
    assert fit["method"] == "binomial" and fit["p_holm"] < 0.001 and fit["sentence"]
    table = cli("analyze", str(tmp_path / "p.db"))
    assert "Holm" in table.stdout and "prompt A makes sexo=masculino" in table.stdout
    assert "goodness of fit" in table.stdout and "A: sexo is masculino in" in table.stdout
    missing = cli("analyze", str(tmp_path / "none.db"))
    assert missing.code == 2 and "does not exist" in missing.stderr


def test_numeric_fields_rank_tests_and_bootstrap():
    from muestra.analysis.stats import bootstrap_mean, rank_test

    a, b = np.arange(20.0), np.arange(20.0) + 15
    test = rank_test([a, b])
    reference = stats.mannwhitneyu(a, b, alternative="two-sided")
    assert test.method == "mann-whitney" and test.p_value == pytest.approx(reference.pvalue)
    three = rank_test([a, b, a + 1])
    assert three.method == "kruskal-wallis"
    assert three.p_value == pytest.approx(stats.kruskal(a, b, a + 1).pvalue)
    low, high = bootstrap_mean(a)
    assert low < a.mean() < high and high - low < 8


def test_planted_numeric_effect_field_probs_and_mentions(tmp_path):
    import pandas as pd

    rng = np.random.default_rng(1)
    rows = []
    for prompt, shift, word in (("A", 0, "ella es fuerte"), ("B", 20, "he is strong")):
        for i in range(40):
            p_m = 0.8 if prompt == "A" else 0.3
            rows.append(
                {
                    "edad": int(30 + shift + rng.integers(0, 10)),
                    "sexo": "masculino",
                    "prompt_id": prompt,
                    "prompt": "",
                    "group": None,
                    "variant": None,
                    "sample": i,
                    "condition": "default",
                    "model": "m",
                    "seed": i,
                    "think_budget": 8,
                    "reasoning": word if i % 2 else "nada",
                    "think_tokens": 8,
                    "budget_hit": True,
                    "answer_text": "",
                    "finish_reason": "stop",
                    "error": None,
                    "prompt_tokens": 5,
                    "completion_tokens": 9,
                    "batch_seconds": 1.0,
                    "field_probs": {"sexo": {"masculino": p_m, "femenino": 1 - p_m}},
                }
            )
    result = analyze(pd.DataFrame(rows))
    edad = next(t for t in result.tests if t.field == "edad")
    assert edad.method == "mann-whitney" and edad.p_holm < 0.001
    assert "prompt B gives a higher edad than A" in " ".join(result.findings)
    probs = {(f.group, f.value): f for f in result.field_probs}
    assert probs[("A", "masculino")].mean_probability == pytest.approx(0.8)
    assert probs[("A", "masculino")].narrower > 10  # every sample carries the whole distribution
    mentions = {(m.term, m.group): m.share for m in result.mentions}
    assert mentions[("femenino", "A")] == pytest.approx(0.5)
    assert mentions[("masculino", "B")] == pytest.approx(0.5)
    assert mentions[("masculino", "A")] == 0


def frame_of(records):
    """A samples frame as `samples_frame` returns it, from (prompt, condition, model,
    answer) records."""
    import pandas as pd

    rows = []
    for i, (prompt, condition, model, answer) in enumerate(records):
        rows.append(
            {
                **answer,
                "prompt_id": prompt,
                "prompt": "",
                "group": None,
                "variant": None,
                "sample": i,
                "condition": condition,
                "model": model,
                "seed": i,
                "think_budget": 8,
                "reasoning": "",
                "think_tokens": 8,
                "budget_hit": False,
                "answer_text": "",
                "finish_reason": "stop",
                "error": None,
                "prompt_tokens": 5,
                "completion_tokens": 9,
                "batch_seconds": 1.0,
                "field_probs": None,
            }
        )
    return pd.DataFrame(rows)


def test_stratified_test_sums_strata_and_is_not_fooled_by_a_prompt_effect():
    from muestra.analysis.stats import stratified_independence

    rng = np.random.default_rng(3)
    # Prompt A says masculino 90%, B 10%; the condition does nothing, but condition c1
    # ran mostly on A and c2 mostly on B (Simpson): a pooled χ² blames the condition.
    records = []
    for prompt, share, n_c1, n_c2 in (("A", 0.9, 80, 20), ("B", 0.1, 20, 80)):
        for condition, n in (("c1", n_c1), ("c2", n_c2)):
            for _ in range(n):
                sexo = "masculino" if rng.random() < share else "femenino"
                records.append((prompt, condition, "m", {"sexo": sexo}))
    frame = frame_of(records)
    labels, values, strata = (frame[k].to_numpy() for k in ("condition", "sexo", "prompt_id"))
    pooled = independence(pd_crosstab(labels, values))
    assert pooled.p_value < 1e-6  # the naive test is fooled
    test = stratified_independence(labels, values, strata, resamples=1999)
    assert test.method == "chi2-stratified-permutation" and test.p_value > 0.05
    by_hand = sum(
        stats.chi2_contingency(
            pd_crosstab(labels[strata == s], values[strata == s]), correction=False
        ).statistic
        for s in ("A", "B")
    )
    assert test.statistic == pytest.approx(by_hand)
    assert test.dof == 2
    result = analyze(frame)
    condition = next(t for t in result.tests if t.by == "condition")
    prompt = next(t for t in result.tests if t.by == "prompt")
    assert condition.method == "chi2-stratified-permutation" and condition.p_holm > 0.05
    assert prompt.method == "chi2-stratified-permutation" and prompt.p_holm < 0.001
    tested = [t.sentence for t in result.tests if t.sentence]
    assert len(tested) == 1 and tested[0].startswith("prompt B makes sexo=fem")
    # every prompt × condition cell is far from 50/50; the label names the condition
    assert {f.sentence.split(":")[0] for f in result.fits if f.sentence} == {
        "A (c1)",
        "A (c2)",
        "B (c1)",
        "B (c2)",
    }


def pd_crosstab(a, b):
    import pandas as pd

    return pd.crosstab(a, b).to_numpy()


def test_stratified_test_holds_its_level_and_finds_a_real_condition_effect():
    from muestra.analysis.stats import stratified_independence

    rejections = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        strata = np.repeat(np.arange(4), 40)
        labels = np.tile(np.repeat([0, 1], 20), 4)
        values = rng.random(160) < np.array([0.2, 0.5, 0.7, 0.9])[strata]
        rejections += stratified_independence(labels, values, strata, seed, 499).p_value < 0.05
    assert rejections / 200 < 0.09  # measured 1.5% (exact test, discrete: conservative)
    rng = np.random.default_rng(0)
    strata = np.repeat(np.arange(4), 40)
    labels = np.tile(np.repeat([0, 1], 20), 4)
    values = rng.random(160) < np.array([0.2, 0.5, 0.7, 0.9])[strata] * (0.5 + 0.5 * labels)
    assert stratified_independence(labels, values, strata).p_value < 0.01


def test_cluster_bootstrap_covers_the_prompt_population_where_wilson_does_not():
    """8 prompts drawn from a population (each prompt's share ~ Beta(2, 2)), 30 samples
    each. The target is the population mean share 0.5. Treating the 240 samples as
    independent (Wilson) undercovers; the prompt-level cluster bootstrap does not."""
    from muestra.analysis.stats import cluster_shares

    cluster_hits = wilson_hits = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        shares = rng.beta(2, 2, size=8)
        k = rng.binomial(30, shares)
        counts = np.stack([k, 30 - k], axis=1)
        _, low, high = cluster_shares(counts, seed, resamples=1000)
        cluster_hits += low[0] <= 0.5 <= high[0]
        w_low, w_high = wilson(int(k.sum()), 240)
        wilson_hits += w_low <= 0.5 <= w_high
    assert wilson_hits / 200 < 0.75  # measured 0.58
    assert cluster_hits / 200 > 0.85  # measured 0.935
    single = cluster_shares(np.array([[30, 10]]))  # one prompt: only the samples vary
    assert single[0][0] == 0.75 and single[1][0] < 0.75 < single[2][0]


def test_paired_condition_comparison_over_prompts():
    rng = np.random.default_rng(5)
    records = []
    for prompt, base in zip("ABCDEF", (0.2, 0.3, 0.5, 0.6, 0.7, 0.8), strict=True):
        for condition, lift in (("frio", 0.0), ("caliente", 0.15), ("igual", 0.0)):
            for _ in range(40):
                value = "si" if rng.random() < min(base + lift, 1) else "no"
                records.append((prompt, condition, "m", {"respuesta": value}))
    result = analyze(frame_of(records))
    pairs = {(c.a, c.b, c.value): c for c in result.comparisons}
    lifted = pairs[("caliente", "frio", "si")]
    assert (
        lifted.prompts == 6
        and lifted.low > 0
        and lifted.difference == pytest.approx(lifted.share_a - lifted.share_b)
    )
    same = pairs[("frio", "igual", "si")]
    assert same.low < 0 < same.high
    pooled = {(p.by, p.level, p.value): p for p in result.pooled}
    everything = pooled[("all", "all", "si")]
    assert everything.prompts == 6 and everything.n == 720
    assert everything.high - everything.low > 2 * (
        np.subtract(*reversed(wilson(round(everything.share * 720), 720)))
    )  # prompts differ a lot: the cluster interval is much wider than Wilson's
    assert pooled[("condition", "caliente", "si")].share > pooled[("condition", "frio", "si")].share


def test_goodness_of_fit_binomial_matches_scipy():
    test = goodness_of_fit(np.array([28, 2]), np.array([0.5, 0.5]))
    assert test.method == "binomial" and test.dof == 1
    assert test.p_value == pytest.approx(stats.binomtest(28, 30, 0.5).pvalue)
    assert test.p_value == pytest.approx(goodness_of_fit([2, 28], [1, 1]).p_value)  # symmetric
    assert test.cohens_w == pytest.approx(math.sqrt(2 * (28 / 30 - 0.5) ** 2 / 0.5))
    uneven = goodness_of_fit(np.array([15, 15]), np.array([0.7, 0.3]))
    assert uneven.p_value == pytest.approx(stats.binomtest(15, 30, 0.7).pvalue)


def exact_chi2_p(counts, reference):
    """P(χ² ≥ observed) under the multinomial, summed over every table with the same n."""
    n, reference = sum(counts), np.asarray(reference) / sum(reference)
    expected = n * reference
    observed = ((np.array(counts) - expected) ** 2 / expected).sum()
    total = 0.0
    for a in range(n + 1):
        for b in range(n + 1 - a):
            table = np.array([a, b, n - a - b])
            if ((table - expected) ** 2 / expected).sum() >= observed - 1e-9:
                total += stats.multinomial.pmf(table, n, reference)
    return total


def test_goodness_of_fit_chi2_and_monte_carlo_close_to_exact():
    test = goodness_of_fit(np.array([10, 3, 2]), np.ones(3))  # expected 5 each: asymptotic
    reference = stats.chisquare([10, 3, 2])
    assert test.method == "chi2" and test.dof == 2
    assert test.statistic == pytest.approx(7.6) and test.p_value == pytest.approx(reference.pvalue)
    small = goodness_of_fit(np.array([7, 2, 1]), np.ones(3))  # expected 3.3: Monte-Carlo
    assert small.method == "chi2-monte-carlo"
    assert small.p_value == pytest.approx(exact_chi2_p([7, 2, 1], [1, 1, 1]), abs=0.01)
    assert small.p_value == goodness_of_fit(np.array([7, 2, 1]), np.ones(3)).p_value  # seeded
    uneven = goodness_of_fit(np.array([3, 9, 4]), np.array([0.5, 0.3, 0.2]))
    assert uneven.p_value == pytest.approx(exact_chi2_p([3, 9, 4], [0.5, 0.3, 0.2]), abs=0.01)


def test_goodness_of_fit_values_the_reference_rules_out():
    # a value with reference 0 that nobody chose is left out: a binomial test on the others
    test = goodness_of_fit(np.array([20, 10, 0]), np.array([0.5, 0.5, 0.0]))
    assert test.method == "binomial"
    assert test.p_value == pytest.approx(stats.binomtest(20, 30, 0.5).pvalue)
    # a count on it is impossible under the reference
    outside = goodness_of_fit(np.array([15, 14, 1]), np.array([0.5, 0.5, 0.0]))
    assert outside.method == "outside-reference" and outside.p_value == 0
    assert goodness_of_fit(np.array([30, 0]), np.array([1.0, 0.0])) is None  # one value
    assert goodness_of_fit(np.array([0, 0]), np.array([0.5, 0.5])) is None  # no samples


def test_goodness_of_fit_holds_its_level_and_finds_a_planted_skew():
    """Fair cells drawn from the reference (half with two values and 30 samples: binomial;
    half with three values and 20 samples: Monte-Carlo χ²) are flagged at about α; cells
    with 90% of one value among 60 samples are flagged nearly always."""
    cells = [(np.array([0.5, 0.5]), 30), (np.array([0.5, 0.3, 0.2]), 20)]
    rejections = 0
    for seed in range(200):
        reference, n = cells[seed % 2]
        counts = np.random.default_rng(seed).multinomial(n, reference)
        rejections += goodness_of_fit(counts, reference, seed, resamples=2000).p_value < 0.05
    assert 0.01 < rejections / 200 < 0.10  # measured 4.5%
    skews = [(np.array([0.9, 0.1]), np.ones(2)), (np.array([0.9, 0.05, 0.05]), np.ones(3))]
    found = 0
    for seed in range(50):
        planted, reference = skews[seed % 2]
        counts = np.random.default_rng(seed).multinomial(60, planted)
        found += goodness_of_fit(counts, reference, seed, resamples=2000).p_value < 0.05
    assert found / 50 > 0.9  # measured 50 of 50


def test_analyze_tests_every_cell_against_the_reference():
    records = [
        ("A", "default", "m", {"sexo": "masculino" if i < 28 else "femenino"}) for i in range(30)
    ]
    records += [
        ("B", "default", "m", {"sexo": "masculino" if i < 15 else "femenino"}) for i in range(30)
    ]
    result = analyze(frame_of(records))
    fits = {f.prompt: f for f in result.fits}
    assert fits["A"].method == "binomial"
    assert fits["A"].p_value == pytest.approx(stats.binomtest(28, 30, 0.5).pvalue)
    assert fits["A"].sentence == (
        "A: sexo is masculino in 28 of 30 samples (93%, 95% CI 79–98%), far from the 50% "
        "reference; p_adj < 0.001"
    )
    assert fits["B"].p_value == 1 and fits["B"].sentence is None
    # one Holm / BH adjustment over the independence test and both fits
    every = [*result.tests, *result.fits]
    holm, bh = adjust([t.p_value for t in every])
    assert len(every) == 3 and [t.p_holm for t in every] == holm and [t.p_bh for t in every] == bh
    # against a 90% masculino reference, A fits and B (50%) is the skewed one
    reference = {"sexo": {"masculino": 0.9, "femenino": 0.1}}
    fits = {f.prompt: f for f in analyze(frame_of(records), reference).fits}
    assert fits["A"].p_value == pytest.approx(stats.binomtest(28, 30, 0.9).pvalue)
    assert fits["A"].sentence is None
    assert fits["B"].sentence.startswith(
        "B: sexo is femenino in 15 of 30 samples (50%, 95% CI 33–67%), far from the 10% reference"
    )


def test_analyze_fits_each_condition_and_model():
    records = []
    for condition, model in itertools.product(("frio", "caliente"), ("m1", "m2")):
        counts = (24, 3, 3) if (condition, model) == ("caliente", "m2") else (10, 10, 10)
        for clase, k in zip(("guerrero", "soporte", "tanque"), counts, strict=True):
            records += [("A", condition, model, {"clase": clase})] * k
    result = analyze(frame_of(records))
    cells = {(f.condition, f.model): f for f in result.fits}
    assert len(cells) == 4 and all(f.method == "chi2" and f.dof == 2 for f in result.fits)
    skewed = cells.pop(("caliente", "m2"))
    assert skewed.p_value == pytest.approx(stats.chisquare([24, 3, 3]).pvalue)
    assert skewed.sentence.startswith("A (caliente, m2): clase is guerrero in 24 of 30 samples")
    assert "far from the 33% reference" in skewed.sentence
    assert all(f.sentence is None for f in cells.values())


def test_a_value_only_the_reference_names_counts():
    records = [
        ("A", "default", "m", {"clase": "guerrero" if i < 27 else "soporte"}) for i in range(30)
    ]
    uniform = {"clase": {"guerrero": 1, "soporte": 1, "tanque": 1}}
    fit = analyze(frame_of(records), uniform).fits[0]
    assert fit.method == "chi2" and fit.dof == 2  # tanque counts though nobody chose it
    assert fit.p_value == pytest.approx(stats.chisquare([27, 3, 0]).pvalue)
    # without the reference, only the values seen are known: a binomial test of 27 vs 3
    fit = analyze(frame_of(records)).fits[0]
    assert fit.method == "binomial"
    assert fit.p_value == pytest.approx(stats.binomtest(27, 30, 0.5).pvalue)
    with pytest.raises(InputError, match=r"\[analysis.reference\] clase"):
        analyze(frame_of(records), {"clase": {"guerrero": 0, "soporte": 0}})


def test_reasoning_terms_are_labelled_in_the_traces_language():
    """An English run's table says male/female (it said masculino/femenino before)."""
    import pandas as pd

    from muestra.analysis import default_terms

    english = pd.Series(["I think he is a strong man and the leader", None, "She is kind"])
    spanish = pd.Series(["Creo que él es un hombre fuerte y el líder de la partida"])
    assert list(default_terms(english)) == ["male", "female"]
    assert list(default_terms(spanish)) == ["masculino", "femenino"]
    assert default_terms(english)["male"] == default_terms(spanish)["masculino"]
