"""Read a store back: one row per sample as a DataFrame, summaries, exports.

`samples_frame` joins samples with their prompt, model and condition and spreads the
parsed answer into one column per field (seed 000's CSV columns: nombre, sexo, edad,
clase, nivel, prompt_id, prompt), next to sample, condition, model, seed, reasoning,
think_tokens, budget_hit, finish_reason, error.
"""

from __future__ import annotations

import json
import sqlite3
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from muestra.analysis.columns import BEAM, META, answer_fields, is_free_text, schema_kinds
from muestra.errors import InputError
from muestra.experiments.store import latest_run, sample_rows


def _beam_columns(beam_json: str | None) -> dict[str, Any]:
    beam = json.loads(beam_json) if beam_json else {}
    return {
        f"{phase}_beam_{key}": record[source]
        for phase, record in beam.items()
        for key, source in (("rank", "rank"), ("score", "score"), ("logprob", "sum_logprob"))
    }


def _prompt_text(messages_json: str) -> str:
    messages = json.loads(messages_json)
    if isinstance(messages, str):
        return messages
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def samples_frame(db: sqlite3.Connection, run_id: int | None = None) -> pd.DataFrame:
    run_id = run_id if run_id is not None else int(latest_run(db)["id"])
    rows = sample_rows(db, run_id)
    records = []
    for row in rows:
        answer = json.loads(row["answer_json"]) if row["answer_json"] else None
        record: dict[str, Any] = {}
        if isinstance(answer, dict):
            record.update(_flatten(answer))
        elif answer is not None:
            record["answer"] = answer
        variables = json.loads(row["variables_json"])
        record.update(
            {
                "prompt_id": row["prompt_key"],
                "prompt": _prompt_text(row["messages_json"]),
                "group": row["group_name"],
                "variant": row["variant"],
                "sample": row["sample_index"],
                "condition": row["condition_label"],
                "model": row["model_label"],
                "seed": row["seed"],
                "think_budget": row["think_budget"],
                "reasoning": row["reasoning"],
                "think_tokens": row["think_tokens"],
                "budget_hit": bool(row["budget_hit"]),
                "answer_text": row["answer_text"],
                "finish_reason": row["finish_reason"],
                "error": row["error"],
                "prompt_tokens": row["prompt_tokens"],
                "completion_tokens": row["completion_tokens"],
                "field_probs": json.loads(row["field_probs_json"])
                if row["field_probs_json"]
                else None,
                "batch_seconds": row["batch_seconds"],
                "scores": json.loads(row["scores_json"]) if row["scores_json"] else None,
            }
        )
        if row["endpoint"] is not None:  # a remote sample: the endpoint that answered it
            record["endpoint"] = row["endpoint"]
        record.update(_beam_columns(row["beam_json"]))
        record.update({f"var_{k}": v for k, v in variables.items()})
        records.append(record)
    frame = pd.DataFrame.from_records(records)
    if frame.empty:
        return pd.DataFrame(columns=META)
    for column in BEAM[::3]:  # the ranks: integers, missing where not beams
        if column in frame.columns:
            frame[column] = frame[column].astype("Int64")
    fields = answer_fields(frame)
    return frame[
        fields
        + META
        + [c for c in BEAM if c in frame.columns]
        + [c for c in frame.columns if c.startswith("var_")]
        + ["field_probs", "scores", "batch_seconds"]
    ]


def _flatten(answer: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in answer.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        elif isinstance(value, list):
            flat[name] = json.dumps(value, ensure_ascii=False)
        else:
            flat[name] = value
    return flat


TEXT_TOP = 5  # the most frequent values a free-text summary lists


def run_schema(run: Mapping[str, Any]) -> dict[str, Any] | None:
    """The JSON Schema a run's answers follow: as the run stored it, else (a run stored
    before muestra kept it) the spec's inline schema or its schema file beside the spec,
    if it is still there; None when there is none or it cannot be found."""
    keys = run.keys() if hasattr(run, "keys") else []
    if "answer_schema_json" in keys and run["answer_schema_json"]:
        return json.loads(run["answer_schema_json"])
    try:
        given = tomllib.loads(run["spec_text"]).get("answer", {}).get("schema")
    except tomllib.TOMLDecodeError:
        return None
    if isinstance(given, dict):
        return given
    if isinstance(given, str):
        path = Path(run["spec_path"]).parent / given
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    return None


def summarize(
    frame: pd.DataFrame,
    by: str = "prompt",
    field: str | None = None,
    schema: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Counts/proportions per categorical value, numeric descriptions, mean field_probs,
    budget-hit and error rates, per group of `by` (prompt | model | condition).

    A free-text field (names, say) — a string without enum or const in the run's `schema`,
    or without a schema as `analysis.columns.is_free_text` decides from the counts, the
    same rule `muestra analyze` follows — is kind "text", with its number of distinct
    values and the `TEXT_TOP` most frequent, instead of one row per value. The kind is
    decided once per field, so it is the same in every group."""
    key = {"prompt": "prompt_id", "model": "model", "condition": "condition"}.get(by)
    if key is None:
        raise InputError(f"--by {by!r} must be prompt, model or condition")
    fields = answer_fields(frame)
    if field is not None:
        if field not in fields:
            raise InputError(
                f"--field {field!r} is not an answer field; fields: {', '.join(fields)}"
            )
        fields = [field]
    valid_all = frame[frame["error"].isna()]
    kinds = schema_kinds(schema)
    text = {c for c in fields if is_free_text(valid_all, c, kinds)}
    groups = {}
    for name, group in frame.groupby(key, sort=False):
        valid = group[group["error"].isna()]
        entry: dict[str, Any] = {
            "samples": len(group),
            "valid": len(valid),
            "error_rate": float(group["error"].notna().mean()),
            "budget_hit_rate": float(group["budget_hit"].mean()),
            "mean_think_tokens": float(group["think_tokens"].mean()),
            "fields": {},
        }
        for column in fields:
            values = valid[column].dropna()
            if values.empty:
                continue
            entry["fields"][column] = _described(values, column in text)
            probs = _mean_field_probs(valid, column)
            if probs:
                entry["fields"][column]["mean_field_probs"] = probs
        groups[str(name)] = entry
    seconds = frame.drop_duplicates("batch_seconds")["batch_seconds"].sum() if len(frame) else 0
    return {
        "by": by,
        "groups": groups,
        "samples": len(frame),
        "throughput": {
            "samples_per_s": float(len(frame) / seconds) if seconds else None,
            "tokens_per_s": float(frame["completion_tokens"].sum() / seconds) if seconds else None,
        },
    }


def _described(values: pd.Series, text: bool) -> dict[str, Any]:
    """One field's valid values in a group: numeric, free text or categorical."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return {
            "kind": "numeric",
            "mean": float(values.mean()),
            "sd": float(values.std()) if len(values) > 1 else 0.0,
            "min": float(values.min()),
            "max": float(values.max()),
            "n": int(len(values)),
        }
    counts = values.astype(str).value_counts()
    if text:
        return {
            "kind": "text",
            "distinct": int(len(counts)),
            "top": [
                {"value": str(k), "count": int(v), "proportion": float(v / len(values))}
                for k, v in counts.head(TEXT_TOP).items()
            ],
            "n": int(len(values)),
        }
    return {
        "kind": "categorical",
        "counts": {str(k): int(v) for k, v in counts.items()},
        "proportions": {str(k): float(v / len(values)) for k, v in counts.items()},
        "n": int(len(values)),
    }


def _mean_field_probs(frame: pd.DataFrame, column: str) -> dict[str, float]:
    dists = [fp[column] for fp in frame["field_probs"] if isinstance(fp, dict) and column in fp]
    if not dists:
        return {}
    keys = sorted({k for d in dists for k in d})
    return {k: float(sum(d.get(k, 0.0) for d in dists) / len(dists)) for k in keys}


def export(frame: pd.DataFrame, fmt: str, path: Path) -> Path:
    path = Path(path)
    out = frame.drop(columns=["batch_seconds"]).copy()
    out["field_probs"] = out["field_probs"].map(
        lambda v: json.dumps(v, ensure_ascii=False) if v is not None else None
    )
    # scores (rewards, a probe's lexicon counts, phrase, judge answers…) as columns too:
    # score.lexicon.care, score.judge.probs.sentiment.negative, …
    if "scores" in out.columns:
        flat = [_flatten(s, "score.") if isinstance(s, dict) else {} for s in out["scores"]]
        scores = pd.DataFrame.from_records(flat, index=out.index)
        out["scores"] = out["scores"].map(
            lambda v: json.dumps(v, ensure_ascii=False) if v is not None else None
        )
        out = pd.concat([out, scores], axis=1)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "csv":
            out.to_csv(path, index=False)
        elif fmt == "parquet":
            out.to_parquet(path, index=False)
        elif fmt == "jsonl":
            out.to_json(path, orient="records", lines=True, force_ascii=False)
        else:
            raise InputError(f"--format {fmt!r} must be csv, parquet or jsonl")
    except OSError as err:
        raise InputError(f"cannot write {path}: {err}") from err
    return path
