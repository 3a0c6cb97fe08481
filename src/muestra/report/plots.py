"""Matplotlib figures of the analysis' results, for notebooks.

Each function takes the analysis' own records (the ones `muestra report` draws as SVG and
`muestra analyze` prints) and returns a `matplotlib.figure.Figure` that is not registered
with pyplot: a notebook shows it once when a cell returns it, and a script can
`fig.savefig(...)`. Bars and points are drawn in the records' order, so a figure's heights
are the records' numbers (tests read them back). Intervals are the records' own (Wilson for
shares and accuracies, bootstrap for paired differences and means); a record without an
interval (an exact probability) draws no whisker.

Every figure speaks `lang` ("en" or "es": axis labels, legends, titles), gives each series
its own colour (`colors`: ten distinct ones, then a 20-colour map), keeps its legend
outside the bars, and wraps or turns tick labels that would collide (`_ticks`). Counts
(k paths voted) get integer ticks.
"""

from __future__ import annotations

import itertools
import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np

from muestra.analysis import Comparison, Distribution, FieldProbSummary, Pooled
from muestra.analysis.accuracy import Accuracy, Discrimination
from muestra.analysis.language import say
from muestra.analysis.probes import GroupDifference
from muestra.analysis.rewards import RewardCell

# Tableau 10: ten colours a reader tells apart (also in grey and for common colour blindness)
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
           "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]  # fmt: skip
WRAP = 16  # characters per line of a tick label


def colors(n: int) -> list[str]:
    """`n` distinct colours: the palette, or a 20-colour map beyond ten."""
    if n <= len(PALETTE):
        return PALETTE[:n]
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps["tab20"] if n <= 20 else colormaps["turbo"]
    return [to_hex(cmap(i / max(n - 1, 1) if n > 20 else i)) for i in range(n)]


def _figure(width: float, height: float) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # a renderer to measure labels with (`_ticks`)
    return fig, fig.add_subplot()


def _whiskers(
    values: Sequence[float], lows: Sequence[float | None], highs: Sequence[float | None]
) -> Any:
    """Whisker lengths below and above each value (≥ 0: a bound equal to its value up to
    rounding, or no bound at all, draws no whisker)."""
    v = np.asarray(values, dtype=float)
    lo = np.array([x if b is None else b for x, b in zip(v, lows, strict=True)], dtype=float)
    hi = np.array([x if b is None else b for x, b in zip(v, highs, strict=True)], dtype=float)
    return np.vstack([np.clip(v - lo, 0, None), np.clip(hi - v, 0, None)])


def _ticks(ax: Any, labels: Sequence[str], width: float) -> None:
    """x tick labels wrapped at spaces to `WRAP` characters; when, laid out, two of them
    would still touch, unwrapped and turned 30°. (`width`: the figure's, in inches.)"""
    wrapped = ["\n".join(textwrap.wrap(str(t), WRAP, break_on_hyphens=False,
                                       break_long_words=False)) or str(t)
               for t in labels]  # fmt: skip
    ax.set_xticks(range(len(labels)), wrapped)
    fig = ax.figure
    fig.draw_without_rendering()  # the constrained layout places the labels
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels()]
    gap = 0.05 * fig.dpi  # at least 0.05 in between two labels
    if any(b.x0 - a.x1 < gap for a, b in itertools.pairwise(boxes)):
        ax.set_xticks(range(len(labels)), [str(t) for t in labels])  # one line each, turned
        longest = max(len(str(t)) for t in labels)
        fig.set_figheight(fig.get_figheight() + min(2.5, 0.05 * longest))  # the axes keep theirs
        for text in ax.get_xticklabels():
            text.set_rotation(30)
            text.set_horizontalalignment("right")
            text.set_rotation_mode("anchor")


def _legend(ax: Any, title: str | None = None) -> None:
    """The legend beside the axes, never over the bars."""
    ax.legend(title=title, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0)  # fmt: skip


def _grouped(
    ax: Any,
    groups: Sequence[str],
    series: Sequence[str],
    cells: list[list[tuple[float, float | None, float | None]]],
) -> None:
    """Grouped bars: `cells[i][g]` = (height, low, high) of series i in group g."""
    width = 0.8 / len(series)
    for i, (name, color) in enumerate(zip(series, colors(len(series)), strict=True)):
        heights = [c[0] for c in cells[i]]
        ax.bar(
            np.arange(len(groups)) + (i - (len(series) - 1) / 2) * width,
            heights,
            width * 0.95,
            yerr=_whiskers(heights, [c[1] for c in cells[i]], [c[2] for c in cells[i]]),
            capsize=3,
            color=color,
            label=name,
        )


def _bar_width(groups: int, series: int) -> float:
    return min(14.0, max(5.5, 0.45 * groups * max(series, 2) + 2.5))


def distributions(
    records: Sequence[Distribution], field: str, title: str | None = None, lang: str = "en"
) -> Any:
    """Grouped bars of one answer field: a group of bars per prompt (or cell), one bar per
    value, its share with the Wilson 95% interval as a whisker."""
    dists = [d for d in records if d.field == field]
    if not dists:
        raise ValueError(f"no distribution of field {field!r}")
    values = [v.value for v in dists[0].values]
    width = _bar_width(len(dists), len(values))
    fig, ax = _figure(width, 3.4)
    cells = []
    for value in values:
        shares = [next(s for s in d.values if s.value == value) for d in dists]
        cells.append([(s.proportion, s.low, s.high) for s in shares])
    _grouped(ax, [d.group for d in dists], values, cells)
    ax.set_ylim(0, 1)
    ax.set_ylabel(say("share", lang))
    ax.set_title(title or field)
    _legend(ax, field)
    _ticks(ax, [f"{d.group} (n={d.n})" for d in dists], width)  # last: measured in place
    return fig


def pooled(records: Sequence[Pooled], field: str, by: str, lang: str = "en") -> Any:
    """Each value's share per condition (or model), pooled over the prompts, with its
    prompt-level cluster-bootstrap interval."""
    rows = [p for p in records if p.field == field and p.by == by]
    if not rows:
        raise ValueError(f"no pooled shares of {field!r} by {by}: the run has one {by}")
    levels = list(dict.fromkeys(p.level for p in rows))
    values = list(dict.fromkeys(p.value for p in rows))
    width = _bar_width(len(levels), len(values))
    fig, ax = _figure(width, 3.4)
    cells = []
    for value in values:
        found = [next(p for p in rows if p.level == level and p.value == value) for level in levels]
        cells.append([(p.share, p.low, p.high) for p in found])
    _grouped(ax, levels, values, cells)
    sizes = {p.level: p.n for p in rows}
    ax.set_ylim(0, 1)
    ax.set_ylabel(say("share_pooled", lang))
    ax.set_title(say("by", lang, field=field, by=say(by, lang) if by != "all" else by))
    _legend(ax, field)
    _ticks(ax, [f"{level} (n={sizes[level]})" for level in levels], width)
    return fig


def field_probs(
    records: Sequence[FieldProbSummary], field: str | None = None, lang: str = "en"
) -> Any:
    """The exact probability of each value (mean over samples, bootstrap interval; none
    when every sample has the same probability) beside the share of samples that drew it
    (hollow marker): the first estimates what the second counts, usually far more tightly."""
    rows = [r for r in records if field is None or r.field == field]
    if not rows:
        raise ValueError("no field_probs to plot" + (f" for field {field!r}" if field else ""))
    labels = [f"{r.group} · {r.field}={r.value}" for r in rows]
    width = min(14.0, max(7.0, 0.07 * max(len(t) for t in labels) + 4.5))
    fig, ax = _figure(width, 0.35 * len(rows) + 1.9)
    y = np.arange(len(rows))[::-1]
    means = [r.mean_probability for r in rows]
    ax.errorbar(means, y, xerr=_whiskers(means, [r.low for r in rows], [r.high for r in rows]),
                fmt="o", color=PALETTE[0], capsize=3, label=say("exact_mean", lang))  # fmt: skip
    ax.scatter([r.sampled_share for r in rows], y, facecolors="none", edgecolors=PALETTE[2],
               label=say("drawn_share", lang), zorder=3)  # fmt: skip
    ax.set_yticks(y, labels)
    ax.set_xlim(0, 1)
    ax.set_xlabel(say("probability", lang))
    handles, names = ax.get_legend_handles_labels()  # below the axes, beside each other
    fig.legend(handles, names, loc="outside lower center", ncols=2, fontsize="small")
    return fig


def _forest(
    labels: Sequence[str],
    values: Sequence[float],
    lows: Sequence[float],
    highs: Sequence[float],
    xlabel: str,
    title: str | None,
    red: Sequence[bool],
    meaning: str,
) -> Any:
    """One point and interval per label; `red` marks some, and `meaning` (the legend)
    says why."""
    fig, ax = _figure(7.5, 0.35 * len(labels) + 1.3)
    y = np.arange(len(labels))[::-1]
    for yi, v, lo, hi, marked in zip(y, values, lows, highs, red, strict=True):
        color = PALETTE[2] if marked else PALETTE[0]
        ax.errorbar([v], [yi], xerr=_whiskers([v], [lo], [hi]), fmt="o", color=color, capsize=3)
    ax.axvline(0, color="#999", linewidth=1)
    ax.set_yticks(y, list(labels))
    ax.set_xlabel(xlabel)
    if any(red):
        ax.plot([], [], "o", color=PALETTE[2], label=meaning)
        fig.legend(loc="outside lower center", fontsize="small", frameon=False)
    if title:
        ax.set_title(title)
    return fig


def forest(records: Sequence[Comparison], title: str | None = None, lang: str = "en") -> Any:
    """Paired differences of a value's share between two conditions, models or variants
    (averaged over prompts or groups), with their cluster-bootstrap intervals; red when
    the interval excludes 0 (the legend says so)."""
    if not records:
        raise ValueError("no paired comparisons: the run compares no conditions or models")
    return _forest(
        [f"{c.field}={c.value}: {c.a} − {c.b}" for c in records],
        [c.difference for c in records],
        [c.low for c in records],
        [c.high for c in records],
        say("difference_shares", lang),
        title,
        [c.low > 0 or c.high < 0 for c in records],
        say("red_excludes_zero", lang),
    )


def group_differences(
    records: Sequence[GroupDifference], title: str | None = None, lang: str = "en"
) -> Any:
    """A probe's group differences per feature (paired over its templates), with their
    bootstrap intervals; red for the probe's findings (significant after Holm, as its
    sentences; the legend says so). The interval is a bootstrap over templates and the
    test a permutation within them, so a finding's interval may touch 0, and an interval
    that excludes 0 need not be a finding."""
    if not records:
        raise ValueError("no group differences to plot")
    return _forest(
        [f"{d.feature}: {d.a} − {d.b}" for d in records],
        [d.difference for d in records],
        [d.low for d in records],
        [d.high for d in records],
        say("difference_groups", lang),
        title,
        [d.sentence is not None for d in records],
        say("red_finding", lang),
    )


def accuracies(
    rows: Sequence[tuple[str, Accuracy]], title: str | None = None, lang: str = "en"
) -> Any:
    """One bar per scoring (method · model): accuracy with its Wilson 95% interval."""
    if not rows:
        raise ValueError("no accuracies to plot")
    width = min(14.0, max(4.5, 1.2 * len(rows) + 1.5))
    fig, ax = _figure(width, 3.6)
    values = [a.value for _, a in rows]
    ax.bar(
        range(len(rows)),
        values,
        yerr=_whiskers(values, [a.low for _, a in rows], [a.high for _, a in rows]),
        capsize=4,
        color=colors(len(rows)),
    )
    ax.set_ylim(0, 1)
    ax.set_ylabel(say("accuracy", lang))
    if title:
        ax.set_title(title)
    _ticks(ax, [f"{label} (n={a.total})" for label, a in rows], width)
    return fig


def vote_curves(
    curves: Sequence[tuple[str, Sequence[tuple[int, Accuracy]]]], lang: str = "en"
) -> Any:
    """Accuracy of the majority of the first k sampled paths, per k, with Wilson bands;
    ticks only at the k that were voted."""
    if not curves:
        raise ValueError("no vote curves: only `vote` evaluations have one")
    fig, ax = _figure(6.0, 3.4)
    ks_all: set[int] = set()
    for (label, curve), color in zip(curves, colors(len(curves)), strict=True):
        ks = [k for k, _ in curve]
        ks_all |= set(ks)
        ax.plot(ks, [a.value for _, a in curve], "o-", color=color, label=label)
        ax.fill_between(
            ks, [a.low for _, a in curve], [a.high for _, a in curve], color=color, alpha=0.2
        )
    ax.set_xticks(sorted(ks_all))
    ax.set_xlabel(say("paths_voted", lang))
    ax.set_ylabel(say("accuracy", lang))
    ax.set_ylim(0, 1)
    _legend(ax)
    return fig


def rewards(records: Sequence[RewardCell], title: str | None = None, lang: str = "en") -> Any:
    """Mean reward per prompt, one bar per model (or condition), bootstrap intervals:
    a policy before and after alignment side by side."""
    if not records:
        raise ValueError("no rewards: score the run with `muestra reward score` first")
    prompts = list(dict.fromkeys(c.prompt for c in records))
    several = {k: len({getattr(c, k) for c in records}) > 1 for k in ("model", "condition")}

    def name_of(c: RewardCell) -> str:  # the model and the condition, where several ran
        parts = [c.model if several["model"] else "", c.condition if several["condition"] else ""]
        return " ".join(p for p in parts if p) or c.model

    series = list(dict.fromkeys(name_of(c) for c in records))
    width = _bar_width(len(prompts), len(series))
    fig, ax = _figure(width, 3.4)
    cells = []
    for name in series:
        by_prompt = {c.prompt: c for c in records if name_of(c) == name}
        cells.append([(by_prompt[p].mean, by_prompt[p].low, by_prompt[p].high)
                      if p in by_prompt else (0.0, None, None) for p in prompts])  # fmt: skip
    _grouped(ax, prompts, series, cells)
    ax.axhline(0, color="#999", linewidth=1)
    ax.set_ylabel(say("mean_reward", lang))
    _legend(ax)
    if title:
        ax.set_title(title)
    _ticks(ax, prompts, width)
    return fig


def calibration(found: Discrimination, score: str = "agreement", lang: str = "en") -> Any:
    """Accuracy per score bin against the bin's mean score (the diagonal is perfect
    calibration), with Wilson intervals; the AUROC in the title, or why there is none."""
    fig, ax = _figure(5.0, 4.2)
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
        below = (5, -12) if a > 0.15 else (5, 6)  # never under the x axis
        ax.annotate(f"n={acc.total}", (m, a), textcoords="offset points", xytext=below,
                    fontsize=8)  # fmt: skip
    ax.set_xlim(0, 1.08)  # room for a point (and its label) at 1
    ax.set_ylim(0, 1.05)
    ax.set_xlabel(say("bin_mean", lang, score=score))
    ax.set_ylabel(say("share_right", lang))
    ax.set_title("\n".join(textwrap.wrap(found.explain(lang), 60)), fontsize="medium")
    return fig


SEQUENCE_WORDS = {
    "es": {
        "counts": "conteo de respuestas",
        "field_probs": "probabilidades exactas (Rao–Blackwell)",
        "x": "muestras con respuesta",
        "y": "proporción de {value}",
        "stop": "se detuvo ({n} muestras)",
        "stop_used": "se detuvo ({n} muestras, {used} con respuesta)",
        "reference": "referencia {reference:.0%}",
        "title": "{value}: estimación y banda de confianza al 95 % válida en todo momento",
    },
    "en": {
        "counts": "counting answers",
        "field_probs": "exact probabilities (Rao–Blackwell)",
        "x": "samples with an answer",
        "y": "share of {value}",
        "stop": "stopped ({n} samples)",
        "stop_used": "stopped ({n} samples, {used} with an answer)",
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
    used: int | None = None,
) -> Any:
    """One cell's estimate and its confidence sequence against the number of samples with
    an answer, one line and band per estimator (`analysis.sequential.curves` rows of one
    cell), where the run stopped (`stopped_at` samples drawn, `used` of them with an
    answer: the line is drawn at `used`, the curves' own count) and the reference,
    labelled in `lang` (es, en)."""
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
        used = stopped_at if used is None else used
        label = words["stop" if used == stopped_at else "stop_used"]
        ax.axvline(used, color="black", linestyle="--", label=label.format(n=stopped_at, used=used))
    if reference is not None:
        label = words["reference"].format(reference=reference)
        ax.axhline(reference, color="grey", linestyle=":", label=label)
    ax.set_xlabel(words["x"])
    ax.set_ylabel(words["y"].format(value=value))
    ax.set_title(words["title"].format(value=value), fontsize=10)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)  # off the lines
    return fig
