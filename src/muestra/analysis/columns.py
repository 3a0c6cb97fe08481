"""The columns of a run's per-sample frame (`experiments.results.samples_frame`): which
describe the sample and which hold its answer's fields. Here, below both, so the analysis
reads the frame without importing the experiments layer that builds it; and which answer
fields are free text (from the run's JSON Schema when it is known, else from counts)."""

from __future__ import annotations

from typing import Any

import pandas as pd

META = [
    "prompt_id",
    "prompt",
    "group",
    "variant",
    "sample",
    "condition",
    "model",
    "seed",
    "think_budget",
    "reasoning",
    "think_tokens",
    "budget_hit",
    "answer_text",
    "finish_reason",
    "error",
    "prompt_tokens",
    "completion_tokens",
]


# a beam-searched phase's rank, score and log-probability, per phase (when a run has them)
BEAM = [
    f"{phase}_beam_{key}" for phase in ("think", "answer") for key in ("rank", "score", "logprob")
]


def answer_fields(frame: pd.DataFrame) -> list[str]:
    return [
        c
        for c in frame.columns
        if c not in META + BEAM
        and c not in ("field_probs", "scores", "batch_seconds", "endpoint")
        and not c.startswith("var_")
    ]


TEXT_DISTINCT = 10  # without a schema: more distinct values than this is free text

Kind = str  # "categorical" | "text" | "numeric"


def schema_kinds(schema: dict[str, Any] | None) -> dict[str, Kind]:
    """The kind of every answer field a JSON Schema declares, by its column name (nested
    objects flattened as `parent.child`, as the frame does): "categorical" for an enum,
    a const or a boolean, "text" for a string without either, "numeric" for a number or
    integer. Fields the schema does not pin down (unions, arrays) are left out."""
    if not isinstance(schema, dict):
        return {}
    kinds: dict[str, Kind] = {}

    def resolve(node: Any) -> Any:
        while isinstance(node, dict) and isinstance(node.get("$ref"), str):
            path = node["$ref"].removeprefix("#/").split("/")
            target: Any = schema
            for part in path:
                target = target.get(part, {}) if isinstance(target, dict) else {}
            node = target
        return node

    def walk(node: Any, prefix: str) -> None:
        node = resolve(node)
        if not isinstance(node, dict):
            return
        for name, sub in (node.get("properties") or {}).items():
            sub = resolve(sub)
            if not isinstance(sub, dict):
                continue
            column = f"{prefix}{name}"
            if "enum" in sub or "const" in sub or sub.get("type") == "boolean":
                kinds[column] = "categorical"
            elif sub.get("type") == "object" or "properties" in sub:
                walk(sub, f"{column}.")
            elif sub.get("type") == "string":
                kinds[column] = "text"
            elif sub.get("type") in ("integer", "number"):
                kinds[column] = "numeric"

    walk(schema, "")
    return kinds


def is_free_text(valid: pd.DataFrame, name: str, kinds: dict[str, Kind] | None = None) -> bool:
    """Is answer field `name` free text? The schema decides when it declares the field;
    otherwise a non-numeric field without field_probs (those exist only for closed sets)
    with more than `TEXT_DISTINCT` distinct values, or more than half as many distinct
    values as samples, is."""
    if kinds and name in kinds:
        return kinds[name] == "text"
    values = valid[name].dropna()
    if values.empty:
        return False
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return False
    if any(isinstance(p, dict) and name in p for p in valid.get("field_probs", [])):
        return False
    distinct = values.astype(str).nunique()
    return distinct > TEXT_DISTINCT or distinct > max(2, len(values) // 2)
