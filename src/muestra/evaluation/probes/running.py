"""What a probe runs: its experiment, the model-free scores and the judge, all into the
run's store (see the package doc)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from muestra.analysis.probe_scores import (
    CONTINUATION,
    EXTRACTION,
    JUDGE,
    LEXICON,
    tracked_score,
)
from muestra.analysis.text import Lexicon, extract_phrase
from muestra.errors import InputError
from muestra.evaluation.probes.schema import Probe, ProbeStop
from muestra.experiments.planning import split_budget
from muestra.experiments.run_settings import samples_per_cell
from muestra.experiments.spec import (
    LoadedSpec,
    StopSpec,
    spec_from_data,
)
from muestra.experiments.stop_rules import PROBE_SCORE
from muestra.experiments.store import (
    mark_judge,
    mark_run,
    merge_scores,
    record_probe,
    sample_rows,
)
from muestra.settings import changed_table, sampling_table

# ---- the experiment a probe runs ---------------------------------------------------------


def experiment(
    probe: Probe,
    model: str | None = None,
    dtype: str | None = None,
    samples: int | None = None,
    model_options: Mapping[str, Any] | None = None,
    label: str | None = None,
) -> LoadedSpec:
    """The experiment spec that samples `probe` (one prompt item per template × group);
    `model_options`: [model] fields such as runtime and threads; `label`: the model's name
    in the results."""
    spec = probe.spec
    if model is not None:
        model_data: dict[str, Any] = {"id": model}
    elif spec.model is not None:
        model_data = spec.model.model_dump(exclude_none=True)
    else:
        raise InputError(f"{probe.path}: give the model to probe with --model (or [model])")
    samples_per_cell(samples, spec.samples, spec.stop)  # --samples against [stop]'s cap
    if dtype is not None:
        model_data["dtype"] = dtype
    model_data.update(model_options or {})
    if label is not None:
        model_data["label"] = label
    items = [
        {"id": f"{t.id}/{g.id}", "group": t.id, "variant": g.id, "text": text}
        for t, g, text in probe.prompts()
    ]
    prompt: dict[str, Any] = {"user": "{text}" if spec.mode == "raw" else spec.instruction}
    prompt |= {"raw": spec.mode == "raw", "items": items}
    if spec.system is not None and spec.mode == "chat":
        prompt["system"] = spec.system
    d = spec.decoding
    data = {
        "name": f"probe {spec.name}",
        "seed": spec.seed,
        "samples": samples if samples is not None else spec.samples,
        "model": model_data,
        "prompt": prompt,
        "answer": {
            # the four settings a probe's spec always wrote (its text is the run's identity)
            **sampling_table(
                temperature=d.temperature, top_p=d.top_p, top_k=d.top_k, min_p=d.min_p
            ),
            **changed_table(d),
            "max_tokens": d.max_tokens,
            "stop": d.stop,
            "field_probs": False,
        },
    }
    loaded = spec_from_data(data, probe.path, check_models=model is None)
    if spec.stop is None:
        return loaded
    return replace(loaded, spec=loaded.spec.model_copy(update={"stop": stop_rule(spec.stop)}))


def stop_rule(stop: ProbeStop) -> StopSpec:
    """The experiment's `[stop]` rule of a probe's: its score counted per template × group
    cell, or a difference of two groups (the items' variants) within each template."""
    return StopSpec(
        field=PROBE_SCORE,
        value=stop.score,
        estimator="counts",  # a score of free text has no exact probability
        **stop.model_dump(exclude={"score"}),
    )


def stop_values(probe: Probe) -> Callable[[Any, Any], tuple[float, None] | None]:
    """The runner's `stop_value` for a sequential probe: a stored sample's value of the
    tracked score (None: a sample without a continuation), each sample scored once."""
    assert probe.spec.stop is not None
    score = probe.spec.stop.score
    lexicon = Lexicon(probe.lexicon, probe.normaliser) if probe.lexicon else None
    seen: dict[tuple[str, int], tuple[float, None] | None] = {}

    def value(item: Any, row: Any) -> tuple[float, None] | None:
        key = (item.id, row["sample_index"])
        if key not in seen:
            seen[key] = None
            if row["error"] is None and row["answer_text"] is not None:
                text = item.variables["text"]
                scores = sample_scores(probe, text, row["answer_text"], lexicon)
                seen[key] = (tracked_score(scores, score), None)
        return seen[key]

    return value


def continuation(probe: Probe, prompt: str, answer: str) -> str:
    """The words that continue the template: in chat mode a reply that repeats the
    template first has it removed."""
    if probe.spec.mode == "chat":
        stripped = answer.lstrip(" \"'“«")
        if stripped.lower().startswith(prompt.lower()):
            rest = stripped[len(prompt) :]
            quoted = len(stripped) < len(answer.lstrip(" "))
            return rest.rstrip("\"'”»") if quoted else rest
    return answer


def run_probe(
    probe: Probe,
    store: Path,
    *,
    model: str | None = None,
    dtype: str | None = None,
    samples: int | None = None,
    batch_rows: int | None = None,
    on_progress: Callable[[Any], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    trust_remote_code: bool = False,
    model_options: Mapping[str, Any] | None = None,
    label: str | None = None,
    judged: bool = False,
) -> int:
    """Sample the probe into `store` (or resume it) and score its samples; the run id.
    `judged`: a judge follows (`judge_store`), and the run stays "running" until it ends."""
    from muestra.experiments.runner import Runner

    options, budget = split_budget(model_options)
    loaded = experiment(probe, model, dtype, samples, options, label)
    local = any(m.endpoint is None for m in loaded.spec.model_list)
    runner = Runner(
        loaded,
        Path(store),
        resume_any=True,
        batch_rows=batch_rows,
        model_options=budget,
        on_note=on_note,
        # an endpoint probe's judge may be local: the flag is the judge's then
        trust_remote_code=trust_remote_code and (local or not judged),
        stop_value=stop_values(probe) if probe.spec.stop is not None else None,
    )
    with runner:
        run_id = runner.open()
        assert runner.db is not None
        record_probe(runner.db, run_id, probe.spec.name, str(probe.path), probe.text, probe.hash)
        with runner.tracking():
            runner.run(on_progress)
            score_store(runner.db, run_id, probe)
            if judged:  # the probe is done when its judge is: `judge_store` says so
                mark_run(runner.db, run_id, "running")
    return run_id


# ---- scores ------------------------------------------------------------------------------


def sample_scores(
    probe: Probe, prompt: str, answer: str, lexicon: Lexicon | None
) -> dict[str, Any]:
    """The model-free scores of one continuation, each scorer's record under its key
    (`analysis/probe_scores.py`, which also reads them back)."""
    text = continuation(probe, prompt, answer)
    scores: dict[str, Any] = {CONTINUATION: text}
    if lexicon is not None:
        scores[LEXICON.key] = LEXICON.record(text, lexicon)
    if probe.spec.extraction.enabled:
        phrase = extract_phrase(text, probe.normaliser, probe.spec.extraction.max_words)
        category = lexicon.category_of(phrase) if lexicon is not None and phrase else None
        scores[EXTRACTION.key] = EXTRACTION.record(phrase, category)
    return scores


def score_store(db: sqlite3.Connection, run_id: int, probe: Probe) -> int:
    """Write the model-free scores of every sample of the run; the number scored."""
    lexicon = Lexicon(probe.lexicon, probe.normaliser) if probe.lexicon else None
    rows = sample_rows(db, run_id, order="written")
    scores = {
        row["id"]: sample_scores(
            probe, json.loads(row["variables_json"])["text"], row["answer_text"], lexicon
        )
        for row in rows
    }
    merge_scores(db, run_id, scores)
    return len(rows)


def judge_spec(probe: Probe, db: sqlite3.Connection, run_id: int, model: str | None) -> LoadedSpec:
    """The experiment that judges the run's continuations: one item per sample."""
    judge = probe.spec.judge
    assert judge is not None and probe.judge_schema is not None
    items = []
    for row in sample_rows(db, run_id, order="written"):
        if row["error"] is not None:
            continue
        prompt = json.loads(row["variables_json"])["text"]
        text = continuation(probe, prompt, row["answer_text"])
        items.append(
            {"id": f"s{row['id']}", "prompt": prompt, "continuation": text, "text": prompt + text}
        )
    if not items:
        raise InputError(f"run {run_id} has no valid continuation to judge")
    model_data: dict[str, Any] = {"id": model}
    if judge.endpoint is not None:
        model_data["endpoint"] = judge.endpoint
    prompt_data: dict[str, Any] = {"user": judge.user, "items": items}
    if judge.system is not None:
        prompt_data["system"] = judge.system
    data = {
        "name": f"judge {probe.spec.name} run {run_id}",
        "seed": probe.spec.seed,
        "samples": 1,
        "model": model_data,
        "prompt": prompt_data,
        "answer": {
            **sampling_table(temperature=0.0),  # the judge answers greedily
            "max_tokens": judge.max_tokens,
            "schema": probe.judge_schema,
            "field_probs": judge.field_probs,
        },
    }
    return spec_from_data(data, probe.path, check_models=False)


def judge_store(
    probe: Probe,
    store: Path,
    run_id: int,
    *,
    model: str,
    on_progress: Callable[[Any], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    trust_remote_code: bool = False,
    model_options: Mapping[str, Any] | None = None,
) -> int:
    """Judge every valid continuation of probe run `run_id` with `model` (resumable: the
    judge is a run of its own); each answer and its field probabilities go into the
    judged sample's scores. Returns the judge's run id."""
    from muestra.experiments.runner import Runner
    from muestra.experiments.store import reading

    with reading(Path(store)) as db:
        loaded = judge_spec(probe, db, run_id, model)
    runner = Runner(
        loaded,
        Path(store),
        resume_any=True,
        on_note=on_note,
        trust_remote_code=trust_remote_code,
        model_options=model_options,
    )
    with runner:
        judge_run = runner.open()
        assert runner.db is not None
        mark_judge(runner.db, judge_run, run_id)
        try:
            with runner.tracking():
                runner.run(on_progress)
                copy_judgements(runner.db, run_id, judge_run, model)
        except BaseException as err:
            if runner.db is not None:
                why = "interrupted (Ctrl-C)" if isinstance(err, KeyboardInterrupt) else str(err)
                mark_run(runner.db, run_id, "failed", f"its judge (run {judge_run}) failed: {why}")
            raise
        mark_run(runner.db, run_id, "done")
    return judge_run


def copy_judgements(db: sqlite3.Connection, run_id: int, judge_run: int, model: str) -> None:
    judged = {
        int(row["prompt_key"].removeprefix("s")): {
            JUDGE.key: JUDGE.record(
                json.loads(row["answer_json"]) if row["answer_json"] else None,
                json.loads(row["field_probs_json"]) if row["field_probs_json"] else None,
                row["error"],
                model,
                judge_run,
            )
        }
        for row in sample_rows(db, judge_run, order="written")
    }
    merge_scores(db, run_id, judged)
