"""What one run of a spec samples, checked before the store opens or a model loads.

A command may override the spec: `--samples` (a sequential run's cap is `[stop]
max_samples`), `--model`, `--batch`, `--max-memory` (the spec's `[run] max_memory`) and
the runtime flags
(`--trust-remote-code`, `--runtime`, `--threads`, `--batch-invariant`). `run_settings`
applies them and refuses by name what cannot run: a sample count below 1 or over the
limits (`muestra.limits`), more samples than a beam-searched condition returns, a runtime
flag when every model is an endpoint, a [model] field out of its bounds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from muestra.errors import InputError
from muestra.experiments.planning import Budget, given_budget
from muestra.experiments.spec import LoadedSpec, ModelSpec, check_beam_samples, describe_error
from muestra.limits import SAMPLES_PER_CELL, SAMPLES_PER_RUN

DEFAULT_BATCH_ROWS = 32


@dataclass(frozen=True)
class RunSettings:
    samples: int  # per prompt × condition × model
    models: list[ModelSpec]  # with the command's runtime flags applied to the local ones
    batch_rows: int  # rows decoded at once (at most: the memory plan may lower it)
    budget: Budget | None = None  # the memory budget given (None: the default share)


def samples_per_cell(samples: int | None, spec_samples: int, stop: Any) -> int:
    """The most samples a cell takes: `--samples`, else the spec's, else a sequential run's
    `[stop] max_samples` (a `SequentialRule`), which `--samples` may not contradict."""
    if stop is None or stop.max_samples is None:
        return samples if samples is not None else spec_samples
    if samples is not None and samples != stop.max_samples:
        raise InputError(
            f"--samples {samples} and [stop] max_samples = {stop.max_samples} both "
            "set how many samples a cell takes at most: give one of them"
        )
    return int(stop.max_samples)


def run_settings(
    spec: LoadedSpec,
    *,
    model: str | None = None,
    samples: int | None = None,
    batch_rows: int | None = None,
    trust_remote_code: bool = False,
    model_options: Mapping[str, Any] | None = None,
) -> RunSettings:
    """The run's settings: the spec's, with the command's overrides, all checked."""
    count = samples_per_cell(samples, spec.spec.samples, spec.spec.stop)
    if count < 1:
        raise InputError(f"--samples must be at least 1 (got {count})")
    where = f"{spec.path}: samples = {count:,}" if samples is None else "--samples"
    SAMPLES_PER_CELL.check(count, where)
    check_beam_samples(spec.conditions, count, f"{spec.path} with --samples")
    models = [ModelSpec(id=model)] if model else spec.spec.model_list
    # flags that apply to every local model (`--trust-remote-code`, `--runtime`, …)
    local = dict(model_options or {})
    budget = _budget(spec, local.pop("max_memory", None))
    if trust_remote_code:
        local["trust_remote_code"] = True
    given = [*local, *(["batch"] if batch_rows is not None else [])]
    given += ["max_memory"] if budget is not None and budget.source.startswith("--") else []
    if given and all(m.endpoint is not None for m in models):
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise InputError(
            f"{flags}: {'applies' if len(given) == 1 else 'apply'} to models this "
            f"machine computes; every model of {spec.path} is an endpoint (its server "
            "decides how it computes and batches): leave them out"
        )
    if budget is not None and all(m.endpoint is not None for m in models):
        raise InputError(
            f"{spec.path}: [run] max_memory budgets the models this machine computes; every "
            "model of this run is an endpoint (its server plans its own memory): remove it"
        )
    if local:
        models = [_with_options(m, local, spec) if m.endpoint is None else m for m in models]
    _apply_thread_wait(models, spec.path)
    cells = len(models) * len(spec.conditions) * len(spec.spec.prompt.items)
    SAMPLES_PER_RUN.check(
        cells * count,
        f"{spec.path}: {cells:,} prompt × condition × model cells × {count:,} samples",
    )
    rows = batch_rows if batch_rows is not None else DEFAULT_BATCH_ROWS
    return RunSettings(count, models, rows, budget)


def _budget(spec: LoadedSpec, flag: Any) -> Budget | None:
    """The memory budget: `--max-memory` (or `max_memory=`), else the spec's
    `[run] max_memory`; None leaves the default (planning.default_budget)."""
    if flag is not None:
        return given_budget(flag, "--max-memory")
    value = spec.spec.run.max_memory
    return None if value is None else given_budget(value, f"{spec.path}: [run] max_memory =")


def _with_options(model: ModelSpec, options: Mapping[str, Any], spec: LoadedSpec) -> ModelSpec:
    """`model` with the command's runtime settings, held to [model]'s own bounds."""
    data = {**model.model_dump(exclude_unset=True), **options}
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as err:
        message = describe_error(err, spec.path, data, ModelSpec)
        raise InputError(f"{message} (given on the command line)") from err


def _apply_thread_wait(models: list[ModelSpec], path: Any) -> None:
    """The run's thread wait (`models.runtime.threads`), set before torch loads: one for
    the process, so local models asking for different ones are refused."""
    from muestra.models.runtime.threads import apply_thread_wait

    waits = sorted({m.thread_wait for m in models if m.endpoint is None and m.thread_wait})
    if len(waits) > 1:
        raise InputError(
            f"{path}: the models ask for thread_wait {' and '.join(waits)}; one process has "
            "one: give them the same (or leave it out)"
        )
    if waits:
        apply_thread_wait(waits[0], f"{path}: thread_wait =")
