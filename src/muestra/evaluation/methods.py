"""Several scoring methods of one question set, compared in pairs: what `muestra eval
--method choice,cot` and the notebook API's `evaluate(model, task, ["choice", "cot"])` do.

`method_settings` turns a command's values into each method's `EvalSettings`, refusing
by name an unknown method or a setting none of the methods uses, before anything loads.
`evaluate_methods` runs each method (each its own resumable run in the store), then
compares every pair on the questions both scored (agreement, McNemar exact test, paired
bootstrap interval of the accuracy difference).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from muestra.evaluation.evaluate import (
    EvalResult,
    EvalSettings,
    PairedComparison,
    check_methods,
    compare_results,
    evaluate,
    settings_for,
)
from muestra.evaluation.tasks import Task
from muestra.paths import default_store

# a method's progress: `progress(method)` enters a context that gives the runner's callback
ProgressFor = Callable[[str], AbstractContextManager[Callable[[Any], None] | None]]


@dataclass
class MethodsEvaluation:
    results: list[EvalResult]  # one per method, in the order asked
    pairs: list[PairedComparison]  # every pair of methods, (first, second) as asked


def method_settings(
    methods: Sequence[str], values: Mapping[str, Any], flags: Mapping[str, str] | None = None
) -> list[EvalSettings]:
    """Each method's settings out of a command's `values`; an unknown method, or a setting
    none of `methods` uses (named as `flags` names it), is refused first."""
    for name in methods:
        EvalSettings(method=name)  # an unknown method is refused before anything loads
    check_methods(methods, values, flags)
    return [settings_for(name, values) for name in methods]


def store_of(task: Task, store: Path | None) -> Path:
    """The evaluation's store: `store`, else eval-TASK.db in the current folder."""
    return store if store is not None else default_store(task.name, "eval")


def evaluate_methods(
    model: str,
    task: Task,
    every: Sequence[EvalSettings],
    store: Path | None = None,
    *,
    progress: ProgressFor | None = None,
    **options: Any,
) -> MethodsEvaluation:
    """`task` scored by each of `every` on `model` into `store` (default eval-TASK.db),
    then each pair compared. `progress(method)` gives each run's progress callback;
    `options` go to `evaluate` (on_note, trust_remote_code, model_options)."""
    out = store_of(task, store)
    results = []
    for settings in every:
        with (progress or (lambda _: nullcontext(None)))(settings.method) as on_progress:
            results.append(evaluate(model, task, settings, out, on_progress=on_progress, **options))
    return MethodsEvaluation(results, compare_pairs(results, [s.method for s in every]))


def compare_pairs(results: list[EvalResult], labels: list[str]) -> list[PairedComparison]:
    """Every pair of results compared on the questions both scored."""
    return [
        compare_results(results[i], results[j], labels[i], labels[j])
        for i in range(len(results))
        for j in range(i + 1, len(results))
    ]
