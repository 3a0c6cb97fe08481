"""`muestra eval`: a multiple-choice or open task scored by one or more methods, the
methods compared in pairs; and the options `muestra compare --task` shares with it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from muestra.cli.common import (
    BatchInvariantOverrideOption,
    DtypeOption,
    JsonOption,
    KvCacheOption,
    MaxMemoryOption,
    RuntimeOverrideOption,
    ThreadsOption,
    ThreadWaitOption,
    TrustRemoteCodeOption,
    model_options,
    print_json,
    stderr,
    stdout,
    stopped_is_resumable,
)
from muestra.cli.sampling_options import sampling_option
from muestra.settings import SETTING


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)


METHOD_HELP = (
    "choice (letters under a grammar, exact probabilities) | loglik (lm-eval's "
    "log-likelihood) | cot (reason, then a letter) | vote (self-consistency)"
)
TASK_HELP = (
    "Questions: a .jsonl/.json/.csv/.parquet file, a shipped set (easy-en, easy-es) "
    "or hf:OWNER/NAME[:CONFIG] from the local Hugging Face cache."
)
# the question-set options `eval` and `compare --task` share (their defaults are
# `EvalSettings`'s, the library's: evaluation/evaluate.py)
FormatOption = typer.Option(
    "cloze",
    "--format",
    help="loglik: cloze (ARC's 'Question: …\\nAnswer:' + ' option text') or letters "
    "(MMLU's options listed, ' A' / ' B' …).",
)
ShotsOption = typer.Option(0, "--shots", min=0, help="Few-shot examples from the dev file.")
LimitOption = typer.Option(None, "--n", min=1, help="Only the first N questions.")
ThinkBudgetOption = typer.Option(256, "--think-budget", min=1, help="cot / vote tokens.")
SeedOption = typer.Option(0, "--seed", help="Run seed (per-sample seeds derive from it).")


def method_option(default: str, more: str) -> Any:
    return typer.Option(default, "--method", help=f"{METHOD_HELP}{more}")


def note(text: str) -> None:
    stderr.print(f"note: {text}", markup=False)


def eval_command(
    model: str = typer.Argument(..., help="Hub id or local folder (e.g. a `muestra kit build`)."),
    task: str = typer.Argument(..., help=TASK_HELP),
    method: str = method_option(
        "choice", "; several separated by commas are compared on the same questions."
    ),
    fmt: str = FormatOption,
    chat: bool = typer.Option(False, "--chat", help="loglik: apply the chat template."),
    raw: bool = typer.Option(
        False, "--raw", help="choice / cot / vote: plain text, no chat template (base models)."
    ),
    shots: int = ShotsOption,
    dev: Path | None = typer.Option(
        None, "--dev", help="Few-shot file (default: NAME.dev.jsonl beside the task)."
    ),
    split: str = typer.Option("test", "--split", help="hf: tasks: the split to score."),
    limit: int | None = LimitOption,
    samples: int | None = typer.Option(
        None,
        "--samples-per-question",
        min=1,
        help="Samples per question (vote: 5; others: 1; choice with more draws letters).",
    ),
    think_budget: int = ThinkBudgetOption,
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
    seed: int = SeedOption,
    dtype: str = DtypeOption,
    out: Path | None = typer.Option(
        None, "--out", help="SQLite store (default: eval-TASK.db here); resumable."
    ),
    items: bool = typer.Option(False, "--items", help="Also print every question's result."),
    as_json: bool = JsonOption,
    trust_remote_code: bool = TrustRemoteCodeOption,
    runtime: str | None = RuntimeOverrideOption,
    threads: int | None = ThreadsOption,
    thread_wait: str | None = ThreadWaitOption,
    batch_invariant: bool | None = BatchInvariantOverrideOption,
    max_memory: str | None = MaxMemoryOption,
    kv_cache: str | None = KvCacheOption,
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
    \f
    (For readers of the code: one piece, because typer reads a command's options from its
    signature; each option is a parameter, and the body is short.)
    """
    from muestra.evaluation.methods import evaluate_methods, method_settings
    from muestra.evaluation.tasks import load_task

    methods = [m.strip() for m in method.split(",") if m.strip()]
    values = dict(
        format=fmt, chat=chat, raw=raw, shots=shots, limit=limit, samples=samples,
        think_budget=think_budget, temperature=temperature, top_p=top_p, weighted=weighted,
        language=language, regex=regex, seed=seed, dtype=dtype, precision=precision,
        reference=reference, min_samples=min_samples, every=every,
    )  # fmt: skip
    every_method = method_settings(methods, values)  # refused by name before anything loads
    loaded_task = load_task(task, dev=dev, split=split)
    with stopped_is_resumable():
        found = evaluate_methods(
            model,
            loaded_task,
            every_method,
            out,
            progress=progress_bar,
            on_note=note,
            trust_remote_code=trust_remote_code,
            model_options=model_options(
                runtime, threads, batch_invariant, thread_wait, max_memory, kv_cache
            ),
        )
    print_found(found, as_json, items)


def print_found(found: Any, as_json: bool, items: bool) -> None:
    """Each method's result, then each pair compared (one JSON object with `--json`)."""
    if as_json:
        results, pairs = found.results, found.pairs
        print_json(
            results[0].as_json()
            if len(results) == 1
            else {
                "results": [r.as_json() for r in results],
                "comparisons": [pair_json(p) for p in pairs],
            }
        )
        return
    for result in found.results:
        print_result(result, items)
    for pair in found.pairs:
        print_pair(pair)


@contextmanager
def progress_bar(method: str) -> Iterator[Any]:
    """A method's progress on stderr (when it is a terminal): done of total, tok/s and
    time left at the recent rate, resident memory."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(
        TextColumn(method),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[speed]}"),
        console=stderr,
        disable=not stderr.is_terminal,
    ) as bar:
        handle = bar.add_task(method, total=None, speed="")

        def update(p: Any) -> None:
            bar.update(handle, completed=p.done, total=p.total, speed=p.text())

        yield update


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _interval(low: float, high: float) -> str:
    return f"[{_pct(low)}, {_pct(high)}]"


def print_result(result: Any, show_items: bool) -> None:
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


def pair_json(pair: Any) -> dict[str, Any]:
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


def print_pair(pair: Any) -> None:
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
