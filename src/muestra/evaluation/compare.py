"""`muestra compare`: two models, the same questions and seeds, side by side.

Each model is evaluated as `muestra eval` does (two runs in one store, resumable), then
compared question by question (agreement, McNemar exact test, paired bootstrap interval of
the accuracy difference). Timings are measured on this machine in the same process, one
model after the other: load time, weights in memory, prefill tokens/s (the task's first
contexts in one batch) and greedy decode tokens/s at batch 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from muestra.evaluation.evaluate import (
    EvalResult,
    EvalSettings,
    PairedComparison,
    compare_results,
    evaluate,
)
from muestra.evaluation.tasks import Task

PREFILL_PROMPTS = 8
DECODE_TOKENS = 32


@dataclass(frozen=True)
class Timing:
    model: str
    load_seconds: float
    weights_mb: float
    prefill_tps: float
    decode_tps: float
    eval_seconds: float
    runtime: str = "torch"


@dataclass
class ModelComparison:
    labels: tuple[str, str]
    results: list[EvalResult]
    comparison: PairedComparison
    timings: list[Timing]
    side_by_side: list[tuple[str, str, str, str]]

    def as_json(self) -> dict[str, Any]:
        c = self.comparison
        return {
            "models": list(self.labels),
            "results": [r.as_json() for r in self.results],
            "comparison": {
                "questions": c.questions,
                "agreement": c.agreement,
                "accuracy": [c.accuracy_a, c.accuracy_b],
                "difference": dict(zip(("value", "low", "high"), c.difference, strict=True)),
                "mcnemar": asdict(c.mcnemar),
            },
            "timings": [asdict(t) for t in self.timings],
        }


def measure(
    model: str,
    texts: list[str],
    dtype: str = "auto",
    trust: bool = False,
    options: Mapping[str, Any] | None = None,
) -> Timing:
    """Load time, weights, prefill and decode speed of `model` on `texts` (`options`:
    runtime, threads, batch_invariant)."""
    import torch

    from muestra.answers.generation import TextGenerator
    from muestra.engine import GenerationRequest, SamplingParams
    from muestra.models.loading import load_model

    started = time.perf_counter()
    loaded = load_model(model, dtype=dtype, trust_remote_code=trust, **(options or {}))  # type: ignore[arg-type]
    load_seconds = time.perf_counter() - started
    runtime = loaded.runtime
    generator = TextGenerator(loaded, max_batch=PREFILL_PROMPTS)
    prompts = [generator.encode_prompt(t) for t in texts[:PREFILL_PROMPTS]]
    with torch.inference_mode():
        runtime.prefill(prompts[:1], 1)[0].close()  # warm up
        started = time.perf_counter()
        runtime.prefill(prompts, 1)[0].close()
        prefill = sum(len(p) for p in prompts) / (time.perf_counter() - started)
    started = time.perf_counter()
    request = GenerationRequest(
        prompts[0],
        params=SamplingParams(temperature=0.0),
        max_new_tokens=DECODE_TOKENS,
        ignore_eos=True,
    )
    sample = generator.generate([request])[0]
    decode = sample.num_tokens / (time.perf_counter() - started)
    weights = runtime.weights_bytes / 2**20
    return Timing(model, load_seconds, weights, prefill, decode, 0.0, runtime.name)


def compare_models(
    model_a: str,
    model_b: str,
    task: Task,
    settings: EvalSettings,
    store: Path,
    *,
    trust_remote_code: bool = False,
    on_note: Callable[[str], None] | None = None,
    options: tuple[Mapping[str, Any], Mapping[str, Any]] = ({}, {}),
) -> ModelComparison:
    """`task` on both models (`options`: each one's runtime settings: the same model on
    two runtimes is a comparison too)."""
    from muestra.evaluation import prompts
    from muestra.models.loading import check_model_without_download

    for model in (model_a, model_b):  # both refused by name before either loads
        check_model_without_download(model, trust_remote_code=trust_remote_code)
    lang = prompts.language_of(task, settings.language)
    texts = [prompts.chat_question(i, lang, lang.choose) for i in task.items]
    results, timings = [], []
    for model, given in zip((model_a, model_b), options, strict=True):
        timing = measure(model, texts, settings.dtype, trust_remote_code, given)
        result = evaluate(
            model,
            task,
            settings,
            store,
            on_note=on_note,
            trust_remote_code=trust_remote_code,
            model_options=given,
        )
        timing = Timing(**{**asdict(timing), "eval_seconds": result.seconds})
        _store_timing(store, result.run_id, timing)
        result.timing = asdict(timing)
        results.append(result)
        timings.append(timing)
    labels = comparison_labels(model_a, model_b, options)
    if model_a == model_b:  # two runtimes of one model: two bars, two rows, told apart
        for result, label in zip(results, labels, strict=True):
            result.tag = label.removeprefix(model_a).strip(" ()")
    comparison = compare_results(results[0], results[1], *labels)
    by_id = {s.id: s for s in results[1].items}
    side = []
    for a in results[0].items:
        b = by_id.get(a.id)
        if b is None:
            continue
        side.append((a.id, str(a.answer), _shown(a), _shown(b)))
    return ModelComparison(labels, results, comparison, timings, side)


def _store_timing(store: Path, run_id: int, timing: Timing) -> None:
    from muestra.experiments.store import connect, set_eval_timing

    with connect(store) as db:
        set_eval_timing(db, run_id, asdict(timing))


@dataclass
class SpecComparison:
    labels: tuple[str, str]
    store: Path
    run_id: int
    timings: list[Timing]
    side_by_side: list[tuple[str, str, str]]  # prompt, first answer of A, of B


def compare_spec(
    model_a: str,
    model_b: str,
    spec_path: Path,
    store: Path,
    *,
    samples: int | None = None,
    trust_remote_code: bool = False,
    on_progress: Callable[[Any], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    options: tuple[Mapping[str, Any], Mapping[str, Any]] = ({}, {}),
) -> SpecComparison:
    """The experiment of `spec_path` run on both models (one run, [[models]] = A, B, the
    spec's seeds), so `analyze` compares them within each prompt and condition."""
    import tomllib

    from muestra.experiments.prompts import messages_for
    from muestra.experiments.results import samples_frame
    from muestra.experiments.runner import Runner
    from muestra.experiments.spec import load_spec, spec_from_data
    from muestra.experiments.store import reading

    original = load_spec(spec_path, check_models=False)
    data = tomllib.loads(original.text)
    base = dict(data.pop("model", None) or data.pop("models")[0])
    for key in ("endpoint", "api_key_env", "generation_config", "sampling_fallback", "label"):
        base.pop(key, None)
    labels = comparison_labels(model_a, model_b, options)
    data["models"] = [
        {**base, "id": m, "label": label, **given}
        for m, label, given in zip((model_a, model_b), labels, options, strict=True)
    ]
    loaded = spec_from_data(data, original.path)
    texts = []
    for item in loaded.spec.prompt.items:
        prompt = messages_for(loaded, item)
        texts.append(prompt if isinstance(prompt, str) else prompt[-1]["content"])
    timings = [
        measure(m, texts, base.get("dtype", "auto"), trust_remote_code, given)
        for m, given in zip((model_a, model_b), options, strict=True)
    ]
    runner = Runner(
        loaded,
        store,
        samples=samples,
        resume_any=True,
        on_note=on_note,
        trust_remote_code=trust_remote_code,
    )
    with runner:
        run_id = runner.open()
        runner.run(on_progress)
    with reading(store) as db:
        frame = samples_frame(db, run_id)
    side = []
    for prompt_id, rows in frame.groupby("prompt_id", sort=False):
        first = rows[rows["sample"] == rows["sample"].min()]
        by_model = dict(zip(first["model"], first["answer_text"], strict=False))
        side.append((str(prompt_id), by_model.get(labels[0], ""), by_model.get(labels[1], "")))
    # each model's decoding time: its batches' durations (a batch holds one model)
    spent = frame.drop_duplicates(["model", "batch_seconds"]).groupby("model")["batch_seconds"]
    seconds = spent.sum().to_dict()
    timings = [
        Timing(**{**asdict(t), "eval_seconds": float(seconds.get(label, 0.0))})
        for t, label in zip(timings, labels, strict=True)
    ]
    return SpecComparison(labels, store, run_id, timings, side)


@dataclass
class ProbeComparison:
    labels: tuple[str, str]
    store: Path
    run_ids: tuple[int, int]
    comparison: Any  # analysis.probes.ModelComparison
    analyses: list[Any]  # each model's own ProbeAnalysis
    timings: list[Timing]


def compare_probe(
    model_a: str,
    model_b: str,
    probe: Any,
    store: Path,
    *,
    samples: int | None = None,
    trust_remote_code: bool = False,
    on_progress: Callable[[Any], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    options: tuple[Mapping[str, Any], Mapping[str, Any]] = ({}, {}),
) -> ProbeComparison:
    """A free-text probe on both models (one run each, one store, the probe's seeds), each
    model's own group differences, and the difference between the models' gaps within
    each template (`analysis.probes.compare_models`)."""
    from muestra.analysis.probes import compare_models
    from muestra.errors import InputError
    from muestra.evaluation.probes import read_probe, run_probe
    from muestra.experiments.results import samples_frame
    from muestra.experiments.store import reading

    if probe.spec.stop is not None:
        # each model would stop on its own data: the comparison of their gaps assumes the
        # same templates sampled the same number of times, and is not checked otherwise
        raise InputError(
            f"{probe.path}: a probe with [stop] samples each model until its own score is "
            "settled, and `compare --probe` compares the models' gaps at a fixed number of "
            "samples; remove [stop] (or copy the probe without it), or run `muestra probe "
            "--model` once per model"
        )
    labels = comparison_labels(model_a, model_b, options)
    texts = [text for _, _, text in probe.prompts()]
    timings, runs = [], []
    for model, label, given in zip((model_a, model_b), labels, options, strict=True):
        timing = measure(model, texts, "auto", trust_remote_code, given)
        started = time.perf_counter()
        runs.append(
            run_probe(
                probe, store, model=model, samples=samples, on_progress=on_progress,
                on_note=on_note, trust_remote_code=trust_remote_code, model_options=given,
                label=label,
            )
        )  # fmt: skip
        timings.append(Timing(**{**asdict(timing), "eval_seconds": time.perf_counter() - started}))
    with reading(store) as db:
        frame = pd.concat([samples_frame(db, run) for run in runs], ignore_index=True)
        analyses = [read_probe(db, run)[1] for run in runs]  # type: ignore[index]
    comparison = compare_models(frame, labels[0], labels[1], alpha=probe.spec.alpha,
                                seed=probe.spec.seed, language=probe.spec.language)  # fmt: skip
    return ProbeComparison(labels, store, (runs[0], runs[1]), comparison, analyses, timings)


def comparison_labels(
    model_a: str, model_b: str, options: tuple[Mapping[str, Any], Mapping[str, Any]]
) -> tuple[str, str]:
    """Names for the two sides: the models, told apart by their runtime when the same
    model runs twice."""
    if model_a != model_b:
        return model_a, model_b
    runtimes = [given.get("runtime") for given in options]
    if runtimes[0] != runtimes[1]:
        return tuple(f"{model_a} ({r or 'auto'})" for r in runtimes)  # type: ignore[return-value]
    return f"{model_a} (A)", f"{model_b} (B)"


def _shown(score: Any) -> str:
    mark = "✓" if score.correct else "✗"
    p = "" if score.p_correct is None else f" (p {score.p_correct:.2f})"
    return f"{score.predicted} {mark}{p}"
