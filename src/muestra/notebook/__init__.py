"""muestra from Python, a cell at a time: run or open an experiment, an evaluation or a
probe, look at its analysis as tables, convert it to pandas, draw it.

    import muestra.notebook as mn

    exp = mn.experiment("personajes.toml", samples=20)   # runs (or resumes) → ExperimentView
    a = exp.analysis()                                    # tables in Jupyter, text elsewhere
    a.plot()                                              # shares with Wilson intervals
    ev = mn.evaluate(MODEL, "easy-es", methods="choice,loglik", n=20)
    ev.plot()                                             # accuracy per method
    with mn.serve(MODEL) as server:                       # `muestra serve` on 127.0.0.1
        client = server.client()                          # the `openai` SDK

Everything goes through the layers the command line uses (the runner, the store, the
analysis); the numbers are the ones `muestra analyze`/`eval`/`probe`/`report` show. Long
work shows its progress (in Jupyter one line updated in place, so a saved notebook keeps
the final count; a tqdm bar elsewhere); pass `progress=False` to hide it.

In a Jupyter kernel, an error a user can fix (`MuestraError`: a misspelt keyword, a
missing file) shows as its one-line message, without the traceback behind it; a keyword
none of the entry points knows is refused by name with the nearest one ("did you mean").
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Iterable, Mapping
from contextlib import closing
from pathlib import Path
from typing import Any

from muestra.errors import InputError, MuestraError
from muestra.notebook.checks import Alpha, Count, PathLike, check_values, checked
from muestra.notebook.serving import Server, serve
from muestra.notebook.views import AnalysisView, EvaluationView, ExperimentView, ProbeView
from muestra.paths import default_store

__all__ = [
    "AnalysisView",
    "EvaluationView",
    "ExperimentView",
    "ProbeView",
    "Server",
    "compare",
    "evaluate",
    "experiment",
    "open_evaluations",
    "open_probe",
    "open_run",
    "probe",
    "serve",
]


def _kernel() -> Any:
    """The Jupyter kernel's shell, or None outside one."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    return shell if shell is not None and getattr(shell, "kernel", None) is not None else None


def _short_error(shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: Any = None):  # noqa: ANN202
    """IPython's handler of a `MuestraError`: its message alone, no chained traceback."""
    shell.showtraceback((etype, value, None), exception_only=True)


def _notebook_setup() -> None:
    """In a Jupyter kernel: let returned figures display (`%matplotlib inline` registers
    the display of `Figure` objects; muestra's figures are not pyplot's, so a cell shows
    a returned figure once), and show a user's error as its message."""
    shell = _kernel()
    if shell is not None:
        shell.run_line_magic("matplotlib", "inline")
        shell.set_custom_exc((MuestraError,), _short_error)


_notebook_setup()


def refuse_unknown(call: str, given: Iterable[str], known: Iterable[str]) -> None:
    """An InputError naming the first keyword of `given` that `call` does not take, with
    the nearest it does."""
    known = sorted(known)
    for name in given:
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else f"; it takes {', '.join(known)}"
            raise InputError(f"{call}(..., {name}=...): no such keyword{hint}")


MODEL_OPTIONS = ("runtime", "threads", "batch_invariant", "dtype", "device", "trust_remote_code",
                 "thread_wait", "kv_cache")  # fmt: skip


def _thread_wait_default() -> None:
    """The compute threads' wait policy (`models/runtime/threads.py`), set as a command
    sets it: before the first model imports torch, which fixes it for the kernel."""
    from muestra.models.runtime.threads import apply_thread_wait

    apply_thread_wait(None)


_thread_wait_default()


class _Bar:
    """A `Runner` progress callback. In a Jupyter kernel, one line updated in place
    (a display handle: the saved notebook keeps its final state); elsewhere a tqdm bar.
    Both show samples done of total, tok/s and time left at the recent rate, and the
    process's resident memory (`Progress.text`)."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label, self.enabled, self.bar = label, enabled, None
        self.handle: Any = None
        self.started, self.shown, self.last = time.monotonic(), 0.0, None
        self.finished = False  # the run ended as it should (`finish`)

    def __call__(self, p: Any) -> None:
        if not self.enabled:
            return
        self.last = p
        if _kernel() is not None:
            now = time.monotonic()
            if self.handle is None or now - self.shown > 0.5 or p.done >= p.total:
                self._display(p)
                self.shown = now
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=p.total, desc=self.label, unit="sample", leave=True)
        self.bar.total = p.total
        self.bar.set_postfix_str(p.text(), refresh=False)
        self.bar.update(p.done - self.bar.n)

    def _display(self, p: Any) -> None:
        from IPython.display import display

        from muestra.engine.progress import progress_text

        text = (f"{self.label}: {p.done}/{p.total} samples · "
                f"{time.monotonic() - self.started:.0f} s · {p.text()}")  # fmt: skip
        if self.finished and p.done < p.total:  # a sequential run's cells stopped early
            text = (f"{self.label}: {p.done} samples, every cell stopped before its cap "
                    f"({p.total} at most) · {time.monotonic() - self.started:.0f} s · "
                    f"{progress_text(p.tokens_per_s, None, p.rss_bytes)}")  # fmt: skip
        if self.handle is None:
            self.handle = display({"text/plain": text}, raw=True, display_id=True)
        else:
            self.handle.update({"text/plain": text}, raw=True)

    def finish(self) -> None:
        """The run ended as it should: its last state is final (a sequential run's cells may
        have stopped before the cap, with no time left to show)."""
        self.finished = True

    def close(self) -> None:
        from muestra.engine.progress import progress_text

        if self.bar is not None:
            if self.finished and self.last is not None:
                self.bar.total = self.last.done  # stopped early: the bar ends full
                self.bar.set_postfix_str(
                    progress_text(self.last.tokens_per_s, None, self.last.rss_bytes)
                )
            self.bar.close()
        if self.handle is not None and self.last is not None:
            self._display(self.last)


@checked
def open_run(store: PathLike, run: Count | None = None) -> ExperimentView:
    """Run `run` (default: the latest) of a store written by `muestra run`/`experiment`."""
    import tomllib

    from muestra.evaluation.runs import exact_conditions
    from muestra.experiments.results import samples_frame
    from muestra.experiments.spec import AnalysisSpec
    from muestra.experiments.stopping import field_probs_notes, stop_rows
    from muestra.experiments.store import (
        condition_rows,
        reading,
        run_by_id,
        run_models,
        run_state,
    )

    path = Path(store)
    if not path.exists():
        raise InputError(f"{path}: no such store; run an experiment into it first")
    with reading(path) as db:
        row = dict(run_by_id(db, run))
        rid = int(row["id"])
        status, _ = run_state(db, rid)
        models = [dict(m) for m in run_models(db, rid)]
        frame = samples_frame(db, rid)
        rule, stops = stop_rows(db, rid)
        analysis = tomllib.loads(row["spec_text"]).get("analysis", {})
        lang = AnalysisSpec.model_validate(analysis).language  # the summary speaks it too
        notes = field_probs_notes(db, rid, lang)
        conditions = condition_rows(db, rid)
        counted = {str(c["label"]) for c in conditions} - exact_conditions(conditions)
    return ExperimentView(path, rid, row["name"], status, frame, models, rule, stops, notes,
                          lang, counted)  # fmt: skip


@checked
def experiment(
    spec: PathLike,
    store: PathLike | None = None,
    *,
    model: PathLike | None = None,
    samples: Count | None = None,
    force_new: bool = False,
    progress: bool = True,
    stop_on: str | None = None,
    precision: float | None = None,
    reference: float | None = None,
    compare: list[str] | None = None,
    min_samples: int | None = None,
    max_samples: int | None = None,
    every: int | None = None,
    estimator: str | None = None,
    max_memory: str | Count | None = None,
    **model_options: Any,
) -> ExperimentView:
    """Run (or resume) an experiment spec (TOML) into `store` (default: NAME.db beside the
    spec) and return the run. `model` and `samples` override the spec's, as `muestra run
    --model/--samples` do. A store holding a run of a different spec is refused;
    `force_new=True` starts a new run beside it (`--force-new`). `stop_on="field=value"`,
    `precision`, `reference`, `compare`, `min_samples`, `max_samples`, `every` and
    `estimator` complete or override the spec's [stop] table (a sequential run, as the
    `muestra run` flags of the same names). `max_memory` ("8GiB", "12GB", bytes) is the
    run's memory budget (`--max-memory`; its plan is printed when the model is planned).
    `model_options` (runtime, threads, batch_invariant) apply to every local model."""
    from muestra.experiments.runner import Runner
    from muestra.experiments.spec import load_spec
    from muestra.experiments.stopping import with_stop

    names = ("spec", "store", "model", "samples", "force_new", "progress", *MODEL_OPTIONS)
    refuse_unknown("experiment", model_options, names)
    model = None if model is None else str(model)
    loaded = load_spec(spec, check_models=model is None)
    flags = {"precision": precision, "reference": reference, "compare": compare,
             "min_samples": min_samples, "max_samples": max_samples, "every": every,
             "estimator": estimator}  # fmt: skip
    if stop_on is not None:
        field, _, value = stop_on.partition("=")
        if not field or not value:
            raise InputError(f"stop_on={stop_on!r}: write 'field=value', e.g. 'gender=male'")
        flags |= {"field": field.strip(), "value": value.strip()}
    loaded = with_stop(loaded, flags, f"{loaded.path} with experiment(...)'s [stop] keywords")
    out = Path(store) if store is not None else default_store(loaded.spec.name, beside=loaded.path)
    bar = _Bar(loaded.spec.name, progress)
    try:
        with Runner(
            loaded,
            out,
            model=model,
            samples=samples,
            force_new=force_new,
            model_options={**model_options, "max_memory": max_memory},
            on_plan=lambda plan: print(plan.describe()),
        ) as runner:
            run_id = runner.open()
            runner.run(bar)
            bar.finish()
    finally:
        bar.close()
    return open_run(out, run_id)


def _eval_settings(
    where: str, methods: list[str], settings: Mapping[str, Any], n: int | None
) -> list[Any]:
    """Each method's `EvalSettings`, a setting refused by name when unknown, of the wrong
    type or unused by `methods` (named as the keyword it is given by)."""
    from muestra.evaluation.evaluate import METHOD_SETTINGS, EvalSettings
    from muestra.evaluation.methods import method_settings

    known = set(EvalSettings.__dataclass_fields__) - {"method", "limit"}
    unknown = sorted(set(settings) - known)
    if unknown:
        near = difflib.get_close_matches(unknown[0], known, n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise InputError(
            f"{', '.join(unknown)}: not a setting{hint}; use {', '.join(sorted(known))}"
        )
    check_values(where, settings, EvalSettings)
    values = {**settings, "limit": n}
    return method_settings(methods, values, {name: name for name in METHOD_SETTINGS})


@checked
def evaluate(
    model: PathLike,
    task: PathLike,
    methods: str | list[str] = "choice",
    *,
    store: PathLike | None = None,
    n: Count | None = None,
    progress: bool = True,
    model_options: Mapping[str, Any] | None = None,
    **settings: Any,
) -> EvaluationView:
    """Score a question set (a file or a shipped set: easy-en, easy-es) with one or more
    methods (choice, loglik, cot, vote), as `muestra eval` does; `n` keeps the first n
    questions, `settings` are `EvalSettings` fields (samples, think_budget, temperature,
    top_p, weighted, regex, format, chat, raw, shots, language, seed, dtype). A setting
    none of the methods uses is refused by name."""
    from muestra.evaluation.methods import evaluate_methods
    from muestra.evaluation.tasks import load_task

    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    every = _eval_settings("evaluate", names, settings, n)
    loaded = load_task(task)
    found = evaluate_methods(
        str(model),
        loaded,
        every,
        Path(store) if store is not None else None,
        progress=lambda method: closing(_Bar(method, progress)),
        model_options=model_options,
    )
    return EvaluationView(found.results, found.pairs, _task_language(loaded, every[0].language))


@checked
def compare(
    model_a: PathLike,
    model_b: PathLike,
    task: PathLike,
    method: str = "loglik",
    *,
    store: PathLike | None = None,
    n: Count | None = None,
    options: tuple[Mapping[str, Any], Mapping[str, Any]] = ({}, {}),
    **settings: Any,
) -> EvaluationView:
    """Two models on one question set, as `muestra compare --task` does: each model's
    accuracy, their paired comparison, and timings (load, prefill and decode speed, the
    evaluation's seconds) in `to_pandas()`. `options`: each model's runtime settings."""
    from muestra.evaluation.compare import compare_models
    from muestra.evaluation.tasks import load_task

    (method_settings,) = _eval_settings("compare", [method], settings, n)
    loaded = load_task(task)
    out = Path(store) if store is not None else default_store(loaded.name, "compare")
    found = compare_models(
        str(model_a), str(model_b), loaded, method_settings, out, options=options
    )
    return EvaluationView(
        found.results, [found.comparison], _task_language(loaded, method_settings.language)
    )


def _task_language(task: Any, language: str) -> str:
    """The language of a question set (its figures and captions speak it)."""
    from muestra.evaluation.prompts import language_of

    return language_of(task, language).code


@checked
def open_evaluations(store: PathLike) -> EvaluationView:
    """Every evaluation in a store, compared where they share questions."""
    from muestra.evaluation.summary import comparisons, eval_runs

    results = eval_runs(Path(store))
    if not results:
        raise InputError(f"{store}: the store holds no evaluation (`muestra eval` writes them)")
    return EvaluationView(results, comparisons(results))


@checked
def probe(
    probe: PathLike,
    model: PathLike | None = None,
    *,
    store: PathLike | None = None,
    samples: Count | None = None,
    progress: bool = True,
    model_options: Mapping[str, Any] | None = None,
    stop_on: str | None = None,
    precision: float | None = None,
    reference: float | None = None,
    compare: list[str] | None = None,
    min_samples: int | None = None,
    max_samples: int | None = None,
    every: int | None = None,
) -> ProbeView:
    """Sample a free-text probe (a shipped name such as `occupations-es` or a TOML file) on
    `model` (default: the probe's), score it and return its analysis, as `muestra probe`
    does (without a judge). `stop_on` (a score: "lexicon:CATEGORY", "category=CATEGORY",
    "phrase=PHRASE"), `precision`, `reference`, `compare` (two groups), `min_samples`,
    `max_samples` and `every` complete or override the probe's [stop] table (a sequential
    probe, as the `muestra probe` flags of the same names)."""
    from muestra.evaluation.probes import load_probe, run_probe, with_probe_stop

    flags = {"score": stop_on, "precision": precision, "reference": reference,
             "compare": compare, "min_samples": min_samples, "max_samples": max_samples,
             "every": every}  # fmt: skip
    loaded = with_probe_stop(load_probe(probe), flags, f"{probe} with probe(...)'s [stop] keywords")
    out = Path(store) if store is not None else default_store(loaded.spec.name)
    bar = _Bar(loaded.spec.name, progress)
    try:
        run_id = run_probe(
            loaded,
            out,
            model=None if model is None else str(model),
            samples=samples,
            on_progress=bar,
            model_options=model_options,
        )
        bar.finish()
    finally:
        bar.close()
    return open_probe(out, run_id)


@checked
def open_probe(store: PathLike, run: Count | None = None, alpha: Alpha | None = None) -> ProbeView:
    """A probe run of a store (default: the latest run)."""
    from muestra.evaluation.probes import read_probe
    from muestra.experiments.stopping import stop_note, stop_rows
    from muestra.experiments.store import reading, run_by_id

    with reading(Path(store)) as db:
        rid = int(run_by_id(db, run)["id"])
        found = read_probe(db, rid, alpha)
        rule, stops = stop_rows(db, rid)
    if found is None:
        raise InputError(f"{store}: run {rid} is not a probe (`muestra probe` writes them)")
    loaded, analysis = found
    notes = [n for n in [stop_note(rule)] if n]
    return ProbeView(Path(store), rid, loaded.spec.name, analysis, rule, stops, notes)
