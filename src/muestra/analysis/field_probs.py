"""field_probs against counting: the mean exact probability of each value of a field per
prompt (× condition × model when several ran), with a bootstrap interval over samples,
beside the share of samples that drew it and how much narrower the first interval is.

When every sample of a cell carries the same distribution (the answer comes straight
after one prompt, no sampled reasoning in between) the probability is exact: no interval,
no "× narrower" (an interval of width ~0 would make that ratio 10⁶ or infinite). A cell
of one sample has no interval either. Both are said in the notes returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from muestra.analysis.language import say
from muestra.analysis.stats import bootstrap_mean, wilson


@dataclass
class FieldProbSummary:
    field: str
    group: str
    value: str
    mean_probability: float
    low: float | None  # None: no interval (one sample, or every sample has the same probs)
    high: float | None
    sampled_share: float
    # Wilson interval width of the sampled share ÷ width of this interval (None: no interval)
    narrower: float | None


EXACT_TOLERANCE = 1e-6  # field_probs closer than this in every sample are one distribution


def field_probs_summaries(
    valid: pd.DataFrame, name: str, levels: list[str], lang: str = "en"
) -> tuple[list[FieldProbSummary], list[str]]:
    """Mean field_probs per value with a bootstrap interval, against counting draws, per
    prompt (× condition × model when several ran). A cell whose samples all carry the
    same distribution (an answer straight after the prompt) has an exact probability and
    no interval; so has a cell of one sample. Both are said in a note."""
    found: list[FieldProbSummary] = []
    keys = ["prompt_id"] + [k for k in ("condition", "model") if valid[k].nunique() > 1]
    exact, single = [], []
    for cell, rows in valid.groupby(keys, sort=False):
        label = " · ".join(str(c) for c in (cell if isinstance(cell, tuple) else (cell,)))
        dists = [p[name] for p in rows["field_probs"] if isinstance(p, dict) and name in p]
        if not dists:
            continue
        table = np.array([[d.get(level, 0.0) for level in levels] for d in dists])
        same = bool(np.all(np.abs(table - table[0]) < EXACT_TOLERANCE))
        if len(dists) == 1:
            single.append(label)
        elif same:
            exact.append(label)
        drawn = rows[name].astype(str)
        for j, level in enumerate(levels):
            k = int((drawn == level).sum())
            low = high = narrower = None
            if len(dists) > 1 and not same:
                low, high = bootstrap_mean(table[:, j])
                w_low, w_high = wilson(k, len(drawn))
                narrower = (w_high - w_low) / (high - low) if high > low else None
            found.append(FieldProbSummary(name, label, level, float(table[:, j].mean()), low,
                                          high, k / len(drawn), narrower))  # fmt: skip
    notes = []
    if exact:
        notes.append(say("exact_probs", lang, field=name, groups=", ".join(exact)))
    if single:
        notes.append(say("one_sample", lang, field=name, groups=", ".join(single)))
    return found, notes
