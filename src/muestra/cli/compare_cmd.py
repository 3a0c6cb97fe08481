"""`muestra compare`: two models on the same work with the same seeds, side by side — a
question set (`--task`, scored as `muestra eval` scores it, with the same options), an
experiment spec (`--spec`) or a free-text probe (`--probe`) — with timings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from muestra.cli.common import (
    BatchInvariantOverrideOption,
    DtypeOption,
    JsonOption,
    ThreadsOption,
    ThreadWaitOption,
    TrustRemoteCodeOption,
    model_options,
    print_json,
    stdout,
)
from muestra.cli.eval_cmd import (
    TASK_HELP,
    FormatOption,
    LimitOption,
    SeedOption,
    ShotsOption,
    ThinkBudgetOption,
    method_option,
    note,
    print_pair,
    print_result,
)
from muestra.paths import default_store


def register(app: typer.Typer) -> None:
    app.command("compare")(compare)


def compare(
    ctx: typer.Context,
    model_a: str = typer.Argument(..., help="First model (Hub id or folder)."),
    model_b: str = typer.Argument(..., help="Second model."),
    task: str | None = typer.Option(None, "--task", help=f"{TASK_HELP} As for `eval`."),
    spec: Path | None = typer.Option(
        None, "--spec", help="An experiment spec (TOML) to run on both models instead."
    ),
    probe: str | None = typer.Option(
        None,
        "--probe",
        help="A free-text probe (file or shipped name, see `muestra probe --list`) to run on "
        "both models instead: each model's group differences and which model is more skewed.",
    ),
    method: str = method_option("loglik", " (--task only)."),
    fmt: str = FormatOption,
    shots: int = ShotsOption,
    limit: int | None = LimitOption,
    samples: int | None = typer.Option(
        None,
        "--samples",
        min=1,
        help="Samples per question (--task), prompt (--spec) or template and group (--probe).",
    ),
    think_budget: int = ThinkBudgetOption,
    seed: int = SeedOption,
    dtype: str = DtypeOption,
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Store (default: compare-TASK.db, compare-SPEC-NAME.db or compare-PROBE.db).",
    ),
    as_json: bool = JsonOption,
    trust_remote_code: bool = TrustRemoteCodeOption,
    runtime_a: str | None = typer.Option(
        None, "--runtime-a", help="MODEL_A's runtime (as --runtime: llamacpp | torch | auto)."
    ),
    runtime_b: str | None = typer.Option(
        None,
        "--runtime-b",
        help="MODEL_B's runtime. The same model twice with --runtime-a torch --runtime-b "
        "llamacpp compares fp32 torch with llama.cpp's quantized kernels.",
    ),
    threads: int | None = ThreadsOption,
    thread_wait: str | None = ThreadWaitOption,
    batch_invariant: bool | None = BatchInvariantOverrideOption,
) -> None:
    """Two models on the same work with the same seeds, side by side, as seed 002 compares
    distilgpt2 with gpt2: with --task, accuracies with the paired tests (McNemar exact,
    paired bootstrap) and each question's answers; with --spec, the experiment run on both
    (one run: `analyze` tests the model difference within each prompt) and the first
    output of every prompt next to each other. Both: timings on this machine (load time,
    weights in memory, prefill and decode tokens/s, decoding time). `muestra report`
    shows the --task comparison as a section of the HTML report."""
    _check_what(ctx, task, spec, probe)
    options = (
        model_options(runtime_a, threads, batch_invariant, thread_wait),
        model_options(runtime_b, threads, batch_invariant, thread_wait),
    )
    if spec is not None:
        _compare_spec(model_a, model_b, spec, out, samples, as_json, trust_remote_code, options)
    elif probe is not None:
        _compare_probe(model_a, model_b, probe, out, samples, as_json, trust_remote_code, options)
    else:
        assert task is not None
        settings = {
            "method": method, "format": fmt, "shots": shots, "limit": limit,
            "samples": samples, "think_budget": think_budget, "seed": seed, "dtype": dtype,
        }  # fmt: skip
        _compare_task(model_a, model_b, task, settings, out, as_json, trust_remote_code, options)


# the question-set options, which --spec and --probe do not take
TASK_ONLY = ("method", "fmt", "shots", "limit", "think_budget", "seed", "dtype")


def _check_what(ctx: typer.Context, task: Any, spec: Any, probe: Any) -> None:
    """One of --task, --spec and --probe; the question-set options with --task only."""
    from muestra.errors import InputError

    if sum(x is not None for x in (task, spec, probe)) != 1:
        raise InputError(
            "give exactly one of --task FILE (questions), --spec FILE (experiment) or "
            "--probe NAME (free-text probe)"
        )
    given = _changed(ctx, TASK_ONLY) if task is None else []
    if given:  # the question-set settings have nothing to apply to: refused by name
        raise InputError(
            f"{', '.join(given)} apply to --task only; a spec or a probe sets its own "
            "(its [decoding], seed and samples), and --runtime-a/-b choose how each "
            "model computes"
        )


def _changed(ctx: typer.Context, names: tuple[str, ...]) -> list[str]:
    """The flags of `names` given a value other than their default."""
    params = {p.name: p for p in ctx.command.params}
    return [params[n].opts[0] for n in names if ctx.params[n] != params[n].default]


def _compare_task(
    model_a: str,
    model_b: str,
    task: str,
    values: dict[str, Any],
    out: Path | None,
    as_json: bool,
    trust: bool,
    options: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    from muestra.evaluation.compare import compare_models
    from muestra.evaluation.evaluate import EvalSettings
    from muestra.evaluation.tasks import load_task

    settings = EvalSettings(**values)
    settings.check_applies({"samples": "--samples"})
    loaded_task = load_task(task)
    store = out if out is not None else default_store(loaded_task.name, "compare")
    report = compare_models(
        model_a, model_b, loaded_task, settings, store,
        trust_remote_code=trust, on_note=note, options=options,
    )  # fmt: skip
    if as_json:
        print_json(report.as_json())
        return
    for result in report.results:
        print_result(result, False)
    print_pair(report.comparison)
    _print_timings(report.timings)
    side = Table(title="the same questions, side by side", show_edge=False)
    for column in ("id", "answer", report.labels[0], report.labels[1]):
        side.add_column(column)
    for row in report.side_by_side:
        side.add_row(*row)
    stdout.print(side)


def _print_timings(timings: list[Any]) -> None:
    timing = Table(title="timings (this machine, this run)", show_edge=False)
    columns = ("model", "runtime", "load s", "weights MB", "prefill tok/s", "decode tok/s")
    for column in (*columns, "eval s"):
        timing.add_column(column)
    for t in timings:
        timing.add_row(
            t.model,
            t.runtime,
            f"{t.load_seconds:.2f}",
            f"{t.weights_mb:.0f}",
            f"{t.prefill_tps:.0f}",
            f"{t.decode_tps:.1f}",
            f"{t.eval_seconds:.1f}",
        )
    stdout.print(timing)


def _compare_spec(
    model_a: str,
    model_b: str,
    spec: Path,
    out: Path | None,
    samples: int | None,
    as_json: bool,
    trust: bool,
    options: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    from dataclasses import asdict

    from muestra.cli.analyze_cmd import load_analysis, print_analysis
    from muestra.cli.common import visible
    from muestra.evaluation.compare import compare_spec
    from muestra.experiments.spec import load_spec

    name = load_spec(spec, check_models=False).spec.name
    store = out if out is not None else default_store(name, "compare")
    result = compare_spec(
        model_a,
        model_b,
        spec,
        store,
        samples=samples,
        trust_remote_code=trust,
        on_note=note,
        options=options,
    )
    _, _, _, analysis = load_analysis(store, None, result.run_id)
    if as_json:
        print_json(
            {
                "models": list(result.labels),
                "store": str(store),
                "run_id": result.run_id,
                "analysis": analysis.as_dict(),
                "timings": [asdict(t) for t in result.timings],
                "side_by_side": [
                    dict(zip(("prompt", "a", "b"), row, strict=False))
                    for row in result.side_by_side
                ],
            }
        )
        return
    print_analysis(analysis)
    _print_timings(result.timings)
    side = Table(title="first sample of each prompt, side by side", show_edge=False)
    for column in ("prompt", result.labels[0], result.labels[1]):
        side.add_column(column)
    for prompt, a, b in result.side_by_side:
        side.add_row(prompt, visible(a[:160]), visible(b[:160]))
    stdout.print(side)


def _compare_probe(
    model_a: str,
    model_b: str,
    name: str,
    out: Path | None,
    samples: int | None,
    as_json: bool,
    trust: bool,
    options: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    from dataclasses import asdict

    from muestra.cli.probe_cmd import print_probe
    from muestra.evaluation.compare import compare_probe
    from muestra.evaluation.probes import load_probe

    probe = load_probe(name)
    store = out if out is not None else default_store(probe.spec.name, "compare")
    result = compare_probe(
        model_a, model_b, probe, store, samples=samples, trust_remote_code=trust,
        on_note=note, options=options,
    )  # fmt: skip
    if as_json:
        print_json(
            {
                "probe": probe.spec.name,
                "models": list(result.labels),
                "store": str(store),
                "runs": list(result.run_ids),
                "models_compared": result.comparison.as_dict(),
                "each_model": [a.as_dict() for a in result.analyses],
                "timings": [asdict(t) for t in result.timings],
            }
        )
        return
    for label, analysis in zip(result.labels, result.analyses, strict=True):
        stdout.print(f"\n== {label}", markup=False)
        print_probe(probe, analysis, [])
    comparison = result.comparison
    first, second = result.labels
    table = Table(
        "feature", "groups", f"gap A: {first}", f"gap B: {second}", "A − B [95% CI]",
        "p Holm", title="the two models' group gaps, within templates (A − B of a − b)",
    )  # fmt: skip
    for g in comparison.gaps:
        if g.p_value < 0.05 or g.feature.startswith(("lexicon:", "category=", "judge.")):
            table.add_row(
                g.feature, f"{g.a} − {g.b}", f"{g.gap_first:+.2f}", f"{g.gap_second:+.2f}",
                f"{g.difference:+.2f} [{g.low:+.2f},{g.high:+.2f}]", f"{g.p_holm:.3g}",
            )  # fmt: skip
    stdout.print(table)
    _print_timings(result.timings)
    if comparison.findings:
        stdout.print("model differences:", markup=False)
        for line in comparison.findings:
            stdout.print(f"- {line}", markup=False)
    else:
        stdout.print(
            "model differences: no difference between the two models' group gaps is "
            f"significant after Holm at α = {comparison.alpha}",
            markup=False,
        )
