"""Evaluation benchmarks on the real model (SmolLM2-135M-Instruct, fp32), shipped sets.

- loglik: muestra's batched log-likelihood (contexts prefilled once per batch of
  questions, continuations scored from the shared cache) vs the same computation with HF
  one question at a time (the question's options padded into one batch, full forward).
  Both must give the same per-option values (checked), so the ratio compares equal work.
- choice vs draws: the interval of `choice`'s expected accuracy (exact letter
  probabilities, one forward pass per question) vs counting 20 sampled answers per
  question, and the time each takes.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import median_time
from muestra.evaluation import prompts
from muestra.evaluation.evaluate import EvalSettings, evaluate
from muestra.evaluation.loglik import encode_pair, loglikelihoods
from muestra.evaluation.tasks import load_task
from muestra.models.loading import LoadedModel


def _hf_per_question(
    loaded: LoadedModel, questions: list[tuple[str, list[str]]]
) -> list[list[float]]:
    tokenizer, model = loaded.tokenizer, loaded.model
    pad = tokenizer.pad_token_id or 0
    encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    out = []
    with torch.inference_mode():
        for context, conts in questions:
            pairs = [encode_pair(encode, context, c) for c in conts]
            rows = [ctx + cont for ctx, cont in pairs]
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            logprobs = torch.log_softmax(
                model(input_ids=ids, attention_mask=mask).logits.float(), -1
            )
            values = []
            for i, (ctx, cont) in enumerate(pairs):
                values.append(
                    float(sum(logprobs[i, len(ctx) - 1 + j, t] for j, t in enumerate(cont)))
                )
            out.append(values)
    return out


def bench_loglik(loaded: LoadedModel, repeats: int) -> dict[str, Any]:
    encode = lambda t: loaded.tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    result: dict[str, Any] = {}
    for name in ("easy-en", "easy-es"):
        task = load_task(name)
        lang = prompts.language_of(task)
        for fmt in ("cloze", "letters"):
            questions = [
                (prompts.loglik_context(i, fmt, lang), prompts.continuations(i, fmt))
                for i in task.items
            ]
            ours = loglikelihoods(loaded.model, encode, questions)
            theirs = _hf_per_question(loaded, questions)
            worst = max(
                abs(s.loglik - v)
                for row, ref in zip(ours, theirs, strict=True)
                for s, v in zip(row, ref, strict=True)
            )
            assert worst < 1e-3, f"loglik differs from HF by {worst}"
            t_ours, _ = median_time(
                lambda q=questions: loglikelihoods(loaded.model, encode, q), repeats
            )
            t_hf, _ = median_time(lambda q=questions: _hf_per_question(loaded, q), repeats)
            result[f"{name}/{fmt}"] = {
                "muestra_s": t_ours,
                "hf_per_question_s": t_hf,
                "speedup": t_hf / t_ours,
                "max_abs_diff": worst,
            }
    return result


def bench_choice_vs_draws(kit: Path) -> dict[str, Any]:
    task = load_task("easy-en")
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        exact = evaluate(str(kit), task, EvalSettings(method="choice"), Path(tmp) / "a.db")
        t_exact = time.perf_counter() - started
        started = time.perf_counter()
        draws = evaluate(
            str(kit), task, EvalSettings(method="choice", samples=20), Path(tmp) / "b.db"
        )
        t_draws = time.perf_counter() - started
    mean, low, high = exact.expected
    return {
        "expected_accuracy": mean,
        "expected_width": high - low,
        "exact_s": t_exact,
        "draw_accuracy": draws.draws.value,
        "draws_width": draws.draws.high - draws.draws.low,
        "draws_s": t_draws,
        "argmax_accuracy": exact.accuracy.value,
        "argmax_width": exact.accuracy.high - exact.accuracy.low,
    }
