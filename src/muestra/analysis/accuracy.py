"""Statistics of scored questions: accuracy, votes, and paired comparisons.

- `Accuracy`: share of right answers with its Wilson 95% interval.
- `expected_accuracy`: the mean probability of the right answer (exact answer
  probabilities), with a percentile bootstrap interval over questions — far narrower than
  counting argmax hits, because every question contributes a number in [0, 1], not a bit.
- `majority`: the voted answer of sampled paths: most votes (or, weighted, the largest
  summed probability); ties go to the larger summed probability, then to the answer seen
  first, so a vote is a function of the samples alone.
- `vote_curve`: accuracy of the majority of the first k paths, k = 1, 3, 5, … N (the first
  k samples are what a run with k samples per question draws: same seeds).
- `mcnemar`: exact McNemar test of two scorings of the same questions (binomial test on
  the discordant pairs).
- `paired_bootstrap`: the difference of two accuracies on the same questions with a paired
  percentile bootstrap interval (questions resampled, both sides together).
- `discrimination`: does a score (the samples' agreement, a probability) tell right
  answers from wrong ones? AUROC with a bootstrap interval, and accuracy per score bin
  (a calibration curve). With only right or only wrong answers there is nothing to
  separate: the AUROC is None and `explain()` says why in words.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats
from scipy.stats import rankdata

from muestra.analysis.language import say
from muestra.analysis.stats import bootstrap_mean, wilson

PAIRED_RESAMPLES = 10000


@dataclass(frozen=True)
class Accuracy:
    correct: int
    total: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def as_dict(self) -> dict[str, float | int]:
        return {
            "accuracy": self.value,
            "correct": self.correct,
            "total": self.total,
            "low": self.low,
            "high": self.high,
        }


def accuracy(correct: Sequence[bool]) -> Accuracy:
    hits, total = int(sum(bool(c) for c in correct)), len(correct)
    low, high = wilson(hits, total)
    return Accuracy(hits, total, low, high)


def expected_accuracy(p_correct: Sequence[float], seed: int = 0) -> tuple[float, float, float]:
    """(mean probability of the right answer, low, high)."""
    values = np.asarray(p_correct, dtype=float)
    low, high = bootstrap_mean(values, seed=seed)
    return float(values.mean()), low, high


def majority(votes: Sequence[str | None], weights: Sequence[float] | None = None) -> str | None:
    """The voted answer (None votes, e.g. invalid answers, are not counted)."""
    counts: Counter[str] = Counter()
    mass: dict[str, float] = {}
    first: dict[str, int] = {}
    for i, vote in enumerate(votes):
        if vote is None:
            continue
        counts[vote] += 1
        mass[vote] = mass.get(vote, 0.0) + (weights[i] if weights is not None else 0.0)
        first.setdefault(vote, i)
    if not counts:
        return None
    if weights is not None:
        return max(counts, key=lambda v: (mass[v], counts[v], -first[v]))
    return max(counts, key=lambda v: (counts[v], mass[v], -first[v]))


def vote_sizes(n: int) -> list[int]:
    """1, 3, 5, … up to n, and n itself."""
    sizes = list(range(1, n + 1, 2))
    return sizes if sizes[-1] == n else [*sizes, n]


def vote_curve(
    votes: Sequence[Sequence[str | None]],
    answers: Sequence[str | None],
    weights: Sequence[Sequence[float]] | None = None,
) -> list[tuple[int, Accuracy]]:
    """Per k, the accuracy of the majority of each question's first k votes."""
    n = min(len(v) for v in votes)
    curve = []
    for k in vote_sizes(n):
        picked = [
            majority(v[:k], None if weights is None else weights[q][:k])
            for q, v in enumerate(votes)
        ]
        curve.append(
            (k, accuracy([p is not None and p == a for p, a in zip(picked, answers, strict=False)]))
        )
    return curve


@dataclass(frozen=True)
class McNemar:
    only_a: int  # questions A gets right and B wrong
    only_b: int
    p_value: float


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> McNemar:
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    discordant = only_a + only_b
    p = 1.0 if discordant == 0 else scipy_stats.binomtest(only_a, discordant, 0.5).pvalue
    return McNemar(only_a, only_b, float(p))


def paired_bootstrap(
    correct_a: Sequence[bool],
    correct_b: Sequence[bool],
    seed: int = 0,
    resamples: int = PAIRED_RESAMPLES,
) -> tuple[float, float, float]:
    """(accuracy A − accuracy B, low, high) over the same questions."""
    diff = np.asarray(correct_a, dtype=float) - np.asarray(correct_b, dtype=float)
    rng = np.random.default_rng(seed)
    draws = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    low, high = np.percentile(draws, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


@dataclass(frozen=True)
class Discrimination:
    """How well a score (e.g. the samples' agreement) separates right from wrong answers:
    AUROC with a bootstrap interval over questions, and the calibration bins."""

    auroc: float | None  # None: only right or only wrong answers (`explain` says which)
    low: float | None
    high: float | None
    positives: int
    negatives: int
    bins: list[tuple[float, float, Accuracy]]  # (bin's low edge, mean score, accuracy in it)

    def explain(self, lang: str = "en") -> str:
        """The AUROC with its interval, or in words why there is none."""
        if self.auroc is not None:
            return say("auroc", lang, auroc=self.auroc, low=self.low, high=self.high)
        total = self.positives + self.negatives
        which = say("all_right" if self.negatives == 0 else "all_wrong", lang, n=total)
        return say("no_auroc", lang, why=say("auroc_needs", lang, which=which))

    def __str__(self) -> str:
        return self.explain()


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """P(score of a right answer > score of a wrong one), ties counting one half; None
    without both kinds of answer."""
    ranks = rankdata(scores)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return None
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def discrimination(
    scores: Sequence[float], correct: Sequence[bool], bins: int = 5, seed: int = 0
) -> Discrimination:
    """AUROC of `scores` for `correct` (percentile bootstrap, 2,000 resamples of the
    questions) and the accuracy in `bins` equal-width score bins over [0, 1]."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(correct, dtype=bool)
    if len(s) != len(y) or len(s) == 0:
        raise ValueError(f"{len(s)} scores for {len(y)} answers: give one score per answer")
    value = _auroc(s, y)
    rng = np.random.default_rng(seed)
    draws = [_auroc(s[i], y[i]) for i in (rng.integers(0, len(s), len(s)) for _ in range(2000))]
    kept = [d for d in draws if d is not None]
    low, high = (
        (float(np.percentile(kept, 2.5)), float(np.percentile(kept, 97.5)))
        if kept and value is not None
        else (None, None)
    )
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(s, edges[1:-1]), 0, bins - 1)
    table = [
        (float(edges[b]), float(s[index == b].mean()), accuracy(list(y[index == b])))
        for b in range(bins)
        if (index == b).any()
    ]
    return Discrimination(value, low, high, int(y.sum()), int((~y).sum()), table)
