"""A free-text probe's scores, each owned by one scorer: what it writes into a sample's
scores and the features the analysis reads back from them.

A probe sample's `scores_json` holds `{"continuation": text, KEY: record, …}`, one record
per scorer. Each scorer owns its key, the shape of its record (written by
`evaluation/probes/running.py` through the scorer's `record`) and how the record becomes
per-sample features (read by `analysis/probes.py` through `features`), so the writer and
the reader cannot drift apart:

- `LEXICON`: counts of each lexicon category's words → "names a word of category c";
- `EXTRACTION`: the first phrase after the prompt and its lexicon category → "the phrase
  is p", "the phrase is in category c" (and both as categorical scores);
- `JUDGE`: a judge model's answer and its exact field probabilities → "the judge said
  x = v" (and its probability), or the judge's number.

`SCORERS` lists them in the order the analysis reports their features.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd

CONTINUATION = "continuation"  # the scored text, beside the scorers' records
TOP_PHRASES = 12  # extracted phrases tested one by one (the most frequent)


@dataclass
class Feature:
    name: str  # e.g. "lexicon:caring", "phrase=nurse", "judge.sentiment=negative"
    text: str  # how a sentence says it: "a word of the category 'caring'"
    binary: bool
    values: pd.Series  # per sample (NaN: not scored)


@dataclass
class Scored:
    """What a scorer's records give the analysis: features, and categorical scores for the
    omnibus tests (name → one value per sample)."""

    features: list[Feature] = field(default_factory=list)
    categorical: dict[str, pd.Series] = field(default_factory=dict)


class Scorer(Protocol):
    key: str

    def features(self, stored: pd.Series) -> Scored: ...


def stored(frame: pd.DataFrame, key: str) -> pd.Series:
    """Each sample's record under `key` (None where it has none)."""
    column = frame["scores"] if "scores" in frame.columns else pd.Series(None, index=frame.index)
    return pd.Series(
        [s.get(key) if isinstance(s, dict) else None for s in column], index=frame.index
    )


class LexiconScores:
    key = "lexicon"

    def record(self, text: str, lexicon: Any) -> dict[str, int]:
        """Words of each lexicon category in `text` (an `analysis.text.Lexicon`)."""
        return lexicon.counts(text)

    def features(self, records: pd.Series) -> Scored:
        categories = sorted({c for d in records if isinstance(d, dict) for c in d})
        found = [
            Feature(
                f"lexicon:{category}",
                f"a '{category}' word",
                True,
                records.map(
                    lambda d, c=category: float(d[c] > 0) if isinstance(d, dict) else np.nan
                ),
            )
            for category in categories
        ]
        return Scored(found)


class ExtractionScores:
    key = "extraction"
    phrase = "phrase"  # its categorical scores
    category = "category"

    def record(self, phrase: str | None, category: str | None) -> dict[str, Any]:
        return {self.phrase: phrase, self.category: category}

    def features(self, records: pd.Series) -> Scored:
        scored = Scored()
        if not records.map(lambda d: isinstance(d, dict)).any():
            return scored
        phrase = records.map(
            lambda d: (d.get(self.phrase) or "(none)") if isinstance(d, dict) else None
        )
        scored.categorical[self.phrase] = phrase
        for value, _ in Counter(phrase.dropna()).most_common(TOP_PHRASES):
            if value != "(none)":
                text = f"the phrase '{value}'"
                scored.features.append(
                    Feature(f"phrase={value}", text, True, indicator(phrase, value))
                )
        category = records.map(
            lambda d: (d.get(self.category) or "(other)") if isinstance(d, dict) else None
        )
        if (category.dropna() != "(other)").any():
            scored.categorical[self.category] = category
            for value in sorted(set(category.dropna()) - {"(other)"}):
                text = f"a first phrase in the '{value}' category"
                scored.features.append(
                    Feature(f"category={value}", text, True, indicator(category, value))
                )
        return scored


class JudgeScores:
    key = "judge"

    def record(
        self, answer: Any, probs: Any, error: str | None, model: str, run: int
    ) -> dict[str, Any]:
        """A judge's verdict on one sample: its answer, field probabilities, error, and
        which model and run judged."""
        return {"answer": answer, "probs": probs, "error": error, "model": model, "run": run}

    def features(self, records: pd.Series) -> Scored:
        scored = Scored()
        answers = records.map(lambda d: d.get("answer") if isinstance(d, dict) else None)
        probs = records.map(lambda d: d.get("probs") if isinstance(d, dict) else None)
        for name in sorted({k for a in answers if isinstance(a, dict) for k in a}):
            column = answers.map(lambda a, n=name: a.get(n) if isinstance(a, dict) else None)
            present = column.dropna()
            if present.map(lambda v: isinstance(v, int | float) and not isinstance(v, bool)).all():
                text = f"the judge's {name}"
                scored.features.append(Feature(f"judge.{name}", text, False, column.astype(float)))
                continue
            text = column.map(lambda v: None if v is None else json_text(v))
            scored.categorical[f"judge.{name}"] = text
            for value in sorted(set(text.dropna())):
                scored.features += self._value_features(name, value, text, probs)
        return scored

    @staticmethod
    def _value_features(name: str, value: str, text: pd.Series, probs: pd.Series) -> list[Feature]:
        """The judge said `name` = `value`: as a 0/1 feature, and as its probability."""
        found = [
            Feature(
                f"judge.{name}={value}",
                f"the judge's {name} = {value}",
                True,
                indicator(text, value),
            )
        ]
        soft = probs.map(lambda p: _probability(p, name, value) if isinstance(p, dict) else np.nan)
        if soft.notna().any():
            found.append(
                Feature(
                    f"judge.{name}={value} (prob)",
                    f"the judge's probability of {name} = {value}",
                    False,
                    soft,
                )
            )
        return found


def score_parts(score: str) -> tuple[str | None, str]:
    """("lexicon" | "category" | "phrase", the category or phrase) of a model-free
    feature's name as the analysis names it ("lexicon:care", "category=care",
    "phrase=nurse"); (None, "") for any other name."""
    for kind, sep in (("lexicon", ":"), ("category", "="), ("phrase", "=")):
        if score.startswith(kind + sep):
            return kind, score[len(kind) + 1 :]
    return None, ""


def tracked_score(scores: dict[str, Any], score: str) -> float:
    """One sample's value of a model-free feature (named as `score_parts` reads it), from
    its scores: what a sequential probe's `[stop]` tracks, equal to that feature's value
    in `features`."""
    kind, name = score_parts(score)
    if kind == "lexicon":
        return float(scores[LEXICON.key].get(name, 0) > 0)
    if kind is None:
        raise ValueError(f"{score!r} is not a model-free score")
    field = EXTRACTION.category if kind == "category" else EXTRACTION.phrase
    return float(scores[EXTRACTION.key][field] == name)


LEXICON = LexiconScores()
EXTRACTION = ExtractionScores()
JUDGE = JudgeScores()
SCORERS: tuple[Scorer, ...] = (LEXICON, EXTRACTION, JUDGE)


def features(frame: pd.DataFrame) -> Scored:
    """Every scorer's features of a probe run's samples, in the order of `SCORERS`."""
    everything = Scored()
    for scorer in SCORERS:
        scored = scorer.features(stored(frame, scorer.key))
        everything.features += scored.features
        everything.categorical |= scored.categorical
    return everything


def json_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _probability(probs: dict[str, Any], name: str, value: str) -> float:
    table = probs.get(name)
    if not isinstance(table, dict):
        return np.nan
    parsed = {"true": True, "false": False}
    return float(sum(p for v, p in table.items() if json_text(parsed.get(v, v)) == value))


def indicator(column: pd.Series, value: str) -> pd.Series:
    return column.map(lambda v: np.nan if v is None else float(v == value))
