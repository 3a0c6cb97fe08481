"""`muestra eval` (a multiple-choice or open task scored by one or more methods) and
`muestra compare` (two models on the same questions, with paired tests and timings)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from muestra.cli.common import (
    BatchInvariantOverrideOption,
    JsonOption,
    RuntimeOverrideOption,
    ThreadsOption,
    TrustRemoteCodeOption,
    model_options,
    print_json,
    stderr,
    stdout,
)
from muestra.cli.sampling_options import sampling_option
from muestra.settings import SETTING


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    app.command("compare")(compare)


METHOD_HELP = (
    "choice (letters under a grammar, exact probabilities) | loglik (lm-eval's "
    "log-likelihood) | cot (reason, then a letter) | vote (self-consistency); several "
    "separated by commas are compared on the same questions."
)


def _settings(**values: Any) -> Any:
    from muestra.evaluation.evaluate import EvalSettings

    return EvalSettings(**values)


def _method_settings(methods: list[str], values: dict[str, Any]) -> list[Any]:
    """Each method's settings; a flag none of `methods` uses is refused by name first."""
    from muestra.evaluation.evaluate import check_methods, settings_for

    check_methods(methods, values)
    return [settings_for(name, values) for name in methods]


def eval_command(
    model: str = typer.Argument(..., help="Hub id or local folder (e.g. a `muestra kit build`)."),
    task: str = typer.Argument(
        ...,
        help="Questions: a .jsonl/.json/.csv/.parquet file, a shipped set (easy-en, easy-es) "
        "or hf:OWNER/NAME[:CONFIG] from the local Hugging Face cache.",
    ),
    method: str = typer.Option("choice", "--method", help=METHOD_HELP),
    fmt: str = typer.Option(
        "cloze",
        "--format",
        help="loglik: cloze (ARC's 'Question: …\\nAnswer:' + ' option text') or letters "
        "(MMLU's options listed, ' A' / ' B' …).",
    ),
    chat: bool = typer.Option(False, "--chat", help="loglik: apply the chat template."),
    raw: bool = typer.Option(
        False, "--raw", help="choice / cot / vote: plain text, no chat template (base models)."
    ),
    shots: int = typer.Option(0, "--shots", min=0, help="Few-shot examples from the dev file."),
    dev: Path | None = typer.Option(
        None, "--dev", help="Few-shot file (default: NAME.dev.jsonl beside the task)."
    ),
    split: str = typer.Option("test", "--split", help="hf: tasks: the split to score."),
    limit: int | None = typer.Option(None, "--n", min=1, help="Only the first N questions."),
    samples: int | None = typer.Option(
        None,
        "--samples-per-question",
        min=1,
        help="Samples per question (vote: 5; others: 1; choice with more draws letters).",
    ),
    think_budget: int = typer.Option(256, "--think-budget", min=1, help="cot / vote tokens."),
    temperature: float | None = sampling_option(
        SETTING.temperature, "cot: 0; vote: 0.7; choice draws: 1."
    ),
    top_p: float | None = sampling_option(SETTING.top_p, "vote: 0.9."),
    weighted: bool = typer.Option(
        False, "--weighted", help="vote: weight each path by its letter probability."
    ),
    regex: str | None = typer.Option(
        None, "--regex", help="Open questions: vote on this regex's first group."
    ),
    language: str = typer.Option("auto", "--language", help="auto | en | es (prompt wording)."),
    seed: int = typer.Option(0, "--seed", help="Run seed (per-sample seeds derive from it)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | bfloat16 | float16 | float32."),
    out: Path | None = typer.Option(
        None, "--out", help="SQLite store (default: eval-TASK.db here); resumable."
    ),
    items: bool = typer.Option(False, "--items", help="Also print every question's result."),
    as_json: bool = JsonOption,
    trust_remote_code: bool = TrustRemoteCodeOption,
    runtime: str | None = RuntimeOverrideOption,
    threads: int | None = ThreadsOption,
    batch_invariant: bool | None = BatchInvariantOverrideOption,
    precision: float | None = typer.Option(
        None,
        "--precision",
        help="vote: sample a question until its right answer's share is "
        "within ± this (at most --samples-per-question paths).",
    ),
    reference: float | None = typer.Option(
        None, "--reference", help="vote: … or until that share's band excludes this (e.g. 0.5)."
    ),
    min_samples: int = typer.Option(10, "--min-samples", min=1, help="vote: paths before a look."),
    every: int = typer.Option(10, "--every", min=1, help="vote: paths a round, between looks."),
) -> None:
    """Score a question set: accuracy with Wilson intervals, per category, and for several
    methods their agreement and paired tests (McNemar, bootstrap interval).

    Everything lands in the SQLite store as an experiment run; the same command resumes
    an interrupted evaluation and re-reads a finished one.
    """
    from muestra.evaluation.evaluate import compare_results
    from muestra.evaluation.tasks import load_task

    methods = [m.strip() for m in method.split(",") if m.strip()]
    for name in methods:
        _settings(method=name)  # an unknown method is refused before anything loads
    every = _method_settings(
        methods,
        dict(
            format=fmt,
            chat=chat,
            raw=raw,
            shots=shots,
            limit=limit,
            samples=samples,
            think_budget=think_budget,
            temperature=temperature,
            top_p=top_p,
            weighted=weighted,
            language=language,
            regex=regex,
            seed=seed,
            dtype=dtype,
            precision=precision,
            reference=reference,
            min_samples=min_samples,
            every=every,
        ),
    )
    loaded_task = load_task(task, dev=dev, split=split)
    store = out if out is not None else Path(f"eval-{loaded_task.name}.db")
    options = model_options(runtime, threads, batch_invariant)
    results = [
        _run_one(model, loaded_task, settings, store, trust_remote_code, options)
        for settings in every
    ]
    pairs = [
        compare_results(results[i], results[j], methods[i], methods[j])
        for i in range(len(results))
        for j in range(i + 1, len(results))
    ]
    if as_json:
        data = (
            results[0].as_json()
            if len(results) == 1
            else {
                "results": [r.as_json() for r in results],
                "comparisons": [_pair_json(p) for p in pairs],
            }
        )
        print_json(data)
        return
    for result in results:
        _print_result(result, items)
    for pair in pairs:
        _print_pair(pair)


def _run_one(
    model: str, task: Any, settings: Any, store: Path, trust: bool, options: dict[str, Any]
) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from muestra.evaluation.evaluate import evaluate

    with Progress(
        TextColumn(f"{settings.method}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[speed]}"),
        console=stderr,
        disable=not stderr.is_terminal,
    ) as bar:
        handle = bar.add_task(settings.method, total=None, speed="")

        def update(p: Any) -> None:
            bar.update(
                handle,
                completed=p.done,
                total=p.total,
                speed=f"{p.done / max(p.elapsed, 1e-9):.2f} samples/s",
            )

        try:
            return evaluate(
                model,
                task,
                settings,
                store,
                on_progress=update,
                trust_remote_code=trust,
                on_note=lambda text: stderr.print(f"note: {text}", markup=False),
                model_options=options,
            )
        except KeyboardInterrupt:
            stderr.print(
                "stopped; finished batches are stored. Run the same command to resume.",
                markup=False,
            )
            sys.exit(130)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _interval(low: float, high: float) -> str:
    return f"[{_pct(low)}, {_pct(high)}]"


def _print_result(result: Any, show_items: bool) -> None:
    s = result.settings
    how = {
        "loglik": f"{s.format}{' chat' if s.chat else ''}",
        "choice": f"{s.per_question} sample(s)",
        "cot": f"think budget {s.think_budget}",
        "vote": f"{s.per_question} paths{' weighted' if s.weighted else ''}",
    }[result.method]
    stdout.print(
        f"{result.task} · {result.model} · {result.method} ({how}, {s.shots}-shot) · "
        f"{result.accuracy.total} questions · run {result.run_id} in {result.store}",
        markup=False,
    )
    table = Table(show_edge=False)
    for column in ("", "accuracy", "95% interval", "n"):
        table.add_column(column)
    a = result.accuracy
    table.add_row("accuracy", _pct(a.value), _interval(a.low, a.high), str(a.total))
    if result.expected is not None:
        mean, low, high = result.expected
        table.add_row("expected (mean p right)", _pct(mean), _interval(low, high), str(a.total))
    if result.acc_norm is not None:
        n = result.acc_norm
        table.add_row("acc_norm", _pct(n.value), _interval(n.low, n.high), str(n.total))
    if result.draws is not None:
        d = result.draws
        table.add_row("sampled answers", _pct(d.value), _interval(d.low, d.high), str(d.total))
    for category, c in result.by_category.items():
        table.add_row(f"  {category}", _pct(c.value), _interval(c.low, c.high), str(c.total))
    stdout.print(table)
    if result.curve:
        curve = Table(title="majority of the first k paths", show_edge=False)
        for column in ("k", "accuracy", "95% interval"):
            curve.add_column(column)
        for k, acc in result.curve:
            curve.add_row(str(k), _pct(acc.value), _interval(acc.low, acc.high))
        stdout.print(curve)
    for note in result.notes:
        stdout.print(f"note: {note}", markup=False)
    if show_items:
        rows = Table(show_edge=False)
        for column in ("id", "answer", "predicted", "right", "p(right)"):
            rows.add_column(column)
        for item in result.items:
            p = "" if item.p_correct is None else f"{item.p_correct:.3f}"
            rows.add_row(
                item.id, str(item.answer), str(item.predicted), "yes" if item.correct else "no", p
            )
        stdout.print(rows)
    stdout.print("")


def _pair_json(pair: Any) -> dict[str, Any]:
    diff, low, high = pair.difference
    return {
        "a": pair.a,
        "b": pair.b,
        "questions": pair.questions,
        "agreement": pair.agreement,
        "accuracy_a": pair.accuracy_a,
        "accuracy_b": pair.accuracy_b,
        "difference": {"value": diff, "low": low, "high": high},
        "mcnemar": {
            "only_a": pair.mcnemar.only_a,
            "only_b": pair.mcnemar.only_b,
            "p_value": pair.mcnemar.p_value,
        },
    }


def _print_pair(pair: Any) -> None:
    diff, low, high = pair.difference
    m = pair.mcnemar
    stdout.print(
        f"{pair.a} vs {pair.b} on {pair.questions} questions: same answer on "
        f"{_pct(pair.agreement)}; accuracy {_pct(pair.accuracy_a)} vs {_pct(pair.accuracy_b)}, "
        f"difference {100 * diff:+.1f} points [{100 * low:+.1f}, {100 * high:+.1f}] (paired "
        f"bootstrap); only {pair.a} right: {m.only_a}, only {pair.b} right: {m.only_b}, "
        f"McNemar exact p = {m.p_value:.3g}",
        markup=False,
    )


def compare(
    model_a: str = typer.Argument(..., help="First model (Hub id or folder)."),
    model_b: str = typer.Argument(..., help="Second model."),
    task: str | None = typer.Option(
        None, "--task", help="Questions (file, easy-en / easy-es, or hf:…), as for `eval`."
    ),
    spec: Path | None = typer.Option(
        None, "--spec", help="An experiment spec (TOML) to run on both models instead."
    ),
    probe: str | None = typer.Option(
        None,
        "--probe",
        help="A free-text probe (file or shipped name, see `muestra probe --list`) to run on "
        "both models instead: each model's group differences and which model is more skewed.",
    ),
    method: str = typer.Option(
        "loglik", "--method", help="--task: " + METHOD_HELP.split(";")[0] + "."
    ),
    fmt: str = typer.Option("cloze", "--format", help="--task loglik: cloze | letters."),
    shots: int = typer.Option(0, "--shots", min=0, help="--task: few-shot examples."),
    limit: int | None = typer.Option(None, "--n", min=1, help="--task: the first N questions."),
    samples: int | None = typer.Option(
        None,
        "--samples",
        min=1,
        help="Samples per question (--task), prompt (--spec) or template and group (--probe).",
    ),
    think_budget: int = typer.Option(256, "--think-budget", min=1, help="--task cot / vote."),
    seed: int = typer.Option(0, "--seed", help="--task: run seed (a spec has its own)."),
    dtype: str = typer.Option("auto", "--dtype", help="--task: auto | bfloat16 | float32."),
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
    batch_invariant: bool | None = BatchInvariantOverrideOption,
) -> None:
    """Two models on the same work with the same seeds, side by side, as seed 002 compares
    distilgpt2 with gpt2: with --task, accuracies with the paired tests (McNemar exact,
    paired bootstrap) and each question's answers; with --spec, the experiment run on both
    (one run: `analyze` tests the model difference within each prompt) and the first
    output of every prompt next to each other. Both: timings on this machine (load time,
    weights in memory, prefill and decode tokens/s, decoding time). `muestra report`
    shows the --task comparison as a section of the HTML report."""
    from muestra.errors import InputError

    if sum(x is not None for x in (task, spec, probe)) != 1:
        raise InputError(
            "give exactly one of --task FILE (questions), --spec FILE (experiment) or "
            "--probe NAME (free-text probe)"
        )
    if task is None:  # the question-set settings have nothing to apply to: refused by name
        given = [
            flag
            for flag, value, default in (
                ("--method", method, "loglik"), ("--format", fmt, "cloze"), ("--shots", shots, 0),
                ("--n", limit, None), ("--think-budget", think_budget, 256), ("--seed", seed, 0),
                ("--dtype", dtype, "auto"),
            )
            if value != default
        ]  # fmt: skip
        if given:
            raise InputError(
                f"{', '.join(given)} apply to --task only; a spec or a probe sets its own "
                "(its [decoding], seed and samples), and --runtime-a/-b choose how each "
                "model computes"
            )
    options = (
        model_options(runtime_a, threads, batch_invariant),
        model_options(runtime_b, threads, batch_invariant),
    )
    if spec is not None:
        _compare_spec(model_a, model_b, spec, out, samples, as_json, trust_remote_code, options)
        return
    if probe is not None:
        _compare_probe(model_a, model_b, probe, out, samples, as_json, trust_remote_code, options)
        return
    assert task is not None
    from muestra.evaluation.compare import compare_models
    from muestra.evaluation.tasks import load_task

    settings = _settings(
        method=method,
        format=fmt,
        shots=shots,
        limit=limit,
        samples=samples,
        think_budget=think_budget,
        seed=seed,
        dtype=dtype,
    )
    settings.check_applies({"samples": "--samples"})
    loaded_task = load_task(task)
    store = out if out is not None else Path(f"compare-{loaded_task.name}.db")
    report = compare_models(
        model_a,
        model_b,
        loaded_task,
        settings,
        store,
        trust_remote_code=trust_remote_code,
        on_note=lambda text: stderr.print(f"note: {text}", markup=False),
        options=options,
    )
    if as_json:
        print_json(report.as_json())
        return
    for result in report.results:
        _print_result(result, False)
    _print_pair(report.comparison)
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
    store = out if out is not None else Path(f"compare-{name}.db")
    result = compare_spec(
        model_a,
        model_b,
        spec,
        store,
        samples=samples,
        trust_remote_code=trust,
        on_note=lambda text: stderr.print(f"note: {text}", markup=False),
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
    store = out if out is not None else Path(f"compare-{probe.spec.name}.db")
    result = compare_probe(
        model_a, model_b, probe, store, samples=samples, trust_remote_code=trust,
        on_note=lambda text: stderr.print(f"note: {text}", markup=False), options=options,
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
