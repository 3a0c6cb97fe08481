"""Free-text answer fields (a name, a sentence) summarised as text, never as categories.

`summarise_text(valid, name, by)` gives one `TextSummary` per prompt (and one over every
sample): how many answers, their mean length in characters, the share of distinct
answers, the most frequent answers and the most frequent words (lower case, without the
short function words of `STOPWORDS`). A test of independence or a paired difference of
such a field would treat every distinct sentence as a category: with nearly as many
categories as samples it measures nothing a reader can use, so the analysis runs none.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pandas as pd

from muestra.analysis.text import ARTICLES, PHRASE_BREAKS, WORD

STOPWORDS = set().union(*ARTICLES.values(), *PHRASE_BREAKS.values(), {"i", "me", "yo", "soy"})
TOP = 5


@dataclass
class TextSummary:
    field: str
    group: str  # a prompt, or "all"
    n: int
    mean_chars: float
    distinct_share: float  # distinct answers ÷ answers
    top_answers: str  # "Ana (3), Luis (2)"
    top_words: str  # "guerrero (5), fuerte (4)"


def _top(counts: Counter[str]) -> str:
    return ", ".join(f"{value} ({count})" for value, count in counts.most_common(TOP))


def _summary(name: str, group: str, values: pd.Series) -> TextSummary:
    texts = values.astype(str)
    words: Counter[str] = Counter()
    for text in texts:
        words.update(w for w in (m.lower() for m in WORD.findall(text)) if w not in STOPWORDS)
    return TextSummary(
        name,
        group,
        len(texts),
        float(texts.str.len().mean()),
        texts.nunique() / len(texts),
        _top(Counter(texts)),
        _top(words),
    )


def summarise_text(valid: pd.DataFrame, name: str) -> list[TextSummary]:
    """One summary per prompt, and one over every sample when there are several prompts."""
    rows = valid.dropna(subset=[name])
    found = [
        _summary(name, str(prompt), part[name])
        for prompt, part in rows.groupby("prompt_id", sort=False)
    ]
    if len(found) > 1:
        found.append(_summary(name, "all", rows[name]))
    return found
