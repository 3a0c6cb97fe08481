"""`muestra report`: one self-contained HTML file (inline SVG, CSS and JS; no network).

Sections: the run's provenance; budget-hit and error rates per prompt; the tests table
with adjusted p-values and one sentence per finding; goodness-of-fit tests of each field
against the reference distribution per prompt × condition × model; for each categorical
field a bar chart per prompt with Wilson 95% whiskers; shares pooled over prompts
(cluster bootstrap) and condition / model differences paired over prompts (a forest
plot); histograms of numeric fields; counterfactual pairs; field_probs against counted
draws; how often the reasoning mentions each term; and a sample browser that shows two
samples side by side (reasoning next to the answer). Large runs stay small: charts are
aggregates, and the browser embeds at most `per_cell` samples of each prompt × condition ×
model (reasoning cut to 1,500 characters), paginated in the page.

Stored text reaches the page only escaped: `_e` for HTML, `_script_json` for the JSON
inside `<script>`, which holds no `<`, `>` or `&`, so no answer can end the element or
open a comment in it.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

import numpy as np
import pandas as pd

from muestra.analysis import Analysis
from muestra.models.kit.presets import PRESETS, has_random_weights

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
STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#222}
h1{margin-bottom:0}h2{border-bottom:1px solid #ccc;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
td,th{border:1px solid #ddd;padding:.25rem .5rem;text-align:left}th{background:#f4f4f4}
.note{color:#666;font-size:.9rem}.finding{background:#fff6d5;padding:.3rem .6rem;margin:.2rem 0}
.pair{display:flex;gap:1rem}.pair>div{flex:1;border:1px solid #ddd;padding:.5rem;min-width:0}
pre{white-space:pre-wrap;word-break:break-word;background:#f8f8f8;padding:.4rem;
max-height:20rem;overflow:auto;font-size:.8rem}svg text{font-size:11px}
"""
SCRIPT = """
const samples = JSON.parse(document.getElementById('samples-data').textContent);
function show(side) {
  const select = document.getElementById('pick-' + side);
  const s = samples[Number(select.value)];
  const box = document.getElementById('sample-' + side);
  box.innerHTML = '';
  const head = document.createElement('p');
  head.textContent = `${s.prompt_id} · ${s.condition} · ${s.model} · sample ${s.sample} · ` +
    `seed ${s.seed} · ${s.finish_reason}` + (s.error ? ` · error: ${s.error}` : '');
  const answer = document.createElement('pre');
  answer.className = 'answer';
  answer.textContent = s.answer_text;
  const reasoning = document.createElement('pre');
  reasoning.className = 'reasoning';
  reasoning.textContent = s.reasoning || '(no reasoning)';
  box.append(head, document.createTextNode('Answer'), answer,
             document.createTextNode(`Reasoning (${s.think_tokens} tokens)`), reasoning);
}
function fill(side, start) {
  const select = document.getElementById('pick-' + side);
  select.innerHTML = '';
  samples.forEach((s, i) => {
    const option = document.createElement('option');
    option.value = i;
    option.textContent = `${s.prompt_id} / ${s.condition} / ${s.model} / #${s.sample}`;
    select.append(option);
  });
  select.value = Math.min(start, samples.length - 1);
  select.addEventListener('change', () => show(side));
  show(side);
}
if (samples.length) { fill('a', 0); fill('b', 1); }
document.getElementById('browser-count').textContent = samples.length;
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


# What could end a <script> element or open a comment in it, as JSON string escapes;
# U+2028/2029 too, which older JavaScript parsers take for line ends.
_SCRIPT_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


def _script_json(value: Any) -> str:
    """`value` as JSON safe to embed verbatim between <script> and </script>."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text.translate(_SCRIPT_ESCAPES)


def _table(headers: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _bars(analysis: Analysis, field: str) -> str:
    """Grouped bars: one group per prompt, one bar per value, Wilson whiskers."""
    dists = [d for d in analysis.distributions if d.field == field]
    values = [v.value for v in dists[0].values]
    bar, height, top = 22, 160, 20
    group = max(len(values) * bar + 30, 140)
    width = max(70 + len(dists) * group, 70 + len(values) * 110)
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
            color = PALETTE[index % len(PALETTE)]
            parts.append(
                f'<rect class="bar" data-value="{_e(share.value)}" data-prompt="{_e(dist.group)}" '
                f'data-share="{share.proportion:.4f}" x="{x}" y="{top + height - h:.1f}" '
                f'width="{bar - 2}" height="{h:.1f}" fill="{color}"><title>{_e(share.value)}: '
                f"{share.count}/{dist.n} = {share.proportion:.2f} [{share.low:.2f}, "
                f"{share.high:.2f}]</title></rect>"
            )
            cx = x + (bar - 2) / 2
            y_low, y_high = top + height * (1 - share.low), top + height * (1 - share.high)
            parts.append(
                f'<line class="whisker" x1="{cx}" x2="{cx}" y1="{y_low:.1f}" '
                f'y2="{y_high:.1f}" stroke="#222"/>'
            )
            x += bar
        parts.append(
            f'<text x="{x - len(dist.values) * bar}" y="{top + height + 16}">'
            f"{_e(dist.group)} (n={dist.n})</text>"
        )
        x += group - len(dist.values) * bar
    for index, value in enumerate(values):
        parts.append(
            f'<rect x="{60 + index * 110}" y="{top + height + 32}" width="10" height="10" '
            f'fill="{PALETTE[index % len(PALETTE)]}"/><text x="{74 + index * 110}" '
            f'y="{top + height + 41}">{_e(value)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _histogram(frame: pd.DataFrame, field: str) -> str:
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


def _forest(analysis: Analysis) -> str:
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
            f'<circle class="estimate" data-field="{_e(c.field)}" data-value="{_e(c.value)}" '
            f'data-difference="{c.difference:.4f}" data-low="{c.low:.4f}" '
            f'cx="{zero + c.difference * scale:.1f}" cy="{y}" r="4" fill="{color}">'
            f"<title>{c.difference:+.3f} [{c.low:+.3f}, {c.high:+.3f}] over {c.prompts} "
            "prompts</title></circle>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _fits(analysis: Analysis) -> str:
    """The goodness-of-fit tests: one row per field and prompt × condition × model cell."""
    if not analysis.fits:
        return ""
    note = (
        '<h2>Fit to the reference</h2><p class="note">Is each field skewed away from the '
        "reference distribution (uniform over the allowed values unless "
        "<code>[analysis.reference]</code> gives one)? Exact binomial test for two values, "
        "χ² for more (Monte-Carlo p-value when an expected count is below 5); p-values "
        "adjusted together with the tests above. Value: the most over-represented one, "
        "with its Wilson 95% interval.</p>"
    )
    headers = ["field", "prompt", "condition", "model", "method", "value", "n", "share"]
    headers += ["95% interval", "reference", "Cohen's w", "p", "p Holm", "p BH"]
    rows = [
        [
            f.field,
            f.prompt,
            f.condition,
            f.model,
            f.method,
            f.value,
            f.n,
            f"{f.share:.2f}",
            f"[{f.low:.2f}, {f.high:.2f}]",
            f"{f.reference:.2f}",
            f"{f.cohens_w:.2f}",
            f"{f.p_value:.3g}",
            f"{f.p_holm:.3g}",
            f"{f.p_bh:.3g}",
        ]
        for f in analysis.fits
    ]
    return note + _table(headers, rows, "fits")


def _browser_data(frame: pd.DataFrame, per_cell: int) -> str:
    keep = frame.groupby(["prompt_id", "condition", "model"], sort=False).head(per_cell)
    columns = [
        "prompt_id",
        "condition",
        "model",
        "sample",
        "seed",
        "finish_reason",
        "error",
        "answer_text",
        "reasoning",
        "think_tokens",
    ]
    records = keep[columns].astype(object).where(keep[columns].notna(), None).to_dict("records")
    for record in records:
        record["seed"] = str(record["seed"])  # 63-bit seeds do not fit a JS number
        if record["reasoning"] and len(record["reasoning"]) > 1500:
            record["reasoning"] = record["reasoning"][:1500] + " …"
    return _script_json(records)


@dataclass(frozen=True)
class Section:
    """A section a layer above adds to the report (e.g. `muestra eval`'s accuracies):
    a title, notes, and tables of plain values (escaped here)."""

    title: str
    tables: list[tuple[list[str], list[list[Any]]]]
    notes: list[str] = dataclass_field(default_factory=list)

    def html(self) -> str:
        out = [f"<h2>{_e(self.title)}</h2>"]
        out += [f'<p class="note">{_e(note)}</p>' for note in self.notes]
        out += [_table(headers, rows) for headers, rows in self.tables]
        return "".join(out)


def reward_section(rewards: Any) -> list[Section]:
    """The run's rewards (`muestra reward score`) as a report section, if it has any."""
    if rewards is None:
        return []
    cells = [
        [c.prompt, c.model, c.condition, c.n, f"{c.mean:.3f}", f"[{c.low:.3f}, {c.high:.3f}]"]
        for c in rewards.cells
    ]
    diffs = [
        [d.by, d.prompt, d.a, d.b, f"{d.difference:+.3f}", f"[{d.low:+.3f}, {d.high:+.3f}]",
         f"{d.p_value:.3g}", f"{d.p_holm:.3g}"]
        for d in rewards.differences
    ]  # fmt: skip
    tables = [(["prompt", "model", "condition", "n", "mean reward", "95% interval"], cells)]
    if diffs:
        tables.append((["by", "prompt", "a", "b", "a − b", "95% interval", "p", "p Holm"], diffs))
    note = f"Reward model {rewards.reward_model}; bootstrap intervals, Welch t-tests, Holm."
    return [Section("Rewards", tables, [note])]


def render(
    run: dict[str, Any],
    models: list[dict[str, Any]],
    frame: pd.DataFrame,
    analysis: Analysis,
    per_cell: int = 50,
    sections: list[Section] | None = None,
) -> str:
    from muestra.analysis import categorical_fields, numeric_fields

    valid = frame[frame["error"].isna()] if len(frame) else frame
    out = [
        f'<!doctype html><html lang="es"><head><meta charset="utf-8"><title>'
        f"muestra · {_e(run['name'])}</title><style>{STYLE}</style></head><body>"
    ]
    out.append(
        f'<h1>{_e(run["name"])}</h1><p class="note">spec {_e(run["spec_path"])} '
        f"(sha256 {_e(run['spec_hash'][:12])}) · run {_e(run['created_at'])} · muestra "
        f"{_e(run['muestra_version'])} · {analysis.valid} valid of {analysis.samples} "
        "samples</p>"
        + (
            f'<p class="finding">Not finished: {_e(run["unfinished"])}</p>'
            if run.get("unfinished")
            else ""
        )
        + "".join(f'<p class="note">note: {_e(note)}</p>' for note in analysis.notes)
        + "<h2>Models</h2>"
    )
    out.append(
        _table(
            ["label", "model", "revision", "weights sha256", "kit preset"],
            [
                [
                    m["label"],
                    m["model_ref"],
                    m.get("revision") or "—",
                    (m.get("weights_sha256") or "—")[:16],
                    m.get("kit_preset") or "—",
                ]
                for m in models
            ],
        )
    )
    for m in models:
        preset = m.get("kit_preset")
        if has_random_weights(preset):
            out.append(
                f'<p class="finding">{_e(m["label"])} is the offline kit model {_e(preset)}, '
                "with RANDOM weights: its numbers are meaningless.</p>"
            )
        elif preset in PRESETS:
            real = PRESETS[preset]
            out.append(
                f'<p class="note">{_e(m["label"])} is the kit model {_e(preset)}: real trained '
                f"weights, {_e(real.summary)}</p>"
            )
    rates = [
        [
            p,
            len(rows),
            int(rows["error"].isna().sum()),
            f"{rows['budget_hit'].mean():.0%}",
            f"{rows['error'].notna().mean():.0%}",
        ]
        for p, rows in frame.groupby("prompt_id", sort=False)
    ]
    out += [section.html() for section in sections or []]
    out.append("<h2>Budget and errors</h2>")
    out.append(_table(["prompt", "samples", "valid", "budget hit", "errors"], rates, "rates"))
    out.append(f"<h2>Findings (α = {analysis.alpha}, Holm)</h2>")
    out += [f'<p class="finding">{_e(s)}</p>' for s in analysis.findings] or [
        "<p>No significant finding after adjustment.</p>"
    ]
    out.append(
        _table(
            ["field", "by", "method", "statistic", "dof", "effect", "p", "p Holm", "p BH"],
            [
                [
                    t.field,
                    t.by,
                    t.method,
                    f"{t.statistic:.3g}",
                    t.dof,
                    f"{t.cramers_v:.2f}",
                    f"{t.p_value:.3g}",
                    f"{t.p_holm:.3g}",
                    f"{t.p_bh:.3g}",
                ]
                for t in analysis.tests
            ],
            "tests",
        )
    )
    out.append(_fits(analysis))
    out.append(
        '<h2>Answers per prompt</h2><p class="note">Bars: share of valid samples; '
        "whiskers: Wilson 95% intervals.</p>"
    )
    for field in categorical_fields(valid):
        out.append(f"<h3>{_e(field)}</h3>{_bars(analysis, field)}")
    if analysis.pooled:
        out.append(
            '<h2>Pooled over prompts</h2><p class="note">Share of each value over all the '
            "prompts of a condition or model; 95% interval from a two-stage prompt-level "
            "cluster bootstrap (prompts, then samples), so it reflects how much prompts "
            "differ, not only how many samples there are.</p>"
        )
        out.append(
            _table(
                ["field", "by", "level", "value", "share", "95% interval", "prompts", "n"],
                [
                    [
                        p.field,
                        p.by,
                        p.level,
                        p.value,
                        f"{p.share:.2f}",
                        f"[{p.low:.2f}, {p.high:.2f}]",
                        p.prompts,
                        p.n,
                    ]
                    for p in analysis.pooled
                ],
                "pooled",
            )
        )
    if analysis.comparisons:
        out.append(
            '<h2>Paired comparisons</h2><p class="note">Difference in share between two '
            "conditions or models, averaged over the prompts both ran (each prompt weighs "
            "the same); 95% paired cluster-bootstrap interval. Red: the interval excludes "
            "0.</p>"
        )
        out.append(_forest(analysis))
        out.append(
            _table(
                [
                    "field",
                    "by",
                    "value",
                    "a",
                    "b",
                    "share a",
                    "share b",
                    "a − b",
                    "95% interval",
                    "prompts",
                ],
                [
                    [
                        c.field,
                        c.by,
                        c.value,
                        c.a,
                        c.b,
                        f"{c.share_a:.2f}",
                        f"{c.share_b:.2f}",
                        f"{c.difference:+.2f}",
                        f"[{c.low:+.2f}, {c.high:+.2f}]",
                        c.prompts,
                    ]
                    for c in analysis.comparisons
                ],
                "comparisons",
            )
        )
    numeric = numeric_fields(valid)
    if numeric:
        out.append("<h2>Numeric fields</h2>")
        for field in numeric:
            out.append(f"<h3>{_e(field)}</h3>{_histogram(valid, field)}")
    if analysis.counterfactuals:
        out.append("<h2>Counterfactual pairs</h2>")
        out.append(
            _table(
                [
                    "group",
                    "condition",
                    "model",
                    "field",
                    "value",
                    "a",
                    "b",
                    "share a",
                    "share b",
                    "a − b",
                    "95% interval",
                    "flip rate",
                ],
                [
                    [
                        c.group,
                        c.condition,
                        c.model,
                        c.field,
                        c.value,
                        c.variant_a,
                        c.variant_b,
                        f"{c.proportion_a:.2f}",
                        f"{c.proportion_b:.2f}",
                        f"{c.difference:+.2f}",
                        f"[{c.low:+.2f}, {c.high:+.2f}]",
                        f"{c.flip_rate:.2f}",
                    ]
                    for c in analysis.counterfactuals
                ],
            )
        )
    if analysis.field_probs:
        out.append(
            '<h2>Answer probabilities (field_probs)</h2><p class="note">Mean probability '
            "the model gave each value at the decision point (bootstrap 95% interval), next "
            "to the share of sampled answers; “× narrower” compares the interval widths.</p>"
        )
        out.append(
            _table(
                [
                    "field",
                    "prompt",
                    "value",
                    "mean probability",
                    "95% interval",
                    "sampled share",
                    "× narrower",
                ],
                [
                    [
                        f.field,
                        f.group,
                        f.value,
                        f"{f.mean_probability:.3f}",
                        f"[{f.low:.3f}, {f.high:.3f}]",
                        f"{f.sampled_share:.2f}",
                        f"{f.narrower:.1f}",
                    ]
                    for f in analysis.field_probs
                ],
                "field-probs",
            )
        )
    if analysis.mentions:
        out.append(
            '<h2>Reasoning traces</h2><p class="note">Share of reasoning traces that '
            "mention each term (regular expressions from <code>[analysis] terms</code>, "
            "Spanish and English gender words by default), Wilson 95% intervals.</p>"
        )
        out.append(
            _table(
                ["term", "prompt", "condition", "traces", "share", "95% interval"],
                [
                    [
                        m.term,
                        m.group,
                        m.condition,
                        m.n,
                        f"{m.share:.2f}",
                        f"[{m.low:.2f}, {m.high:.2f}]",
                    ]
                    for m in analysis.mentions
                ],
                "mentions",
            )
        )
    out.append(
        f'<h2>Samples</h2><p class="note"><span id="browser-count"></span> samples '
        f"embedded (at most {per_cell} per prompt × condition × model).</p>"
        '<div class="pair"><div><select id="pick-a"></select><div id="sample-a"></div>'
        '</div><div><select id="pick-b"></select><div id="sample-b"></div></div></div>'
    )
    out.append(
        f'<script id="samples-data" type="application/json">{_browser_data(frame, per_cell)}'
        f"</script><script>{SCRIPT}</script></body></html>"
    )
    return "".join(out)
