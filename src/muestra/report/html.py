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

The page is a header (the run and its models) and `Section`s (report/markup.py): the
ones a layer above adds (evaluations, a probe, rewards), then the analysis's own
(report/sections.py), then the sample browser. Stored text reaches the page only escaped
(`markup.escape`, `markup.script_json`).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from muestra.analysis import Analysis
from muestra.models.kit.presets import PRESETS, has_random_weights
from muestra.report import sections as analysis_sections
from muestra.report.markup import Section, escape, script_json

__all__ = ["Section", "render", "reward_section"]

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
    return script_json(records)


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
    """The report page of a run: its header, the `sections` a layer above adds, the
    analysis's sections, and a browser of at most `per_cell` samples per cell."""
    page = [
        f'<!doctype html><html lang="{analysis.lang}"><head><meta charset="utf-8"><title>'
        f"muestra · {escape(run['name'])}</title><style>{STYLE}</style></head><body>",
        header(run, analysis),
        models_section(models).html(),
        *[section.html() for section in sections or []],
        analysis_sections.budget(frame).html(),
        *[section.html() for section in analysis_sections.analysis_sections(analysis, frame)],
        browser(frame, per_cell).html(),
        f'<script id="samples-data" type="application/json">{_browser_data(frame, per_cell)}'
        f"</script><script>{SCRIPT}</script></body></html>",
    ]
    return "".join(page)


def header(run: dict[str, Any], analysis: Analysis) -> str:
    """The run: its name, spec, version, how many samples are valid, and its notes."""
    unfinished = run.get("unfinished")
    return (
        f'<h1>{escape(run["name"])}</h1><p class="note">spec {escape(run["spec_path"])} '
        f"(sha256 {escape(run['spec_hash'][:12])}) · run {escape(run['created_at'])} · muestra "
        f"{escape(run['muestra_version'])} · {analysis.valid} valid of {analysis.samples} "
        "samples</p>"
        + (f'<p class="finding">Not finished: {escape(unfinished)}</p>' if unfinished else "")
        + "".join(f'<p class="note">note: {escape(note)}</p>' for note in analysis.notes)
    )


def models_section(models: list[dict[str, Any]]) -> Section:
    """The models and where their weights came from; a kit model's are named for what they
    are (random weights mean nothing; a real kit model is close to, not equal to, the Hub's)."""
    rows = [
        [
            m["label"],
            m["model_ref"],
            m.get("revision") or "—",
            (m.get("weights_sha256") or "—")[:16],
            m.get("kit_preset") or "—",
        ]
        for m in models
    ]
    said = []
    for m in models:
        preset = m.get("kit_preset")
        if has_random_weights(preset):
            said.append(
                f'<p class="finding">{escape(m["label"])} is the offline kit model '
                f"{escape(preset)}, with RANDOM weights: its numbers are meaningless.</p>"
            )
        elif preset in PRESETS:
            real = PRESETS[preset]
            said.append(
                f'<p class="note">{escape(m["label"])} is the kit model {escape(preset)}: real '
                f"trained weights, {escape(real.summary)}</p>"
            )
    headers = ["label", "model", "revision", "weights sha256", "kit preset"]
    return Section("Models", [(headers, rows)], after=said)


def browser(frame: pd.DataFrame, per_cell: int) -> Section:
    """Two samples side by side (their data follows in a script element)."""
    return Section(
        "Samples",
        blocks=[
            f'<p class="note"><span id="browser-count"></span> samples embedded (at most '
            f"{per_cell} per prompt × condition × model).</p>"
            '<div class="pair"><div><select id="pick-a"></select><div id="sample-a"></div>'
            '</div><div><select id="pick-b"></select><div id="sample-b"></div></div></div>'
        ],
    )
