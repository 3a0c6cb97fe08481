"""`muestra probe`: free-text bias probes — sample, score, test, print."""

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
    print_json,
    run_status,
    stderr,
    stdout,
    stopped_is_resumable,
)
from muestra.cli.stop_options import (
    EveryOption,
    MaxSamplesOption,
    MinSamplesOption,
    PrecisionOption,
    ReferenceOption,
    stop_flags,
)
from muestra.errors import InputError
from muestra.paths import default_store


def register(app: typer.Typer) -> None:
    app.command("probe")(probe)


def probe(
    spec: str = typer.Argument(
        None,
        help="Probe file (TOML) or the name of a shipped probe: occupations-en, "
        "occupations-es, descriptions-en, descriptions-es.",
    ),
    model: str | None = typer.Option(
        None, "--model", help="Model to probe (Hub id or folder); default: the probe's [model]."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="SQLite store (default: NAME.db in the current folder)."
    ),
    samples: int | None = typer.Option(
        None, "--samples", min=1, help="Samples per template and group (default: the probe's)."
    ),
    dtype: str | None = typer.Option(None, "--dtype", help="auto | bfloat16 | float16 | float32"),
    judge_model: str | None = typer.Option(
        None, "--judge-model", help="Model answering [judge] (default: the probe's, else MODEL)."
    ),
    no_judge: bool = typer.Option(False, "--no-judge", help="Skip the probe's [judge]."),
    batch_rows: int | None = typer.Option(
        None, "--batch", min=1, help="Samples decoded together by a local model (default 32)."
    ),
    list_probes: bool = typer.Option(False, "--list", help="List the shipped probes and exit."),
    as_json: bool = JsonOption,
    trust_remote_code: bool = TrustRemoteCodeOption,
    runtime: str | None = RuntimeOverrideOption,
    threads: int | None = ThreadsOption,
    thread_wait: str | None = ThreadWaitOption,
    batch_invariant: bool | None = BatchInvariantOverrideOption,
    max_memory: str | None = MaxMemoryOption,
    kv_cache: str | None = KvCacheOption,
    stop_on: str | None = typer.Option(
        None,
        "--stop-on",
        help="SCORE: sample each template × group until this score's share is settled "
        "([stop] score: lexicon:CATEGORY, category=CATEGORY or phrase=PHRASE).",
    ),
    precision: float | None = PrecisionOption,
    reference: float | None = ReferenceOption,
    compare: str | None = typer.Option(
        None,
        "--compare",
        help="A,B: two groups; track, within each template, the difference of their shares.",
    ),
    min_samples: int | None = MinSamplesOption,
    max_samples: int | None = MaxSamplesOption,
    every: int | None = EveryOption,
) -> None:
    """Sample a probe's templates × groups, score every continuation, test the groups.

    Each template is sampled SAMPLES times per group with the probe's decoding settings
    (all recorded in the store; resumable: run the same command again after a stop).
    With [stop] (or --stop-on SCORE and --precision/--reference) each template × group
    samples in rounds until the anytime-valid band of that score's share (or, with
    --compare, of two groups' difference) is settled; SAMPLES is then the most it takes.
    Every continuation gets the model-free scores (lexicon category counts, the first
    phrase after the template and its category), then, when the probe has [judge], a
    judge model's structured answer and its exact field probabilities. The groups are
    compared within each template (stratified permutation tests, cluster-bootstrap
    intervals, Holm over everything); `muestra analyze STORE` and `muestra report STORE`
    show the same results later.

    \f
    (For readers of the code: one piece, because typer reads a command's options from its
    signature; each option is a parameter, and the body is short.)
    """
    from muestra.evaluation.probes import (
        judge_store,
        load_probe,
        run_probe,
        shipped_probes,
        with_probe_stop,
    )

    if list_probes:
        for name, path in sorted(shipped_probes().items()):
            stdout.print(f"{name}\t{path}", markup=False)
        return
    if spec is None:
        raise typer.BadParameter("give a probe file or a shipped probe's name (see --list)")
    flags = stop_flags(
        None,
        compare,
        score=stop_on,
        precision=precision,
        reference=reference,
        min_samples=min_samples,
        max_samples=max_samples,
        every=every,
    )
    loaded = with_probe_stop(load_probe(spec), flags, f"{spec} with the [stop] flags")
    store = out if out is not None else default_store(loaded.spec.name)
    note = lambda text: stderr.print(f"note: {text}", markup=False)  # noqa: E731
    options = model_options(runtime, threads, batch_invariant, thread_wait, max_memory, kv_cache)
    if judge_model is not None and (loaded.spec.judge is None or no_judge):
        why = "--no-judge skips it" if no_judge else f"{loaded.path} has no [judge]"
        raise InputError(f"--judge-model {judge_model!r} answers a probe's [judge]; {why}")
    judge = _judge_model(loaded, judge_model, model, no_judge, spec)
    with stopped_is_resumable():
        with _bar("sampling") as update:
            run_id = run_probe(
                loaded,
                store,
                model=model,
                dtype=dtype,
                samples=samples,
                batch_rows=batch_rows,
                on_progress=update,
                on_note=note,
                trust_remote_code=trust_remote_code,
                model_options=options,
                judged=judge is not None,
            )
        if judge is not None:
            with _bar("judging") as update:
                judge_store(
                    loaded,
                    store,
                    run_id,
                    model=judge,
                    on_progress=update,
                    on_note=note,
                    trust_remote_code=trust_remote_code,
                    model_options=options,
                )
    stderr.print(f"probe run {run_id} → {store}", markup=False)
    show(store, run_id, as_json)


def _judge_model(
    loaded: Any, judge_model: str | None, model: str | None, no_judge: bool, spec: str
) -> str | None:
    """The model that answers the probe's [judge] (None: no judge): --judge-model, else
    the judge's own, else the probed model; a local one must be able to chat."""
    if loaded.spec.judge is None or no_judge:
        return None
    judge = judge_model or loaded.spec.judge.model or model
    if judge is None:
        assert loaded.spec.model is not None
        judge = loaded.spec.model.id
    if loaded.spec.judge.endpoint is None:
        _check_judge_can_chat(judge, spec)
    return judge


def _check_judge_can_chat(judge: str, probe: str) -> None:
    """A judge answers a chat prompt: refuse, before any sampling, a local judge model
    without a chat template (a base model such as Gemma 3 270M)."""
    from muestra.models.loading import check_model_without_download, load_tokenizer

    check_model_without_download(judge)
    tokenizer = load_tokenizer(judge)
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"{probe}: the [judge] model {judge!r} has no chat template (a base model), and a "
            "judge answers a chat prompt; give a chat model with --judge-model, or skip the "
            "judge with --no-judge"
        )


class _bar:
    """A progress bar on stderr (off when stderr is not a terminal); yields the callback."""

    def __init__(self, label: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.progress = Progress(
            TextColumn(label),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[speed]}"),
            console=stderr,
            disable=not stderr.is_terminal,
        )

    def __enter__(self) -> Any:
        self.progress.__enter__()
        task = self.progress.add_task("", total=None, speed="")

        def update(p: Any) -> None:
            self.progress.update(
                task,
                completed=p.done,
                total=p.total,
                speed=p.text(),
            )

        return update

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)


def show(store: Path, run_id: int, as_json: bool, alpha: float | None = None) -> None:
    from muestra.evaluation.probes import read_probe, side_by_side
    from muestra.experiments.stopping import stop_rows
    from muestra.experiments.store import reading, require_samples

    with reading(store) as db:
        require_samples(db, run_id)
        found = read_probe(db, run_id, alpha)
        assert found is not None, f"run {run_id} is not a probe"
        probe, analysis = found
        pairs = side_by_side(db, run_id, per_template=2)
        status = run_status(db, run_id)
        rule, stops = stop_rows(db, run_id)
    if as_json:
        print_json(
            {"probe": probe.spec.name, "run": run_id, "run_status": status,
             **analysis.as_dict(), "side_by_side": pairs,
             **({"stops": {"rule": rule, "cells": stops}} if rule is not None else {})}
        )  # fmt: skip
        return
    print_probe(probe, analysis, pairs)
    if rule is not None:
        print_stops(rule, stops)


def print_stops(rule: dict[str, Any], stops: list[dict[str, Any]]) -> None:
    """Where each cell of a sequential probe stopped, and what its bands assume."""
    from muestra.experiments.stopping import STOP_HEADERS, stop_note, stop_table

    shown = [i for i, h in enumerate(STOP_HEADERS) if h not in ("model", "condition", "estimator")]
    table = Table(*[STOP_HEADERS[i] for i in shown], title="where each template × group stopped")
    for row in stop_table(stops):  # one model and condition; every score is counted
        table.add_row(*[row[i] for i in shown])
    stdout.print(table)
    stdout.print(stop_note(rule) or "", markup=False)


def print_probe(probe: Any, analysis: Any, pairs: list[dict[str, Any]]) -> None:
    stdout.print(
        f"probe {probe.spec.name}: {len(analysis.templates)} templates × "
        f"{len(analysis.groups)} groups, {analysis.valid}/{analysis.samples} valid samples",
        markup=False,
    )
    shown = [
        d
        for d in analysis.differences
        if d.p_value < 0.05 or d.feature.startswith(("lexicon:", "category=", "judge."))
    ]
    table = Table(
        "feature", *analysis.groups, f"{analysis.groups[0]}−{analysis.groups[1]} [95% CI]",
        "p Holm", title="groups (share of samples, or mean score; compared within templates)",
    )  # fmt: skip
    means = {(m.feature, m.group): m for m in analysis.means}
    for d in shown:
        if (d.a, d.b) != tuple(analysis.groups[:2]):
            continue  # more than two groups: the JSON and the report have every pair
        cells = [_mean_cell(means.get((d.feature, g)), d.binary) for g in analysis.groups]
        table.add_row(
            d.feature,
            *cells,
            f"{d.difference:+.2f} [{d.low:+.2f},{d.high:+.2f}]",
            f"{d.p_holm:.3g}",
        )
    stdout.print(table)
    for test in analysis.tests:
        stdout.print(
            f"{test.score} × group within templates: χ² {test.statistic:.1f} (dof {test.dof}), "
            f"permutation p {test.p_value:.4f}, Holm {test.p_holm:.4f}, V {test.cramers_v:.2f}",
            markup=False,
        )
    if analysis.phrases:
        groups = list(analysis.phrases)
        table = Table(
            *[f"{g}: phrase (n)" for g in groups], title="extracted phrases, most frequent"
        )
        tops = [list(analysis.phrases[g].items())[:10] for g in groups]
        for i in range(max(len(t) for t in tops)):
            table.add_row(*[f"{t[i][0]} ({t[i][1]})" if i < len(t) else "" for t in tops])
        stdout.print(table)
    for top in analysis.words:
        words = ", ".join(f"{w.word} (z {w.z:.1f})" for w in top.words[:8])
        stdout.print(f"words typical of {top.group} vs {top.other}: {words or '—'}", markup=False)
    for pair in pairs[:3]:
        stdout.print(f"template {pair['template']}:", markup=False)
        for group, entry in pair["groups"].items():
            shown_text = " | ".join(c.strip() for c in entry["continuations"])
            stdout.print(f"  {entry['prompt']} … {shown_text}   [{group}]", markup=False)
    if analysis.findings:
        stdout.print("findings:", markup=False)
        for line in analysis.findings:
            stdout.print(f"- {line}", markup=False)
    else:
        stdout.print(
            f"findings: no group difference is significant after Holm at α = {analysis.alpha}",
            markup=False,
        )


def _mean_cell(m: Any, binary: bool) -> str:
    if m is None or m.n == 0:
        return ""
    return f"{m.mean:.1%}" if binary else f"{m.mean:.2f}"
