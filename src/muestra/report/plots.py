"""Matplotlib figures of the analysis' results, for notebooks.

Each function takes the analysis' own records (the ones `muestra report` draws as SVG and
`muestra analyze` prints) and returns a `matplotlib.figure.Figure` that is not registered
with pyplot: a notebook shows it once when a cell returns it, and a script can
`fig.savefig(...)`. Bars and points are drawn in the records' order, so a figure's heights
are the records' numbers (tests read them back). Intervals are the records' own (Wilson for
shares and accuracies, bootstrap for paired differences and means).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from muestra.analysis import Comparison, Distribution, FieldProbSummary, Pooled
from muestra.analysis.accuracy import Accuracy, Discrimination
from muestra.analysis.probes import GroupDifference
from muestra.analysis.rewards import RewardCell

PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1"]


def _figure(width: float, height: float) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def _whiskers(values: Sequence[float], lows: Sequence[float], highs: Sequence[float]) -> Any:
    """Whisker lengths below and above each value (≥ 0: a bound equal to its value up to
    rounding draws no whisker)."""
    v = np.asarray(values, dtype=float)
    below = np.clip(v - np.asarray(lows, dtype=float), 0, None)
    return np.vstack([below, np.clip(np.asarray(highs, dtype=float) - v, 0, None)])


def distributions(records: Sequence[Distribution], field: str, title: str | None = None) -> Any:
    """Grouped bars of one answer field: a group of bars per prompt (or cell), one bar per
    value, its share with the Wilson 95% interval as a whisker."""
    dists = [d for d in records if d.field == field]
    if not dists:
        raise ValueError(f"no distribution of field {field!r}")
    values = [v.value for v in dists[0].values]
    fig, ax = _figure(max(4.0, 1.1 * len(dists) * max(len(values), 2) / 2 + 2), 3.2)
    width = 0.8 / len(values)
    for i, value in enumerate(values):
        shares = [next(s for s in d.values if s.value == value) for d in dists]
        x = np.arange(len(dists)) + (i - (len(values) - 1) / 2) * width
        ax.bar(
            x,
            [s.proportion for s in shares],
            width * 0.95,
            yerr=_whiskers(
                [s.proportion for s in shares], [s.low for s in shares], [s.high for s in shares]
            ),
            capsize=3,
            color=PALETTE[i % len(PALETTE)],
            label=value,
        )
    ax.set_xticks(range(len(dists)), [f"{d.group}\n(n={d.n})" for d in dists])
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of samples")
    ax.set_title(title or field)
    ax.legend(title=field, fontsize="small")
    return fig


def pooled(records: Sequence[Pooled], field: str, by: str) -> Any:
    """Each value's share per condition (or model), pooled over the prompts, with its
    prompt-level cluster-bootstrap interval."""
    rows = [p for p in records if p.field == field and p.by == by]
    if not rows:
        raise ValueError(f"no pooled shares of {field!r} by {by}: the run has one {by}")
    levels = list(dict.fromkeys(p.level for p in rows))
    values = list(dict.fromkeys(p.value for p in rows))
    fig, ax = _figure(max(4.0, 1.1 * len(levels) * max(len(values), 2) / 2 + 2), 3.2)
    width = 0.8 / len(values)
    for i, value in enumerate(values):
        cells = [next(p for p in rows if p.level == level and p.value == value) for level in levels]
        ax.bar(
            np.arange(len(levels)) + (i - (len(values) - 1) / 2) * width,
            [p.share for p in cells],
            width * 0.95,
            yerr=_whiskers(
                [p.share for p in cells], [p.low for p in cells], [p.high for p in cells]
            ),
            capsize=3,
            color=PALETTE[i % len(PALETTE)],
            label=value,
        )
    sizes = {p.level: p.n for p in rows}
    ax.set_xticks(range(len(levels)), [f"{level}\n(n={sizes[level]})" for level in levels])
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of samples (pooled over prompts)")
    ax.set_title(f"{field} by {by}")
    ax.legend(title=field, fontsize="small")
    return fig


def field_probs(records: Sequence[FieldProbSummary], field: str | None = None) -> Any:
    """The exact probability of each value (mean over samples, bootstrap interval) beside
    the share of samples that drew it (hollow marker): the first estimates what the second
    counts, usually with a much narrower interval."""
    rows = [r for r in records if field is None or r.field == field]
    if not rows:
        raise ValueError("no field_probs to plot" + (f" for field {field!r}" if field else ""))
    fig, ax = _figure(6.0, 0.35 * len(rows) + 1.2)
    y = np.arange(len(rows))[::-1]
    ax.errorbar(
        [r.mean_probability for r in rows],
        y,
        xerr=_whiskers(
            [r.mean_probability for r in rows], [r.low for r in rows], [r.high for r in rows]
        ),
        fmt="o",
        color=PALETTE[0],
        capsize=3,
        label="exact probability (mean)",
    )
    ax.scatter(
        [r.sampled_share for r in rows],
        y,
        facecolors="none",
        edgecolors=PALETTE[2],
        label="share of samples",
        zorder=3,
    )
    ax.set_yticks(y, [f"{r.group} · {r.field}={r.value}" for r in rows])
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability")
    ax.legend(fontsize="small")
    return fig


def _forest(
    labels: Sequence[str],
    values: Sequence[float],
    lows: Sequence[float],
    highs: Sequence[float],
    xlabel: str,
    title: str | None,
) -> Any:
    fig, ax = _figure(7.0, 0.35 * len(labels) + 1.2)
    y = np.arange(len(labels))[::-1]
    colors = [
        PALETTE[2] if lo > 0 or hi < 0 else PALETTE[0] for lo, hi in zip(lows, highs, strict=True)
    ]
    for yi, v, lo, hi, c in zip(y, values, lows, highs, colors, strict=True):
        ax.errorbar([v], [yi], xerr=_whiskers([v], [lo], [hi]), fmt="o", color=c, capsize=3)
    ax.axvline(0, color="#999", linewidth=1)
    ax.set_yticks(y, list(labels))
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title)
    return fig


def forest(records: Sequence[Comparison], title: str | None = None) -> Any:
    """Paired differences of a value's share between two conditions or models (averaged
    over prompts), with their cluster-bootstrap intervals; red when the interval excludes 0."""
    if not records:
        raise ValueError("no paired comparisons: the run compares no conditions or models")
    return _forest(
        [f"{c.field}={c.value}: {c.a} − {c.b}" for c in records],
        [c.difference for c in records],
        [c.low for c in records],
        [c.high for c in records],
        "difference of shares",
        title,
    )


def group_differences(records: Sequence[GroupDifference], title: str | None = None) -> Any:
    """A probe's group differences per feature (paired over its templates), with their
    bootstrap intervals; red when the interval excludes 0."""
    if not records:
        raise ValueError("no group differences to plot")
    return _forest(
        [f"{d.feature}: {d.a} − {d.b}" for d in records],
        [d.difference for d in records],
        [d.low for d in records],
        [d.high for d in records],
        "difference between groups",
        title,
    )


def accuracies(rows: Sequence[tuple[str, Accuracy]], title: str | None = None) -> Any:
    """One bar per scoring (method · model): accuracy with its Wilson 95% interval."""
    if not rows:
        raise ValueError("no accuracies to plot")
    fig, ax = _figure(max(4.0, 1.3 * len(rows) + 1), 3.2)
    values = [a.value for _, a in rows]
    ax.bar(
        range(len(rows)),
        values,
        yerr=_whiskers(values, [a.low for _, a in rows], [a.high for _, a in rows]),
        capsize=4,
        color=[PALETTE[i % len(PALETTE)] for i in range(len(rows))],
    )
    ax.set_xticks(range(len(rows)), [f"{label}\n(n={a.total})" for label, a in rows])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    if title:
        ax.set_title(title)
    return fig


def vote_curves(curves: Sequence[tuple[str, Sequence[tuple[int, Accuracy]]]]) -> Any:
    """Accuracy of the majority of the first k sampled paths, per k, with Wilson bands."""
    if not curves:
        raise ValueError("no vote curves: only `vote` evaluations have one")
    fig, ax = _figure(5.0, 3.2)
    for i, (label, curve) in enumerate(curves):
        ks = [k for k, _ in curve]
        color = PALETTE[i % len(PALETTE)]
        ax.plot(ks, [a.value for _, a in curve], "o-", color=color, label=label)
        ax.fill_between(
            ks, [a.low for _, a in curve], [a.high for _, a in curve], color=color, alpha=0.2
        )
    ax.set_xlabel("paths voted (k)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize="small")
    return fig


def rewards(records: Sequence[RewardCell], title: str | None = None) -> Any:
    """Mean reward per prompt, one bar per model (or condition), bootstrap intervals:
    a policy before and after alignment side by side."""
    if not records:
        raise ValueError("no rewards: score the run with `muestra reward score` first")
    prompts = list(dict.fromkeys(c.prompt for c in records))
    series = list(dict.fromkeys(f"{c.model} {c.condition}".strip() for c in records))
    fig, ax = _figure(max(4.0, 1.2 * len(prompts) * len(series) / 2 + 2), 3.2)
    width = 0.8 / len(series)
    for i, name in enumerate(series):
        cells = [c for c in records if f"{c.model} {c.condition}".strip() == name]
        x = [prompts.index(c.prompt) + (i - (len(series) - 1) / 2) * width for c in cells]
        means = [c.mean for c in cells]
        ax.bar(
            x,
            means,
            width * 0.95,
            yerr=_whiskers(means, [c.low for c in cells], [c.high for c in cells]),
            capsize=3,
            color=PALETTE[i % len(PALETTE)],
            label=name,
        )
    ax.axhline(0, color="#999", linewidth=1)
    ax.set_xticks(range(len(prompts)), prompts)
    ax.set_ylabel("mean reward")
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return fig


def calibration(found: Discrimination, score: str = "agreement") -> Any:
    """Accuracy per score bin against the bin's mean score (the diagonal is perfect
    calibration), with Wilson intervals, and the AUROC in the title."""
    fig, ax = _figure(4.5, 4.0)
    means = [m for _, m, _ in found.bins]
    accs = [a.value for _, _, a in found.bins]
    ax.plot([0, 1], [0, 1], color="#999", linewidth=1, linestyle="--")
    ax.errorbar(
        means,
        accs,
        yerr=_whiskers(accs, [a.low for *_, a in found.bins], [a.high for *_, a in found.bins]),
        fmt="o-",
        color=PALETTE[0],
        capsize=3,
    )
    for m, a, (_, _, acc) in zip(means, accs, found.bins, strict=True):
        ax.annotate(
            f"n={acc.total}", (m, a), textcoords="offset points", xytext=(5, -12), fontsize=8
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"{score} (bin mean)")
    ax.set_ylabel("share right")
    ax.set_title(f"AUROC {found.auroc:.2f} [{found.low:.2f}, {found.high:.2f}]")
    return fig


SEQUENCE_WORDS = {
    "es": {
        "counts": "conteo de respuestas",
        "field_probs": "probabilidades exactas (Rao–Blackwell)",
        "x": "muestras",
        "y": "proporción de {value}",
        "stop": "se detuvo ({n} muestras)",
        "reference": "referencia {reference:.0%}",
        "title": "{value}: estimación y banda de confianza al 95 % válida en todo momento",
    },
    "en": {
        "counts": "counting answers",
        "field_probs": "exact probabilities (Rao–Blackwell)",
        "x": "samples",
        "y": "share of {value}",
        "stop": "stopped ({n} samples)",
        "reference": "reference {reference:.0%}",
        "title": "{value}: estimate and anytime-valid 95% confidence band",
    },
}


def sequence_bands(
    curves: Any,
    value: str,
    stopped_at: int | None = None,
    reference: float | None = None,
    lang: str = "es",
) -> Any:
    """One cell's estimate and its confidence sequence against the number of samples, one
    line and band per estimator (`analysis.sequential.curves` rows of one cell), the
    sample count where the run stopped and the reference, labelled in `lang` (es, en)."""
    words = SEQUENCE_WORDS.get(lang)
    if words is None:
        raise ValueError(f"lang must be one of {', '.join(SEQUENCE_WORDS)}, got {lang!r}")
    fig, ax = _figure(7, 3.6)
    for color, (estimator, rows) in zip(
        PALETTE, curves.groupby("estimator", sort=False), strict=False
    ):
        ax.plot(rows["n"], rows["estimate"], color=color, label=words[estimator])
        ax.fill_between(rows["n"], rows["low"], rows["high"], color=color, alpha=0.2)
    if stopped_at is not None:
        ax.axvline(
            stopped_at, color="black", linestyle="--", label=words["stop"].format(n=stopped_at)
        )
    if reference is not None:
        label = words["reference"].format(reference=reference)
        ax.axhline(reference, color="grey", linestyle=":", label=label)
    ax.set_xlabel(words["x"])
    ax.set_ylabel(words["y"].format(value=value))
    ax.set_title(words["title"].format(value=value), fontsize=10)
    ax.legend(fontsize=8)
    return fig
