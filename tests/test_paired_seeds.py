"""Paired variants share their random stream: sample i of every variant of a group is
drawn with the same seed (scheme "paired", recorded with the run); a run stored before
the scheme was recorded resumes with the seeds it started with ("prompt"); and the flip
rate's chance level is the disagreement rate of independent draws (simulated)."""

from __future__ import annotations

import sqlite3

import numpy as np
import pandas as pd

from muestra.analysis.pairs import chance_flip, counterfactuals
from muestra.engine.seeds import sample_seed
from muestra.experiments.runner import seed_indices
from test_experiments import write_spec


def _seeds(store) -> dict[tuple[str, int], int]:
    with sqlite3.connect(store) as db:
        rows = db.execute(
            "SELECT p.prompt_key, s.sample_index, s.seed FROM samples s "
            "JOIN prompts p ON p.id = s.prompt_id"
        ).fetchall()
    return {(key, index): seed for key, index, seed in rows}


def test_seed_indices_of_each_scheme():
    groups = ["g", "g", None, "h", "h", "g"]
    assert seed_indices(groups, "paired") == [0, 0, 2, 3, 3, 0]
    assert seed_indices(groups, "prompt") == seed_indices(groups, None) == list(range(6))


def test_variants_of_a_group_share_seeds_and_an_old_run_keeps_its_own(tiny_kit, tmp_path):
    import muestra

    spec = write_spec(tmp_path, tiny_kit, samples=2)  # items a (x) and b (y) of group "g"
    store = tmp_path / "paired.db"
    muestra.run(spec, store)
    with sqlite3.connect(store) as db:
        assert db.execute("SELECT seeding FROM runs").fetchone()[0] == "paired"
    seeds = _seeds(store)
    assert len(seeds) == 4
    for i in range(2):
        assert seeds[("a", i)] == seeds[("b", i)] == sample_seed(99, 0, i)
    assert seeds[("a", 0)] != seeds[("a", 1)]

    old = tmp_path / "old.db"  # a run stored before muestra recorded the scheme
    muestra.run(spec, old)
    with sqlite3.connect(old) as db:
        db.execute("UPDATE runs SET seeding = NULL")
        db.execute("DELETE FROM samples WHERE sample_index = 1")
        db.execute("UPDATE samples SET seed = ? WHERE prompt_id = (SELECT id FROM prompts "
                   "WHERE prompt_key = 'b')", (sample_seed(99, 1, 0),))  # fmt: skip
    muestra.run(spec, old)  # resumes the missing sample 1 of each prompt
    resumed = _seeds(old)
    assert resumed[("a", 1)] == sample_seed(99, 0, 1)
    assert resumed[("b", 1)] == sample_seed(99, 1, 1) != resumed[("a", 1)]


def _paired_frame(answers_a, answers_b, probs_a, probs_b) -> pd.DataFrame:
    rows = []
    for variant, answers, probs in (("x", answers_a, probs_a), ("y", answers_b, probs_b)):
        for i, answer in enumerate(answers):
            rows.append(
                {
                    "group": "g",
                    "variant": variant,
                    "sample": i,
                    "condition": "c",
                    "model": "m",
                    "sexo": answer,
                    "field_probs": {"sexo": probs},
                }
            )
    return pd.DataFrame(rows)


def test_chance_flip_rate_matches_independent_draws_in_simulation():
    """Two variants with no difference at all (p = 0.6 / 0.4 each) drawn independently
    disagree 1 − (0.36 + 0.16) = 48 % of the time: the chance rate the analysis shows,
    from the exact probabilities, agrees with the simulated flip rate within 3 standard
    errors over 2,000 simulated pairs; with a real difference (0.9 vs 0.6) the chance
    rate is 1 − (0.54 + 0.04) = 42 %."""
    levels = ["masculino", "femenino"]
    rng = np.random.default_rng(0)
    for p_a, p_b in ((0.6, 0.6), (0.9, 0.6)):
        n = 2000
        draws_a = np.where(rng.random(n) < p_a, "masculino", "femenino")
        draws_b = np.where(rng.random(n) < p_b, "masculino", "femenino")
        frame = _paired_frame(draws_a, draws_b, {"masculino": p_a, "femenino": 1 - p_a},
                              {"masculino": p_b, "femenino": 1 - p_b})  # fmt: skip
        found = counterfactuals(frame, "sexo", levels, exact={"c"})[0]
        expected = 1 - (p_a * p_b + (1 - p_a) * (1 - p_b))
        assert found.chance_from == "field_probs"
        assert abs(found.chance_flip_rate - expected) < 1e-12
        se = (expected * (1 - expected) / n) ** 0.5
        assert abs(found.flip_rate - expected) < 3 * se, (found.flip_rate, expected)
        counted = counterfactuals(frame, "sexo", levels)[0]  # not exact: the counted shares
        assert counted.chance_from == "shares" and abs(counted.chance_flip_rate - expected) < 0.03


def test_shared_uniforms_flip_far_less_than_chance():
    """The point of shared seeds: the same uniform through the same inverse CDF gives the
    same answer whenever the two distributions agree, so with no difference (0.6 / 0.6)
    paired draws never flip, and with 0.9 vs 0.6 they flip exactly |0.9 − 0.6| of the time
    (in expectation), below the 42 % of independent draws."""
    u = np.random.default_rng(1).random(4000)
    for p_a, p_b in ((0.6, 0.6), (0.9, 0.6)):
        flips = ((u < p_a) != (u < p_b)).mean()
        assert abs(flips - abs(p_a - p_b)) < 0.03
        assert flips < chance_flip(np.array([p_a, 1 - p_a]), np.array([p_b, 1 - p_b]))
