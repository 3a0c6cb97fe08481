"""`muestra run`, `muestra summary`, `muestra export`: experiments from a TOML spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from muestra.cli.common import (
    BatchInvariantOverrideOption,
    JsonOption,
    KvCacheOption,
    MaxMemoryOption,
    RuntimeOverrideOption,
    ThreadsOption,
    ThreadWaitOption,
    TrustRemoteCodeOption,
    model_options,
    plural,
    print_json,
    stderr,
    stdout,
    stopped_is_resumable,
)
from muestra.cli.stop_options import (
    CompareOption,
    EstimatorOption,
    EveryOption,
    MaxSamplesOption,
    MinSamplesOption,
    PrecisionOption,
    ReferenceOption,
    StopOnOption,
    stop_flags,
)
from muestra.paths import default_store


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("summary")(summary)
    app.command("export")(export)


def run(
    spec: Path = typer.Argument(..., help="Experiment spec (TOML); see examples/personajes.toml."),
    out: Path | None = typer.Option(
        None, "--out", help="SQLite store (default: NAME.db beside the spec)."
    ),
    model: str | None = typer.Option(None, "--model", help="Run this model instead of the spec's."),
    samples: int | None = typer.Option(
        None, "--samples", min=1, help="Samples per prompt and condition."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the plan and a token estimate only."
    ),
    force_new: bool = typer.Option(
        False, "--force-new", help="Start a new run even if the spec changed."
    ),
    batch_rows: int | None = typer.Option(
        None, "--batch", min=1, help="Samples decoded together by a local model (default 32)."
    ),
    trust_remote_code: bool = TrustRemoteCodeOption,
    runtime: str | None = RuntimeOverrideOption,
    threads: int | None = ThreadsOption,
    thread_wait: str | None = ThreadWaitOption,
    batch_invariant: bool | None = BatchInvariantOverrideOption,
    max_memory: str | None = MaxMemoryOption,
    kv_cache: str | None = KvCacheOption,
    stop_on: str | None = StopOnOption,
    precision: float | None = PrecisionOption,
    reference: float | None = ReferenceOption,
    compare: str | None = CompareOption,
    min_samples: int | None = MinSamplesOption,
    max_samples: int | None = MaxSamplesOption,
    every: int | None = EveryOption,
    estimator: str | None = EstimatorOption,
) -> None:
    """Run an experiment: every model × condition × prompt × sample, resumable.

    Each finished batch is written to the store in one transaction. Stop it at any time
    (Ctrl-C); the same command resumes exactly where it stopped. With a [stop] table (or
    --stop-on and --precision/--reference) each cell samples in rounds until its answer
    is settled; `muestra summary` shows where each stopped.
    \f
    (For readers of the code: one piece, because typer reads a command's options from its
    signature; each option is a parameter, and the body is short.)
    """
    from muestra.experiments.runner import Runner
    from muestra.experiments.spec import load_spec
    from muestra.experiments.stopping import with_stop
    from muestra.experiments.store import scratch_copy

    loaded = load_spec(spec, check_models=model is None)
    flags = stop_flags(
        stop_on,
        compare,
        precision=precision,
        reference=reference,
        min_samples=min_samples,
        max_samples=max_samples,
        every=every,
        estimator=estimator,
    )
    loaded = with_stop(loaded, flags, f"{loaded.path} with the [stop] flags")
    store = out if out is not None else default_store(loaded.spec.name, beside=loaded.path)

    def runner_on(path: Path) -> Runner:
        return Runner(
            loaded,
            path,
            model=model,
            samples=samples,
            force_new=force_new,
            batch_rows=batch_rows,
            on_note=lambda text: stderr.print(f"note: {text}", markup=False),
            trust_remote_code=trust_remote_code,
            model_options=model_options(
                runtime, threads, batch_invariant, thread_wait, max_memory, kv_cache
            ),
        )

    if dry_run:  # planned on a scratch copy of the store: a dry run writes nothing
        with scratch_copy(store) as scratch:
            runner = runner_on(scratch)
            runner.open()
            try:
                _print_plan(runner, store, runner.plan(), every_unit=True)
            finally:
                runner.close()
        return
    with runner_on(store) as runner:  # closes the store (and its lock) however it ends
        runner.open()
        units = runner.plan()
        pending = _print_plan(runner, store, units, every_unit=False)
        if not pending:
            return
        _sample_with_progress(runner, pending, store)


def _sample_with_progress(runner: Any, pending: int, store: Path) -> None:
    """Run the plan with a progress bar on stderr (samples done of total, tok/s and time
    left at the recent rate, resident memory); Ctrl-C says what was kept (exit 130)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from muestra.engine.progress import peak_resident_bytes, size_text

    with Progress(
        TextColumn("sampling"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[speed]}"),
        console=stderr,
        disable=not stderr.is_terminal,
    ) as bar:
        task = bar.add_task("run", total=pending, speed="")

        def update(p) -> None:  # noqa: ANN001
            bar.update(task, completed=p.done, speed=p.text())

        with stopped_is_resumable():
            progress = runner.run(update)
    peak = peak_resident_bytes()
    memory = "" if peak is None else f", peak RSS {size_text(peak)}"
    stderr.print(
        f"done: {progress.done} {plural(progress.done, 'sample')}, {progress.tokens} tokens "
        f"in {progress.elapsed:.1f}s "
        f"({progress.tokens / max(progress.elapsed, 1e-9):.0f} tok/s, "
        f"{progress.done / max(progress.elapsed, 1e-9):.2f} samples/s{memory}) → {store}",
        markup=False,
    )


def _print_plan(runner, store: Path, units: list, every_unit: bool) -> int:  # noqa: ANN001
    """The run's size on stderr (and each unit's missing samples for a dry run or when
    nothing is missing); the number of samples to run."""
    loaded = runner.spec
    pending = sum(len(u.missing) for u in units)
    planned = (
        len(runner.models) * len(loaded.conditions) * len(loaded.spec.prompt.items) * runner.samples
    )
    stderr.print(
        f"{loaded.spec.name}: {len(runner.models)} model(s) × {len(loaded.conditions)} "
        f"condition(s) × {len(loaded.spec.prompt.items)} prompt(s) × {runner.samples} "
        f"{plural(runner.samples, 'sample')} = {planned}; {planned - pending} stored, {pending} "
        f"to run (~{runner.estimate_tokens(units):,} tokens at most) → {store}",
        markup=False,
    )
    stop = loaded.spec.stop
    if stop is not None:
        settles = " or ".join(
            f"{what} {value}"
            for what, value in (("within ±", stop.precision), ("excludes", stop.reference))
            if value is not None
        ).replace("± ", "±")
        stderr.print(
            f"sequential: each cell samples {stop.min_samples}, then {stop.every} a round, "
            f"until its band of {stop.field}={stop.value} is {settles} (at most "
            f"{runner.samples}); the count above is the most it can take",
            markup=False,
        )
    if every_unit or not pending:
        for unit in units:
            stderr.print(
                f"  {unit.model.name} | {unit.condition.label} | {unit.item.id}: "
                f"{len(unit.missing)} {plural(len(unit.missing), 'sample')}",
                markup=False,
            )
    return pending


def summary(
    store: Path = typer.Argument(..., help="SQLite store written by `muestra run`."),
    by: str = typer.Option("prompt", "--by", help="Group by prompt | model | condition."),
    field: str | None = typer.Option(None, "--field", help="Only this answer field."),
    as_json: bool = JsonOption,
) -> None:
    """Counts and proportions of each answer value (seed 000's value_counts), numeric fields
    described, mean field_probs, budget-hit and error rates, throughput. A free-text field
    (a string without enum in the run's schema; without one, more than 10 distinct values
    and no field_probs, as `muestra analyze` decides) shows its distinct count and top 5."""
    from muestra.cli.common import run_status
    from muestra.experiments.results import run_schema, samples_frame, summarize
    from muestra.experiments.stopping import field_probs_notes, stop_note, stop_rows
    from muestra.experiments.store import latest_run, reading, require_samples

    with reading(store) as db:
        run = latest_run(db)
        require_samples(db, run)
        frame = samples_frame(db, int(run["id"]))
        result = summarize(frame, by=by, field=field, schema=run_schema(run))
        status = run_status(db, run)
        rule, stops = stop_rows(db, int(run["id"]))
        notes = field_probs_notes(db, int(run["id"])) + [n for n in [stop_note(rule)] if n]
    if as_json:
        stopped = {"rule": rule, "cells": stops}
        print_json({"run": int(run["id"]), "run_status": status, **result, "stops": stopped})
        return
    for note in notes:
        stdout.print(f"note: {note}", markup=False)
    for name, group in result["groups"].items():
        stdout.rule(
            f"{result['by']} {name}: {group['valid']}/{group['samples']} valid, "
            f"budget hit {group['budget_hit_rate']:.0%}, errors {group['error_rate']:.0%}"
        )
        for column, stats in group["fields"].items():
            if stats["kind"] == "text":
                stdout.print(_text_table(column, stats))
                continue
            table = Table(title=column, title_justify="left")
            if stats["kind"] == "numeric":
                for k in ("n", "mean", "sd", "min", "max"):
                    table.add_column(k, justify="right")
                table.add_row(
                    *(
                        f"{stats[k]:.4g}" if k != "n" else str(stats[k])
                        for k in ("n", "mean", "sd", "min", "max")
                    )
                )
            else:
                table.add_column("value")
                table.add_column("count", justify="right")
                table.add_column("proportion", justify="right")
                probs = stats.get("mean_field_probs", {})
                if probs:
                    table.add_column("mean field_prob", justify="right")
                for value, count in stats["counts"].items():
                    cells = [value, str(count), f"{stats['proportions'][value]:.3f}"]
                    if probs:
                        cells.append(f"{probs.get(value, 0.0):.3f}")
                    table.add_row(*cells)
            stdout.print(table)
    if stops:
        from muestra.cli.analyze_cmd import print_stops

        print_stops({"rule": rule, "cells": stops})
    speed = result["throughput"]
    if speed["samples_per_s"]:
        stdout.print(
            f"throughput: {speed['samples_per_s']:.2f} samples/s, "
            f"{speed['tokens_per_s']:.0f} tokens/s"
        )


def _text_table(column: str, stats: dict) -> Table:
    """A free-text field: its number of distinct values, the most frequent, the rest."""
    top = stats["top"]
    table = Table(
        title=f"{column}: {stats['distinct']} distinct values, the {len(top)} most frequent",
        title_justify="left",
    )
    table.add_column("value")
    table.add_column("count", justify="right")
    table.add_column("proportion", justify="right")
    for entry in top:
        table.add_row(entry["value"], str(entry["count"]), f"{entry['proportion']:.3f}")
    rest = stats["n"] - sum(entry["count"] for entry in top)
    if rest:
        others = stats["distinct"] - len(top)
        table.add_row(f"({others} other values)", str(rest), f"{rest / stats['n']:.3f}")
    return table


def export(
    store: Path = typer.Argument(..., help="SQLite store written by `muestra run`."),
    fmt: str = typer.Option("csv", "--format", help="csv | parquet | jsonl"),
    out: Path = typer.Option(..., "-o", "--output", help="File to write."),
    run_id: int | None = typer.Option(
        None, "--run", help="Which run of the store (default: the latest, not a probe's judge)."
    ),
) -> None:
    """One row per sample, answer fields as columns, plus prompt, sample, condition, model,
    seed, reasoning, think_tokens, budget_hit, finish_reason, error, and each score as a
    `score.*` column (rewards, a probe's lexicon counts, phrase and judge answers)."""
    from muestra.cli.common import run_status
    from muestra.experiments.results import export as write
    from muestra.experiments.results import samples_frame
    from muestra.experiments.store import reading, require_samples, run_by_id

    with reading(store) as db:
        run = run_by_id(db, run_id)
        require_samples(db, run)
        frame = samples_frame(db, int(run["id"]))
        run_status(db, run)  # warns when the run is not finished
    path = write(frame, fmt, out)
    stderr.print(f"{len(frame)} rows → {path}", markup=False)
