"""`muestra analyze`: tests, adjusted p-values and plain sentences from a store."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from muestra.cli.common import JsonOption, print_json, stdout


def register(app: typer.Typer) -> None:
    app.command("analyze")(analyze)
    app.command("report")(report)


def load_analysis(store: Path, alpha: float | None, run_id: int | None = None):  # noqa: ANN202
    """(run row, models, samples frame, Analysis) of run `run_id` (default: the latest)
    in `store`; a warning on stderr when the run is unfinished."""
    from muestra.cli.common import stderr
    from muestra.evaluation.runs import stored_analysis

    found = stored_analysis(store, alpha, run_id)
    if found.run["unfinished"]:
        stderr.print(f"[bold yellow]warning:[/] {found.run['unfinished']}", highlight=False)
    return found.run, found.models, found.frame, found.analysis


def analyze(
    store: Path = typer.Argument(..., help="SQLite store written by `muestra run`."),
    alpha: float | None = typer.Option(
        None, "--alpha", min=0.0, max=1.0, help="Significance level (default: the spec's, 0.05)."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Is each answer field independent of the prompt, condition and model? χ² tests
    (Monte-Carlo when counts are small; stratified by prompt when a condition or model is
    compared) with Cramér's V; is each field skewed away from the reference distribution
    (uniform unless `[analysis.reference]` gives one) in each prompt × condition × model
    cell? exact binomial or χ² (Monte-Carlo when counts are small) goodness-of-fit tests;
    Holm and Benjamini–Hochberg adjusted p-values over all those tests (a spec's paired
    variants compared, the headline, as a family of their own), one sentence per
    significant finding, Wilson intervals per value, distance to the
    reference distribution, shares pooled over prompts and condition/model differences
    paired over prompts (prompt-level cluster bootstrap), counterfactual pairs,
    field_probs and term mentions in the reasoning. A run made by `muestra probe` gets the
    probe's analysis instead: group differences within templates, phrases, typical words."""
    probe_run = _probe_run(store)
    if probe_run is not None:  # a `muestra probe` run: its own analysis
        from muestra.cli.probe_cmd import show

        show(store, probe_run, as_json, alpha)
        return
    run, _, _, result = load_analysis(store, alpha)
    if as_json:
        print_json({"run_status": run["run_status"], **result.as_dict(), "stops": run["stops"]})
        return
    print_analysis(result)
    print_stops(run["stops"])


def print_stops(stops: dict) -> None:
    """Where each cell of a sequential run stopped (nothing for a fixed-n run)."""
    from muestra.experiments.stopping import STOP_HEADERS, stop_table

    _table("where each cell stopped", STOP_HEADERS, stop_table(stops["cells"]), left=6)


def _probe_run(store: Path) -> int | None:
    """The latest run's id when `muestra probe` made it, else None."""
    from muestra.evaluation.probes import probe_of_run
    from muestra.experiments.store import latest_run, reading

    with reading(store) as db:
        run_id = int(latest_run(db)["id"])
        return run_id if probe_of_run(db, run_id) is not None else None


def print_analysis(result) -> None:  # noqa: ANN001
    """An `Analysis` as `muestra analyze` prints it: its tests and findings, then its
    estimates."""
    stdout.print(f"{result.valid} valid of {result.samples} samples")
    for note in result.notes:
        stdout.print(f"note: {note}", markup=False)
    _print_tests(result)
    _print_estimates(result)


def _print_tests(result) -> None:  # noqa: ANN001
    """The independence and goodness-of-fit tests, and a sentence per finding."""
    _table(
        "independence tests",
        ["field", "by", "method", "statistic", "dof", "Cramér's V", "p", "p Holm", "p BH"],
        [
            [t.field, t.by, t.method, f"{t.statistic:.2f}", t.dof, f"{t.cramers_v:.2f}",
             f"{t.p_value:.3g}", f"{t.p_holm:.3g}", f"{t.p_bh:.3g}"]
            for t in result.tests
        ],
        left=3,
    )  # fmt: skip
    # condition and model columns only when they vary: the table must fit a terminal
    cells = [c for c in ("condition", "model") if len({getattr(f, c) for f in result.fits}) > 1]
    _table(
        "goodness of fit to the reference (most over-represented value per cell)",
        ["field", "prompt", *cells, "value", "n", "share [95% CI]", "ref", "test", "p", "p Holm"],
        [
            [f.field, f.prompt, *(getattr(f, c) for c in cells), f.value, f.n,
             f"{f.share:.2f} [{f.low:.2f}, {f.high:.2f}]", f"{f.reference:.2f}", f.method,
             f"{f.p_value:.3g}", f"{f.p_holm:.3g}"]
            for f in result.fits
        ],
        left=3 + len(cells),
    )  # fmt: skip
    for sentence in result.findings:
        stdout.print(f"• {sentence}", markup=False)
    for sentence in result.other_findings:
        stdout.print(f"  also significant: {sentence}", markup=False)
    if not result.findings:
        stdout.print(f"no significant finding at α = {result.alpha} after Holm adjustment")


def _print_estimates(result) -> None:  # noqa: ANN001
    """Shares, numeric fields, field_probs, mentions, pooled and paired estimates, rewards
    and counterfactual pairs, each with its interval."""
    _table(
        "free-text fields (not tested as categories)",
        ["field", "prompt", "n", "mean length", "distinct", "most frequent", "top words"],
        [
            [t.field, t.group, t.n, f"{t.mean_chars:.0f}", f"{t.distinct_share:.0%}",
             t.top_answers, t.top_words]
            for t in result.text
        ],
    )  # fmt: skip
    _table(
        "proportions with Wilson 95% intervals",
        ["field", "prompt", "n", "value", "share", "95% interval", "TV to ref"],
        [
            [d.field, d.group, d.n, v.value, f"{v.proportion:.2f}",
             f"[{v.low:.2f}, {v.high:.2f}]", f"{d.total_variation:.2f}"]
            for d in result.distributions
            for v in d.values
        ],
    )  # fmt: skip
    _table(
        "numeric fields (bootstrap 95% intervals)",
        ["field", "prompt", "n", "mean", "interval", "median", "interval"],
        [
            [n.field, n.group, n.n, f"{n.mean:.3g}", f"[{n.mean_low:.3g}, {n.mean_high:.3g}]",
             f"{n.median:.3g}", f"[{n.median_low:.3g}, {n.median_high:.3g}]"]
            for n in result.numeric
        ],
    )  # fmt: skip
    _table(
        "field_probs: mean probability per value vs counting draws",
        ["field", "prompt", "value", "mean prob", "95% interval", "drawn share", "× narrower"],
        [
            [f.field, f.group, f.value, f"{f.mean_probability:.3f}",
             "exact" if f.low is None else f"[{f.low:.3f}, {f.high:.3f}]",
             f"{f.sampled_share:.2f}", "—" if f.narrower is None else f"{f.narrower:.1f}"]
            for f in result.field_probs
        ],
    )  # fmt: skip
    _table(
        "reasoning traces that mention each term",
        ["term", "prompt", "condition", "n", "share", "95% interval"],
        [
            [m.term, m.group, m.condition, m.n, f"{m.share:.2f}", f"[{m.low:.2f}, {m.high:.2f}]"]
            for m in result.mentions
        ],
    )
    _table(
        "pooled over prompts (prompt-level cluster bootstrap 95% intervals)",
        ["field", "by", "level", "value", "share", "interval", "prompts", "n"],
        [
            [p.field, p.by, p.level, p.value, f"{p.share:.2f}", f"[{p.low:.2f}, {p.high:.2f}]",
             p.prompts, p.n]
            for p in result.pooled
        ],
    )  # fmt: skip
    _table(
        "paired over prompts: a − b (cluster bootstrap 95% interval)",
        ["field", "by", "value", "a", "b", "share a", "share b", "a − b", "interval"],
        [
            [c.field, c.by, c.value, c.a, c.b, f"{c.share_a:.2f}", f"{c.share_b:.2f}",
             f"{c.difference:+.2f}", f"[{c.low:+.2f}, {c.high:+.2f}]"]
            for c in result.comparisons
        ],
    )  # fmt: skip
    _print_rewards(result.rewards)
    _table(
        "counterfactual pairs (a − b, Newcombe 95% interval)",
        ["group", "condition", "model", "field", "value", "a", "b", "a − b", "interval",
         "flip rate", "by chance"],
        [
            [c.group, c.condition, c.model, c.field, c.value, c.variant_a, c.variant_b,
             f"{c.difference:+.2f}", f"[{c.low:+.2f}, {c.high:+.2f}]", _rate(c.flip_rate),
             _rate(c.chance_flip_rate) + (" (exact)" if c.chance_from == "field_probs" else "")]
            for c in result.counterfactuals
        ],
    )  # fmt: skip


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _print_rewards(rewards) -> None:  # noqa: ANN001
    if rewards is None:
        return
    _table(
        f"reward ({rewards.reward_model}): mean per cell, bootstrap 95% interval",
        ["prompt", "model", "condition", "n", "mean", "interval", "sd"],
        [
            [c.prompt, c.model, c.condition, c.n, f"{c.mean:.3f}",
             f"[{c.low:.3f}, {c.high:.3f}]", f"{c.sd:.3f}"]
            for c in rewards.cells
        ],
        left=3,
    )  # fmt: skip
    _table(
        "reward differences inside each prompt: a − b (bootstrap 95% interval, Welch t)",
        ["by", "prompt", "a", "b", "a − b", "interval", "p", "p Holm"],
        [
            [d.by, d.prompt, d.a, d.b, f"{d.difference:+.3f}",
             f"[{d.low:+.3f}, {d.high:+.3f}]", f"{d.p_value:.3g}", f"{d.p_holm:.3g}"]
            for d in rewards.differences
        ],
        left=4,
    )  # fmt: skip


def _table(title: str, columns: list[str], rows: list[list[object]], left: int = 0) -> None:
    """Print a Rich table (nothing when there are no rows); the first `left` columns are
    left-aligned and the rest right-aligned when `left` is given."""
    if not rows:
        return
    table = Table(title=title)
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if not left or index < left else "right")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    stdout.print(table)


def report(
    store: Path = typer.Argument(..., help="SQLite store written by `muestra run`."),
    out: Path = typer.Option(..., "-o", "--output", help="HTML file to write."),
    alpha: float | None = typer.Option(None, "--alpha", min=0.0, max=1.0),
    per_cell: int = typer.Option(
        50, "--samples-per-cell", min=1, help="Samples embedded per prompt × condition × model."
    ),
) -> None:
    """Write one self-contained HTML report (works offline): provenance, rates, tests and
    findings, charts with intervals, counterfactual pairs and a side-by-side sample browser."""
    from muestra.cli.common import stderr
    from muestra.errors import InputError
    from muestra.evaluation.summary import report_sections
    from muestra.report.html import render

    run, models, frame, result = load_analysis(store, alpha)
    from muestra.evaluation.probes import probe_sections
    from muestra.experiments.stopping import stop_section
    from muestra.report.html import reward_section

    # the run's probe results and rewards, and the store's `muestra eval` runs, if any
    sections = [
        *probe_sections(store, int(run["id"]), alpha),
        *reward_section(result.rewards),
        *stop_section(run["stops"]),
        *report_sections(store),
    ]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render(run, models, frame, result, per_cell, sections), "utf-8")
    except OSError as err:
        raise InputError(f"cannot write {out}: {err}") from err
    stderr.print(f"report → {out} ({out.stat().st_size / 1024:.0f} KiB)", markup=False)
