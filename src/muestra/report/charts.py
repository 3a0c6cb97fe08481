"""The report's charts, inline SVG: bars with Wilson whiskers, histograms, a forest plot of
paired differences. Every value written into them goes through `escape`."""

from __future__ import annotations

import numpy as np
import pandas as pd

from muestra.analysis import Analysis
from muestra.report.markup import escape

_e = escape  # (short: the charts write it on every line)

PALETTE = [
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
]


def _label(text: str, room: float) -> str:
    """`text` cut to fit `room` pixels at ~6.5 px a character (the whole text in a tooltip)."""
    fits = max(int(room / 6.5), 4)
    return text if len(text) <= fits else text[: fits - 1] + "…"


def bars(analysis: Analysis, field: str) -> str:
    """Grouped bars: one group per prompt, one bar per value, Wilson whiskers; group labels
    cut to their group's width, legend entries spaced by their length (nothing overlaps),
    one distinct colour per value."""
    dists = [d for d in analysis.distributions if d.field == field]
    values = [v.value for v in dists[0].values]
    colors = value_colors(len(values))
    bar, height, top = 22, 160, 20
    group = max(len(values) * bar + 30, 140)
    steps = [max(60, 20 + 7 * len(str(v))) for v in values]
    width = max(70 + len(dists) * group, 70 + sum(steps))
    parts = [f'<svg class="chart" data-field="{_e(field)}" width="{width}" height="{height + 70}">']
    parts.append(
        f'<line x1="50" y1="{top + height}" x2="{width}" y2="{top + height}" stroke="#999"/>'
    )
    for tick in (0, 0.5, 1):
        y = top + height * (1 - tick)
        parts.append(f'<text x="10" y="{y + 4}">{tick:.0%}</text>')
    x = 60
    for dist in dists:
        for index, share in enumerate(dist.values):
            h = height * share.proportion
            parts.append(
                f'<rect class="bar" data-value="{_e(share.value)}" data-prompt="{_e(dist.group)}" '
                f'data-share="{share.proportion:.4f}" x="{x}" y="{top + height - h:.1f}" '
                f'width="{bar - 2}" height="{h:.1f}" fill="{colors[index]}"><title>'
                f"{_e(share.value)}: {share.count}/{dist.n} = {share.proportion:.2f} "
                f"[{share.low:.2f}, {share.high:.2f}]</title></rect>"
            )
            cx = x + (bar - 2) / 2
            y_low, y_high = top + height * (1 - share.low), top + height * (1 - share.high)
            parts.append(
                f'<line class="whisker" x1="{cx}" x2="{cx}" y1="{y_low:.1f}" '
                f'y2="{y_high:.1f}" stroke="#222"/>'
            )
            x += bar
        label = f"{dist.group} (n={dist.n})"
        parts.append(
            f'<text x="{x - len(dist.values) * bar}" y="{top + height + 16}">'
            f"<title>{_e(label)}</title>{_e(_label(label, group - 10))}</text>"
        )
        x += group - len(dist.values) * bar
    left = 60
    for value, color, step in zip(values, colors, steps, strict=True):
        parts.append(
            f'<rect x="{left}" y="{top + height + 32}" width="10" height="10" '
            f'fill="{color}"/><text x="{left + 14}" y="{top + height + 41}">{_e(value)}</text>'
        )
        left += step
    parts.append("</svg>")
    return "".join(parts)


def value_colors(n: int) -> list[str]:
    """`n` distinct colours: the palette's ten, then evenly spaced hues."""
    if n <= len(PALETTE):
        return PALETTE[:n]
    return [f"hsl({round(360 * i / n)}, 60%, 50%)" for i in range(n)]


def histogram(frame: pd.DataFrame, field: str) -> str:
    values = frame[field].dropna().astype(float)
    edges = np.histogram_bin_edges(values, bins=min(20, max(1, values.nunique())))
    parts = []
    for prompt, rows in frame.groupby("prompt_id", sort=False):
        counts, _ = np.histogram(rows[field].dropna().astype(float), bins=edges)
        peak = max(int(counts.max()), 1)
        width = max(16 * len(counts) + 40, 220)
        svg = [f'<svg class="histogram" data-field="{_e(field)}" width="{width}" height="130">']
        for i, count in enumerate(counts):
            h = 90 * count / peak
            svg.append(
                f'<rect class="hist-bar" x="{20 + 16 * i}" y="{100 - h:.1f}" width="14" '
                f'height="{h:.1f}" fill="#4e79a7"><title>[{edges[i]:.3g}, '
                f"{edges[i + 1]:.3g}): {count}</title></rect>"
            )
        svg.append(f'<text x="20" y="118">{_e(prompt)}: {edges[0]:.3g} … {edges[-1]:.3g}</text>')
        parts.append("".join(svg) + "</svg>")
    return "".join(parts)


def forest(analysis: Analysis) -> str:
    """One line per paired comparison: the difference and its interval around 0."""
    rows = analysis.comparisons
    width, left, row = 760, 330, 20
    scale = (width - left - 20) / 2  # −1 … +1
    zero = left + scale
    parts = [f'<svg class="forest" width="{width}" height="{row * len(rows) + 30}">']
    parts.append(f'<line x1="{zero}" x2="{zero}" y1="0" y2="{row * len(rows) + 5}" stroke="#999"/>')
    for tick in (-1, -0.5, 0.5, 1):
        x = zero + tick * scale
        parts.append(f'<text x="{x - 10:.0f}" y="{row * len(rows) + 22}">{tick:+g}</text>')
    for i, c in enumerate(rows):
        y = 12 + i * row
        color = "#e15759" if c.low > 0 or c.high < 0 else "#4e79a7"
        parts.append(
            f'<text x="4" y="{y + 4}">{_e(c.field)}={_e(c.value)}: {_e(c.a)} − {_e(c.b)}</text>'
            f'<line class="interval" x1="{zero + c.low * scale:.1f}" '
            f'x2="{zero + c.high * scale:.1f}" y1="{y}" y2="{y}" stroke="{color}" '
            'stroke-width="2"/>'
            f'<circle class="estimate" data-by="{_e(c.by)}" data-field="{_e(c.field)}" '
            f'data-value="{_e(c.value)}" '
            f'data-difference="{c.difference:.4f}" data-low="{c.low:.4f}" '
            f'cx="{zero + c.difference * scale:.1f}" cy="{y}" r="4" fill="{color}">'
            f"<title>{c.difference:+.3f} [{c.low:+.3f}, {c.high:+.3f}] over {c.prompts} "
            "prompts</title></circle>"
        )
    parts.append("</svg>")
    return "".join(parts)
