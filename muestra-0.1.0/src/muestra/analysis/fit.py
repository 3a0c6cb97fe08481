"""Goodness of fit: is the model skewed against the reference distribution?

`cell_fits(rows, column, name, levels, reference)` runs one `stats.goodness_of_fit` test
of the categorical field `name` per prompt × condition × model cell of `rows` and returns
one `FitRow` per cell that can be tested (cells the test rejects, e.g. without samples,
are left out).

- `column` holds `name`'s values as strings, indexed like `rows` (rows without a value
  already dropped); `levels` are every value the field can take, in the order of
  `reference`; a level nobody chose still counts (as 0).
- `reference` holds non-negative weights, one per level, not all 0 (uniform = all ones);
  it is normalised here. Checking a spec's reference is the caller's job.
- Each row names the most over-represented value (largest share − reference share) with
  its Wilson 95% interval, and carries a sentence for it without a p-value: the caller
  adjusts every test of the report together and sets `p_holm`, `p_bh` and the final
  `sentence` (or None when not significant). The condition and model appear in the
  sentence only when several of them ran.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from muestra.analysis.stats import goodness_of_fit, wilson


@dataclass
class FitRow:
    """Goodness of fit of one field in one prompt × condition × model cell to the reference;
    `value` is the most over-represented value (largest share − reference share)."""

    field: str
    prompt: str
    condition: str
    model: str
    n: int
    method: str
    statistic: float
    dof: int
    p_value: float
    cohens_w: float
    value: str
    count: int
    share: float
    low: float
    high: float
    reference: float
    p_holm: float = 1.0
    p_bh: float = 1.0
    sentence: str | None = None


def cell_fits(
    rows: pd.DataFrame, column: pd.Series, name: str, levels: list[str], reference: np.ndarray
) -> list[FitRow]:
    """One goodness-of-fit test of `name` per prompt × condition × model cell, with the
    sentence (p-value added later) naming the most over-represented value."""
    varying = [k for k in ("condition", "model") if rows[k].nunique() > 1]
    expected = reference / reference.sum()
    found = []
    for (prompt, condition, model), part in rows.groupby(
        ["prompt_id", "condition", "model"], sort=False
    ):
        counts = column[part.index].value_counts().reindex(levels, fill_value=0).to_numpy()
        test = goodness_of_fit(counts, reference)
        if test is None:
            continue
        n = int(counts.sum())
        top = int(np.argmax(counts / n - expected))
        low, high = wilson(int(counts[top]), n)
        row = FitRow(
            name,
            str(prompt),
            str(condition),
            str(model),
            n,
            test.method,
            test.statistic,
            test.dof,
            test.p_value,
            test.cohens_w,
            levels[top],
            int(counts[top]),
            float(counts[top] / n),
            low,
            high,
            float(expected[top]),
        )
        row.sentence = fit_sentence(row, varying)
        found.append(row)
    return found


def fit_sentence(row: FitRow, varying: list[str]) -> str:
    """The cell (prompt, plus the condition and model when several ran), the most
    over-represented value with its Wilson interval, and its reference share."""
    cell = {"condition": row.condition, "model": row.model}
    label = row.prompt + (f" ({', '.join(cell[k] for k in varying)})" if varying else "")
    return (
        f"{label}: {row.field} is {row.value} in {row.count} of {row.n} samples "
        f"({row.share:.0%}, 95% CI {row.low * 100:.0f}–{row.high * 100:.0f}%), far from the "
        f"{row.reference:.0%} reference"
    )
