"""Which distribution `field_probs` describe, checked on the real SmolLM2: answers drawn at
temperature 1 (no filters) after one fixed reasoning trace follow them; answers drawn at
another temperature or with a filter do not. This is what makes the mean of field_probs
an unbiased estimate of an answer's share (Rao–Blackwell) exactly when the answer is
sampled at T 1 without filters, and only then."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from muestra.answers.generation import TextGenerator
from muestra.answers.grammar import GrammarSpec
from muestra.answers.phases import AnswerConfig, ThinkConfig
from muestra.answers.structured import StructuredGenerator
from muestra.engine import SamplingParams

PROMPT = "Create a random RPG character. Is it male or female?"
VALUES = ["male", "female"]


def sampled(smol, answer_params: SamplingParams, n: int, field_probs: bool = True) -> list:
    """`n` answers after one reasoning trace: the trace is greedy (the same text for every
    sample), the answers are drawn with `answer_params` under a male/female choice."""
    generator = StructuredGenerator(smol)
    prompt = TextGenerator(smol).encode_messages([{"role": "user", "content": PROMPT}])
    think = ThinkConfig(params=SamplingParams(temperature=0), budget=16, mode="text")
    found = generator.run(
        [prompt],
        n=n,
        seed=5,
        think=think,
        answer=AnswerConfig(params=answer_params, max_tokens=8),
        grammar=GrammarSpec.choice(VALUES),
        field_probs=field_probs,
    )
    failed = [s.error for s in found if s.error is not None]
    assert len(failed) <= n // 50, failed[:3]  # (a rare long tokenization of a value)
    assert len({s.reasoning for s in found}) == 1  # one fixed trace
    return [s for s in found if s.error is None]


def fit(found: list, probs: dict[str, float]) -> tuple:
    """χ² of the drawn answers against `probs`: (p-value, observed, expected counts)."""
    counts = np.array([sum(s.answer == v for s in found) for v in VALUES])
    expected = np.array([probs[v] for v in VALUES]) * len(found)
    return stats.chisquare(counts, expected).pvalue, counts, expected


@pytest.mark.long
def test_field_probs_describe_answers_drawn_at_temperature_1_and_no_others(smol):
    """200 answers at T 1 after the trace follow its field_probs (measured: 0.55 / 0.45
    male / female); 200 at T 0.25 and 40 with top-k 1 do not (p < 0.001): there the
    field_probs describe another distribution than the answers', and only counting
    estimates their shares. (A top-p filter acts on tokens, not values: at top-p 0.5 both
    values' first tokens can stay in, so its shift is smaller than a value-level cut.)"""
    found = sampled(smol, SamplingParams(temperature=1.0), 200)
    exact = found[0].field_probs["answer"]
    assert all(s.field_probs["answer"] == pytest.approx(exact, abs=1e-4) for s in found)
    assert min(exact.values()) > 0.2, exact  # a balanced choice: a shift would show
    p, counts, expected = fit(found, exact)
    assert p > 0.001, (counts, expected)
    for params, n in ((SamplingParams(temperature=0.25), 200), (SamplingParams(top_k=1), 40)):
        p, counts, expected = fit(sampled(smol, params, n, field_probs=False), exact)
        assert p < 0.001, (params, counts, expected)
