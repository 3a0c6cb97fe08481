"""A stored run read back for analysis: its row, its models' provenance, its samples and
their `Analysis` — what `muestra analyze`, `muestra report` and the notebook API show."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from muestra.analysis import Analysis
from muestra.analysis import analyze as run_analysis
from muestra.evaluation.probes import probe_of_run
from muestra.experiments.results import run_schema, samples_frame
from muestra.experiments.spec import AnalysisSpec
from muestra.experiments.stop_rules import field_probs_caveat
from muestra.experiments.stopping import field_probs_notes, stop_note, stop_rows
from muestra.experiments.store import (
    condition_rows,
    reading,
    require_samples,
    run_by_id,
    run_models,
    run_state,
    unfinished_warning,
)


@dataclass
class StoredRun:
    run: dict[str, Any]  # the run's row, with "run_status" and "unfinished" (a warning or None)
    models: list[dict[str, Any]]  # provenance, label and model_ref of each model
    frame: pd.DataFrame  # one row per sample
    analysis: Analysis


def stored_analysis(
    store: Path, alpha: float | None = None, run_id: int | None = None, lang: str | None = None
) -> StoredRun:
    """Run `run_id` (default: the latest) of `store`, analysed at `alpha` (default: the
    spec's), its sentences in `lang` (default: the spec's `[analysis] language`). The
    run's schema says which fields are free text; a probe's free-text answers are left to
    its scores."""
    with reading(store) as db:
        run = dict(run_by_id(db, run_id))  # None: the latest
        rid = int(run["id"])
        frame = samples_frame(db, rid)
        if "answer" in frame.columns and probe_of_run(db, rid) is not None:
            frame = frame.drop(columns=["answer"])  # free text: the probe's scores analyse it
        require_samples(db, rid)
        status, reason = run_state(db, rid)
        run["run_status"] = {"status": status, "reason": reason}
        run["unfinished"] = unfinished_warning(db, rid)
        exact = exact_conditions(condition_rows(db, rid))
        models = [
            {
                **json.loads(row["provenance_json"] or "{}"),
                "label": row["label"],
                "model_ref": row["model_ref"],
            }
            for row in run_models(db, rid)
        ]
        rule, stops = stop_rows(db, rid)
        run["stops"] = {"rule": rule, "cells": stops}  # a sequential run's stops
        settings = AnalysisSpec.model_validate(tomllib.loads(run["spec_text"]).get("analysis", {}))
        lang = lang or settings.language
        notes = field_probs_notes(db, rid, lang) + [n for n in [stop_note(rule, lang)] if n]
    level = alpha if alpha is not None else settings.alpha
    found = run_analysis(frame, settings.reference, level, settings.terms,
                         schema=run_schema(run), lang=lang, exact=exact)  # fmt: skip
    found.notes += notes
    return StoredRun(run, models, frame, found)


def exact_conditions(rows: list[Any]) -> set[str]:
    """Conditions whose answer is drawn from the distribution field_probs describe: sampled
    at temperature 1 with no truncation, no beams and no DoLa (`field_probs_caveat`)."""
    from muestra.experiments.spec import AnswerSpec

    exact = set()
    for row in rows:
        # as stored (not validated again: a store may predate a field's current checks)
        answer = AnswerSpec.model_construct(**json.loads(row["answer_json"] or "{}"))
        if field_probs_caveat(answer) is None:
            exact.add(str(row["label"]))
    return exact
