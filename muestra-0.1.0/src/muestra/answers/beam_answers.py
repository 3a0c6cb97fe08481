"""The k most likely complete answers under a grammar, by beam search.

`beam_answers(generator, prompt_ids, grammar, params)` runs `engine.beam.beam_search` on
the answer with a mask that lets each beam continue only as its grammar allows: before
every step each beam's xgrammar matcher is rebuilt from the compiled grammar by
accepting the beam's tokens so far (beams are reordered every step and a matcher cannot
be copied; replaying a few dozen tokens costs microseconds), then the allowed-token
bitmask sets every other log-probability to -inf — after the log-softmax, as HF applies
its processors in beam search, so a hypothesis' `sum_logprob` is the model's own
log-probability of that token sequence, `exp(sum_logprob)` its probability. The added
tokens that may never appear in an answer are masked too.

Every returned answer is complete (it ended with an EOS the grammar allowed) or carries
an error (the token budget ran out), and is parsed and validated like a sampled one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from muestra.answers.grammar import GrammarSpec
from muestra.answers.structured import StructuredGenerator, parse_answer
from muestra.engine import GenerationRequest
from muestra.engine.beam import BeamParams, beam_search


@dataclass
class BeamAnswer:
    rank: int
    answer_text: str
    answer: Any
    error: str | None
    token_ids: list[int]
    score: float  # sum_logprob / length ** length_penalty
    sum_logprob: float
    probability: float  # exp(sum_logprob): the model's probability of these tokens
    finish_reason: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "sample": self.rank,
            "answer_text": self.answer_text,
            "answer": self.answer,
            "error": self.error,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "beam": {
                "rank": self.rank,
                "score": self.score,
                "sum_logprob": self.sum_logprob,
                "probability": self.probability,
            },
        }


class GrammarBeamMask:
    """`beam_search`'s mask: each beam's grammar state, rebuilt from its tokens."""

    def __init__(self, generator: StructuredGenerator, grammar: GrammarSpec) -> None:
        self.backend = generator.backend
        self.compiled = self.backend.compile(grammar)

    def __call__(self, logprobs: torch.Tensor, prefixes: list[list[int]]) -> None:
        matchers, live = [], []
        for row, prefix in enumerate(prefixes):
            matcher = self.backend.matcher(self.compiled)
            # with fewer valid continuations than beams, a running beam may hold a refused
            # token or an EOS (and a score of -inf or -1e9): it may not continue either
            if all(matcher.accept_token(token) for token in prefix) and not (
                matcher.is_terminated()
            ):
                matchers.append(matcher)
                live.append(row)
            else:
                logprobs[row] = float("-inf")
        if live:
            self.backend.fill_and_apply(logprobs, matchers, live)


def beam_answers(
    generator: StructuredGenerator,
    prompt_ids: list[int],
    grammar: GrammarSpec | None,
    params: BeamParams,
    max_tokens: int = 256,
) -> list[BeamAnswer]:
    """The `params.num_return_sequences` best answers, best first."""
    return beam_answer_batch(generator, [prompt_ids], grammar, params, max_tokens)[0]


def beam_answer_batch(
    generator: StructuredGenerator,
    prompts: list[list[int]],
    grammar: GrammarSpec | None,
    params: BeamParams,
    max_tokens: int = 256,
) -> list[list[BeamAnswer]]:
    """The best `params.num_return_sequences` distinct answers of several prompts (their
    beams in one batch), best first. Beams are token sequences, and the same text may come
    out of two tokenizations ("no" and "n"+"o"): only the best-scoring one of a text is
    kept, so fewer answers than asked may come back (raise num_beams for more). Without a
    grammar the answer is plain beam-searched text (the model's EOS ends it)."""
    mask = GrammarBeamMask(generator, grammar) if grammar is not None else None
    requests = [GenerationRequest(list(p), max_new_tokens=max_tokens) for p in prompts]
    every = replace(params, num_return_sequences=params.num_beams)
    searched = beam_search(generator.text.engine, requests, every, mask=mask)
    decode = generator.text.token_bytes
    results = []
    for hypotheses in searched:
        answers: list[BeamAnswer] = []
        seen: set[str] = set()
        for h in hypotheses:
            ids = h.token_ids[:-1] if h.finish_reason == "stop" else h.token_ids
            text = b"".join(decode[t] for t in ids).decode("utf-8", errors="replace")
            if text in seen or len(answers) == params.num_return_sequences:
                continue
            seen.add(text)
            answer, error = None, None
            if grammar is not None:
                answer, _, error = parse_answer(text, h.finish_reason, grammar)
            answers.append(
                BeamAnswer(
                    rank=len(answers),
                    answer_text=text,
                    answer=answer,
                    error=error,
                    token_ids=h.token_ids,
                    score=h.score,
                    sum_logprob=h.sum_logprob,
                    probability=math.exp(h.sum_logprob),
                    finish_reason=h.finish_reason,
                )
            )
        results.append(answers)
    return results
