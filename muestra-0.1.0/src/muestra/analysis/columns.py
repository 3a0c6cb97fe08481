"""The columns of a run's per-sample frame (`experiments.results.samples_frame`): which
describe the sample and which hold its answer's fields. Here, below both, so the analysis
reads the frame without importing the experiments layer that builds it."""

from __future__ import annotations

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
