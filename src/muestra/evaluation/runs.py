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
from muestra.experiments.results import samples_frame
from muestra.experiments.spec import AnalysisSpec
from muestra.experiments.stopping import field_probs_notes, stop_note, stop_rows
from muestra.experiments.store import (
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
    store: Path, alpha: float | None = None, run_id: int | None = None
) -> StoredRun:
    """Run `run_id` (default: the latest) of `store`, analysed at `alpha` (default: the
    spec's). A probe's free-text answers are left to its scores."""
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
        notes = field_probs_notes(db, rid) + [n for n in [stop_note(rule)] if n]
    settings = AnalysisSpec.model_validate(tomllib.loads(run["spec_text"]).get("analysis", {}))
    level = alpha if alpha is not None else settings.alpha
    analysis = run_analysis(frame, settings.reference, level, settings.terms)
    analysis.notes += notes
    return StoredRun(run, models, frame, analysis)
