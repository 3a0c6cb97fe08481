"""Rewards per cell and their differences: a trained reward model's score of every sample
(`muestra reward score` keeps it in the sample's scores) summarised per prompt × model ×
condition with bootstrap intervals, and each pair of models (or conditions) compared
inside every prompt — Welch's t-test and a bootstrap interval of the difference, Holm
over all comparisons."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd

from muestra.analysis.stats import adjust, bootstrap_mean


@dataclass
class RewardCell:
    prompt: str
    model: str
    condition: str
    n: int
    mean: float
    low: float
    high: float
    sd: float


@dataclass
class RewardDifference:
    by: str  # "model" or "condition"
    prompt: str
    a: str
    b: str
    difference: float  # mean(a) - mean(b)
    low: float
    high: float
    p_value: float
    p_holm: float = 1.0


@dataclass
class RewardAnalysis:
    reward_model: str
    cells: list[RewardCell] = field(default_factory=list)
    differences: list[RewardDifference] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def rewards_of(frame: pd.DataFrame) -> pd.Series:
    """The reward of each sample (NaN where it has none)."""
    if "scores" not in frame.columns:
        return pd.Series(np.nan, index=frame.index)
    return pd.Series(
        [s.get("reward", np.nan) if isinstance(s, dict) else np.nan for s in frame["scores"]],
        index=frame.index,
        dtype=float,
    )


def analyze_rewards(frame: pd.DataFrame, seed: int = 0) -> RewardAnalysis | None:
    """Rewards per cell and within-prompt differences; None when no sample has a reward."""
    from scipy import stats

    values = rewards_of(frame)
    if values.isna().all():
        return None
    scored = frame.assign(reward=values)[values.notna()]
    identity = {s.get("reward_model") for s in scored["scores"] if isinstance(s, dict)}
    result = RewardAnalysis(", ".join(sorted(str(i) for i in identity)))
    keys = ["prompt_id", "model", "condition"]
    for (prompt, model, condition), rows in scored.groupby(keys, sort=False):
        r = rows["reward"].to_numpy(dtype=float)
        low, high = bootstrap_mean(r, seed=seed)
        sd = float(r.std(ddof=1)) if len(r) > 1 else 0.0
        result.cells.append(
            RewardCell(
                str(prompt), str(model), str(condition), len(r), float(r.mean()), low, high, sd
            )
        )
    rng = np.random.default_rng(seed)
    for by, other in (("model", "condition"), ("condition", "model")):
        if scored[by].nunique() < 2:
            continue
        for (prompt, _), rows in scored.groupby(["prompt_id", other], sort=False):
            levels = list(dict.fromkeys(rows[by]))
            for a, b in combinations(levels, 2):
                ra = rows.loc[rows[by] == a, "reward"].to_numpy(dtype=float)
                rb = rows.loc[rows[by] == b, "reward"].to_numpy(dtype=float)
                if len(ra) < 2 or len(rb) < 2:
                    continue
                test = stats.ttest_ind(ra, rb, equal_var=False)
                boots = [
                    rng.choice(ra, len(ra)).mean() - rng.choice(rb, len(rb)).mean()
                    for _ in range(2000)
                ]
                low, high = np.quantile(boots, [0.025, 0.975])
                result.differences.append(
                    RewardDifference(
                        by,
                        str(prompt),
                        str(a),
                        str(b),
                        float(ra.mean() - rb.mean()),
                        float(low),
                        float(high),
                        float(test.pvalue) if np.isfinite(test.pvalue) else 1.0,
                    )
                )
    holm, _ = adjust([d.p_value for d in result.differences])
    for difference, p in zip(result.differences, holm, strict=True):
        difference.p_holm = p
    return result
