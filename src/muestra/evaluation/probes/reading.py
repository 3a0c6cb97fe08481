"""A probe run read back from its store: its probe, its analysis, the tables shown."""

from __future__ import annotations

import json
import sqlite3
import tomllib
from pathlib import Path
from typing import Any

from muestra.analysis.probe_scores import CONTINUATION
from muestra.evaluation.probes.schema import Probe, ProbeSpec
from muestra.experiments.store import probe_record, sample_rows

# ---- reading -----------------------------------------------------------------------------


def probe_of_run(db: sqlite3.Connection, run_id: int) -> Probe | None:
    """The probe a run sampled (None: the run is not a probe)."""
    row = probe_record(db, run_id)
    if row is None:
        return None
    data = tomllib.loads(row["probe_text"])
    spec = ProbeSpec.model_validate(data)
    path = Path(row["probe_path"])
    lexicon: dict[str, list[str]] = {}  # the scores are stored: analysis needs no lexicon
    schema = spec.judge.schema_ if spec.judge and isinstance(spec.judge.schema_, dict) else None
    return Probe(path, row["probe_text"], spec, lexicon, schema)


def read_probe(
    db: sqlite3.Connection, run_id: int, alpha: float | None = None
) -> tuple[Probe, Any] | None:
    """(probe, `ProbeAnalysis`) of a probe run, None when the run is not a probe."""
    from muestra.analysis.probes import analyze_probe
    from muestra.experiments.results import samples_frame

    probe = probe_of_run(db, run_id)
    if probe is None:
        return None
    frame = samples_frame(db, run_id)
    analysis = analyze_probe(
        frame,
        alpha=alpha if alpha is not None else probe.spec.alpha,
        language=probe.spec.language,
        lemmas=probe.spec.lexicon.lemmas,
        examples=probe.examples(),
        top=probe.spec.words.top,
        prior_scale=probe.spec.words.prior_scale,
        ignore=probe.spec.words.ignore,
        seed=probe.spec.seed,
    )
    return probe, analysis


def side_by_side(
    db: sqlite3.Connection, run_id: int, per_template: int = 3
) -> list[dict[str, Any]]:
    """For each template, the first `per_template` continuations of every group."""
    rows = sample_rows(db, run_id, first=per_template, order="prompt")
    table: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = table.setdefault(row["group_name"], {"template": row["group_name"], "groups": {}})
        scores = json.loads(row["scores_json"]) if row["scores_json"] else {}
        text = scores.get(CONTINUATION, row["answer_text"])
        prompt = json.loads(row["variables_json"])["text"]
        entry["groups"].setdefault(row["variant"], {"prompt": prompt, "continuations": []})
        entry["groups"][row["variant"]]["continuations"].append(text)
    return list(table.values())


def probe_sections(store: Path, run_id: int, alpha: float | None = None) -> list[Any]:
    """A probe run's results as report sections (none when the run is not a probe): the
    groups compared, where each cell stopped (a sequential probe), the extracted phrases,
    the words typical of each group, and the continuations side by side."""
    from muestra.experiments.stopping import stop_rows, stop_section
    from muestra.experiments.store import reading

    with reading(store) as db:
        found = read_probe(db, run_id, alpha)
        if found is None:
            return []
        probe, analysis = found
        pairs = side_by_side(db, run_id, per_template=3)
        rule, stops = stop_rows(db, run_id)
    sections = [_groups_section(probe, analysis)]
    sections += stop_section({"rule": rule, "cells": stops})
    if analysis.phrases:
        sections.append(_phrases_section(analysis))
    if analysis.words:
        sections.append(_words_section(analysis))
    sections.append(_pairs_section(pairs))
    return sections


def _groups_section(probe: Probe, analysis: Any) -> Any:
    from muestra.report.html import Section

    means = {(m.feature, m.group): m for m in analysis.means}

    def cell(feature: str, group: str, binary: bool) -> str:
        m = means.get((feature, group))
        if m is None or m.n == 0:
            return ""
        shown = (lambda v: f"{v:.0%}") if binary else (lambda v: f"{v:.2f}")
        return f"{shown(m.mean)} [{shown(m.low)}, {shown(m.high)}]"

    rows = [
        [d.feature, *(cell(d.feature, g, d.binary) for g in analysis.groups),
         f"{d.a} − {d.b}: {d.difference:+.2f} [{d.low:+.2f}, {d.high:+.2f}]",
         f"{d.p_value:.3g}", f"{d.p_holm:.3g}", f"{d.p_bh:.3g}"]
        for d in analysis.differences
    ]  # fmt: skip
    notes = [
        f"Probe {probe.spec.name} ({probe.path}, sha256 {probe.hash[:12]}): "
        f"{len(analysis.templates)} templates × {len(analysis.groups)} groups, "
        f"{analysis.valid} valid of {analysis.samples} samples. Shares pooled over templates "
        "with cluster-bootstrap 95% intervals; differences inside each template, averaged "
        "over templates, stratified permutation p-values; Holm and BH over every test.",
        *(f"Finding: {line}" for line in analysis.findings),
    ]
    tables = [(["feature", *analysis.groups, "difference [95% CI]", "p", "p Holm", "p BH"], rows)]
    if analysis.tests:
        tables.append(
            (
                ["score", "test", "χ²", "dof", "Cramér's V", "p", "p Holm"],
                [
                    [t.score, t.method, f"{t.statistic:.1f}", t.dof, f"{t.cramers_v:.2f}",
                     f"{t.p_value:.3g}", f"{t.p_holm:.3g}"]
                    for t in analysis.tests
                ],
            )
        )  # fmt: skip
    return Section("Probe: groups compared within templates", tables, notes)


def _phrases_section(analysis: Any) -> Any:
    from muestra.report.html import Section

    groups = list(analysis.phrases)
    tops = [list(analysis.phrases[g].items())[:15] for g in groups]
    rows = [
        [f"{t[i][0]} ({t[i][1]})" if i < len(t) else "" for t in tops]
        for i in range(max(len(t) for t in tops))
    ]
    return Section("Probe: extracted phrases", [(groups, rows)], [])


def _words_section(analysis: Any) -> Any:
    from muestra.report.html import Section

    rows = [
        [t.group, t.other, w.word, w.count_a, w.count_b, f"{w.delta:+.2f}", f"{w.z:.2f}"]
        for t in analysis.words
        for w in t.words
    ]
    return Section(
        "Probe: words typical of each group",
        [(["group", "vs", "word", "n", "n other", "log-odds δ", "z"], rows)],
        ["Log-odds ratio with an informative Dirichlet prior (Monroe et al. 2008)."],
    )


def _pairs_section(pairs: list[dict[str, Any]]) -> Any:
    from muestra.report.html import Section

    rows = [
        [pair["template"], group, entry["prompt"],
         " ‖ ".join(c.strip() for c in entry["continuations"])]
        for pair in pairs
        for group, entry in pair["groups"].items()
    ]  # fmt: skip
    return Section(
        "Probe: continuations side by side",
        [(["template", "group", "prompt", "first continuations"], rows)],
        [],
    )
