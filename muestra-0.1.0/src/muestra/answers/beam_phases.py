"""Beam search in the phases: the reasoning, the answer under its grammar, or both.

`run_beam_phases` is `StructuredGenerator.run` for conditions that beam-search a phase;
it returns the same `StructuredSample`s, each with a `beam` record of its scores.

- **Think beams** (`think_beams`): the reasoning of each prompt is beam-searched as a
  sequence that ends on `</think>` (tags mode; the model's EOS ids are masked, as in a
  sampled think phase) or on the model's EOS (plain-text mode), within the think budget
  (`max_new_tokens`). A hypothesis that ends on its own is closed as a sampled row is
  (`\\n\\n` after `</think>`; the closing text after a text-mode EOS); one that reaches the
  budget gets the closing text (`budget_hit`). All running beams have the same length,
  so the budget applies to each beam alike. A hybrid template that did not open the
  think block gets its open tag first, as a sampled row does. Each of the best
  `num_return_sequences` reasonings is then answered: sampled or greedy (its seed is the
  one sample index `rank` would get), or by answer beams.
- **Answer beams** (`answer_beams`): the answer is beam-searched under the grammar
  (`beam_answer_batch`: the most likely complete valid answers). After a sampled think
  phase (the phase controller ends each row once its closing text is in), each sample's
  answer is its best beam; without a think phase the prompt's best distinct answers
  are the samples, ranked (a beam spelling the same text through other tokens is
  dropped, so `num_beams` may need to exceed the samples).

Samples are numbered by rank where beams make them (think beams; answer beams without a
think phase) and by sample index otherwise. `beam` holds, per beam-searched phase,
`rank`, `score` (`sum_logprob / length ** length_penalty`) and `sum_logprob` (the model's
log-probability of that phase's generated tokens; forced tokens are not part of it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any

import torch

from muestra.answers.beam_answers import BeamAnswer, beam_answer_batch
from muestra.answers.grammar import GrammarSpec
from muestra.answers.phases import AnswerConfig, PhaseController, PhaseState, ThinkConfig
from muestra.answers.structured import StructuredGenerator, StructuredSample
from muestra.engine import GenerationRequest
from muestra.engine.beam import BeamParams, Hypothesis, beam_search
from muestra.engine.seeds import sample_seed
from muestra.errors import InputError

__all__ = ["ThinkBeam", "run_beam_phases", "sampled_reasonings", "think_beams"]


@dataclass
class ThinkBeam:
    """One beam-searched reasoning, closed and ready to answer."""

    rank: int
    prefix_ids: list[int]  # forced before the reasoning (a hybrid model's open tag)
    reasoning_ids: list[int]  # the searched tokens, without the token that ended them
    end_ids: list[int]  # that token (`</think>` or a text-mode EOS), if it ended itself
    closing_ids: list[int]  # forced after it: "\n\n" or the closing text
    budget_hit: bool
    score: float
    sum_logprob: float

    @property
    def token_ids(self) -> list[int]:
        return self.prefix_ids + self.reasoning_ids + self.end_ids + self.closing_ids

    def record(self) -> dict[str, Any]:
        return {"rank": self.rank, "score": self.score, "sum_logprob": self.sum_logprob}


class _NoEndMask:
    """Tags mode: a reasoning may not end the message (EOS ids -inf), as when sampled."""

    def __init__(self, eos_ids: Sequence[int]) -> None:
        self.eos_ids = sorted(eos_ids)

    def __call__(self, logprobs: torch.Tensor, prefixes: list[list[int]]) -> None:
        logprobs[:, self.eos_ids] = float("-inf")


def think_beams(
    generator: StructuredGenerator,
    prompts: Sequence[Sequence[int]],
    think: ThinkConfig,
    params: BeamParams,
) -> list[list[ThinkBeam] | None]:
    """The best reasonings of each prompt, best first; None for a prompt that has no think
    phase (a model without think tags in tags mode, or a prompt that closed the block)."""
    think = generator.resolve_think(think)
    assert think is not None
    tags = generator.tag_ids(think)
    eos = generator.loaded.eos_token_ids
    controller = PhaseController(think, AnswerConfig(), tags, eos)
    results: list[list[ThinkBeam] | None] = [None] * len(prompts)
    searched, prefixes = [], {}
    for index, prompt in enumerate(prompts):
        start = controller.first_phase(prompt) if tags is not None else "answer"
        if start == "answer":
            continue
        assert tags is not None
        prefixes[index] = list(tags.open_ids) if start == "open" else []
        searched.append(index)
    if not searched:
        return results
    assert tags is not None
    requests = [
        GenerationRequest(
            list(prompts[i]) + prefixes[i], max_new_tokens=max(1, think.budget)
        )  # fmt: skip
        for i in searched
    ]
    if tags.text:
        found = beam_search(generator.text.engine, requests, params)
    else:
        assert tags.close_id is not None
        found = beam_search(
            generator.text.engine,
            requests,
            params,
            mask=_NoEndMask(eos),
            eos_token_ids=[tags.close_id],
        )
    for index, hypotheses in zip(searched, found, strict=True):
        results[index] = [_closed(h, prefixes[index], tags) for h in hypotheses]
    return results


def _closed(h: Hypothesis, prefix: list[int], tags: Any) -> ThinkBeam:
    ended = h.finish_reason == "stop"
    reasoning = h.token_ids[:-1] if ended else h.token_ids
    # "\n\n" after a </think> the model wrote; the closing text after a text-mode EOS or
    # at the budget
    closing = list(tags.after_close_ids if ended and not tags.text else tags.close_ids)
    return ThinkBeam(
        rank=h.rank,
        prefix_ids=prefix,
        reasoning_ids=reasoning,
        end_ids=h.token_ids[-1:] if ended else [],
        closing_ids=closing,
        budget_hit=not ended,
        score=h.score,
        sum_logprob=h.sum_logprob,
    )


def run_beam_phases(
    generator: StructuredGenerator,
    prompts: Sequence[Sequence[int]],
    *,
    counts: Sequence[int],
    seed: int,
    first_samples: Sequence[int] | None = None,
    prompt_indices: Sequence[int] | None = None,
    think: ThinkConfig | None = None,
    think_beams_params: BeamParams | None = None,
    answer: AnswerConfig | None = None,
    answer_beams: BeamParams | None = None,
    grammar: GrammarSpec | None = None,
    field_probs: bool = True,
) -> list[StructuredSample]:
    """Samples `first_samples[i] … + counts[i] - 1` of each prompt (see the module
    docstring for what a sample is when a phase is beam-searched)."""
    answer = answer or AnswerConfig()
    firsts = list(first_samples or [0] * len(prompts))
    indices = list(prompt_indices or range(len(prompts)))
    think = generator.resolve_think(think)
    reasonings: list[list[ThinkBeam] | None] = [None] * len(prompts)
    if think is not None and think_beams_params is not None:
        wanted = max(f + c for f, c in zip(firsts, counts, strict=True))
        beams = replace(think_beams_params, num_return_sequences=wanted)
        _check_rows(beams, wanted, "think")
        reasonings = think_beams(generator, prompts, think, beams)
        think = None  # the prompts without a think phase answer directly
    # the contexts to answer: (prompt position, sample index, context ids, reasoning)
    contexts: list[tuple[int, int, list[int], ThinkBeam | StructuredSample | None]] = []
    for i, prompt in enumerate(prompts):
        ranks = range(firsts[i], firsts[i] + counts[i])
        found = reasonings[i]
        if found is not None:
            if len(found) < len(ranks) + firsts[i]:
                raise RuntimeError(f"prompt {indices[i]}: only {len(found)} reasoning beams")
            contexts += [(i, r, list(prompt) + found[r].token_ids, found[r]) for r in ranks]
        else:  # answered directly, or after a reasoning sampled below
            contexts += [(i, r, list(prompt), None) for r in ranks]
    if answer_beams is None:
        return _answer_by_sampling(
            generator, contexts, prompts, indices, seed, think, answer, grammar, field_probs
        )
    if think is not None:  # sample the reasoning; the rows end once it is closed
        contexts = sampled_reasonings(generator, contexts, indices, seed, think, answer)
    return _answer_by_beams(
        generator, contexts, prompts, indices, seed, answer, answer_beams, grammar, field_probs
    )


def _check_rows(params: BeamParams, wanted: int, phase: str) -> None:
    if wanted > params.num_beams:
        raise InputError(
            f"{wanted} samples of a prompt need {wanted} {phase} beams but num_beams = "
            f"{params.num_beams}: a beam search returns at most num_beams sequences; lower "
            "the samples or raise num_beams"
        )


def _answer_by_sampling(
    generator: StructuredGenerator,
    contexts: list[tuple[int, int, list[int], Any]],
    prompts: Sequence[Sequence[int]],
    indices: list[int],
    seed: int,
    think: ThinkConfig | None,
    answer: AnswerConfig,
    grammar: GrammarSpec | None,
    field_probs: bool,
) -> list[StructuredSample]:
    """The answers after beam-searched reasonings: each context sampled once, with the
    seed its sample index gets (the ordinary pipeline: grammar, field_probs)."""
    samples = generator.run(
        [c[2] for c in contexts],
        seed=seed,
        first_samples=[c[1] for c in contexts],
        counts=[1] * len(contexts),
        prompt_indices=[indices[c[0]] for c in contexts],
        think=think,
        answer=answer,
        grammar=grammar,
        field_probs=field_probs,
    )
    out = []
    for (i, _, _, reasoning), sample in zip(contexts, samples, strict=True):
        if isinstance(reasoning, ThinkBeam):
            sample = _with_reasoning(generator, sample, len(prompts[i]), reasoning)
        out.append(sample)
    return out


def sampled_reasonings(
    generator: StructuredGenerator,
    contexts: list[tuple[int, int, list[int], Any]],
    indices: list[int],
    seed: int,
    think: ThinkConfig,
    answer: AnswerConfig,
) -> list[tuple[int, int, list[int], Any]]:
    """Each context (prompt position, sample index, ids, None) with its reasoning sampled
    (think phase only, the seed of its sample index) and closed, as the context to answer;
    the reasoning's `StructuredSample` takes the last place. A context whose prompt has no
    think phase stays as it was."""
    tags = generator.tag_ids(think)
    controller = PhaseController(think, answer, tags, generator.loaded.eos_token_ids)
    thinking = [
        c for c in contexts if tags is not None and controller.first_phase(c[2]) != "answer"
    ]
    if not thinking:
        return contexts
    samples = generator.run(
        [c[2] for c in thinking],
        seed=seed,
        first_samples=[c[1] for c in thinking],
        counts=[1] * len(thinking),
        prompt_indices=[indices[c[0]] for c in thinking],
        think=think,
        answer=answer,
        grammar=None,
        field_probs=False,
        think_only=True,
    )
    done = {(c[0], c[1]): s for c, s in zip(thinking, samples, strict=True)}
    result = []
    for i, rank, ids, _ in contexts:
        sample = done.get((i, rank))
        result.append((i, rank, ids + sample.token_ids if sample else ids, sample))
    return result


def _answer_by_beams(
    generator: StructuredGenerator,
    contexts: list[tuple[int, int, list[int], Any]],
    prompts: Sequence[Sequence[int]],
    indices: list[int],
    seed: int,
    answer: AnswerConfig,
    params: BeamParams,
    grammar: GrammarSpec | None,
    field_probs: bool,
) -> list[StructuredSample]:
    """Beam-searched answers: one search per distinct context. Where the contexts of a
    prompt are all the same (no reasoning to tell them apart), its samples are the
    best answers by rank; otherwise each sample gets its context's best answer."""
    by_context: dict[tuple[int, ...], list[int]] = {}
    for n, context in enumerate(contexts):
        by_context.setdefault(tuple(context[2]), []).append(n)
    keys = list(by_context)
    # a context without reasoning answers its samples by rank; one with, by its best
    wanted = max(c[1] + 1 if c[3] is None else 1 for c in contexts)
    beams = replace(params, num_return_sequences=wanted)
    _check_rows(beams, wanted, "answer")
    found = beam_answer_batch(generator, [list(k) for k in keys], grammar, beams, answer.max_tokens)
    scorer = None
    if field_probs and grammar is not None:
        from muestra.answers.answer_probs import AnswerProbabilities

        scorer = AnswerProbabilities(generator, grammar, generator.backend.compile(grammar))
    out: list[StructuredSample | None] = [None] * len(contexts)
    try:
        for key, answers in zip(keys, found, strict=True):
            for n in by_context[key]:
                i, rank, ids, reasoning = contexts[n]
                pick = rank if reasoning is None else 0
                if pick >= len(answers):
                    raise InputError(
                        f"prompt {indices[i]}: sample {rank} needs the answer ranked "
                        f"{pick + 1} but {params.num_beams} beams found {len(answers)} "
                        "distinct complete answers (a beam that spells an answer another one "
                        "has is dropped); raise answer.num_beams or lower the samples"
                    )
                best = answers[pick]
                out[n] = _beam_sample(
                    generator, best, prompts[i], ids, indices[i], rank, seed, reasoning, scorer
                )
    finally:
        if scorer is not None:
            scorer.close()
    return [s for s in out if s is not None]


def _beam_sample(
    generator: StructuredGenerator,
    best: BeamAnswer,
    prompt: Sequence[int],
    context: list[int],
    prompt_index: int,
    sample_index: int,
    seed: int,
    reasoning: ThinkBeam | StructuredSample | None,
    scorer: Any,
) -> StructuredSample:
    generated = context[len(prompt) :] + best.token_ids
    decode = generator.text.token_bytes
    text_ids = generated[:-1] if best.finish_reason == "stop" else generated
    probs = None
    if scorer is not None and best.error is None and best.answer is not None:
        eos = best.token_ids[-1] if best.finish_reason == "stop" else None
        raw = SimpleNamespace(
            token_ids=best.token_ids, stop_reason=eos, state=PhaseState("answer", answer_start=0)
        )
        probs = scorer.score(context, raw)
    sample = StructuredSample(
        prompt_index=prompt_index,
        sample=sample_index,
        seed=sample_seed(seed, prompt_index, sample_index),
        text=b"".join(decode[t] for t in text_ids).decode("utf-8", errors="replace"),
        token_ids=generated,
        finish_reason=best.finish_reason,
        stop_reason=best.token_ids[-1] if best.finish_reason == "stop" else None,
        num_prompt_tokens=len(prompt),
        reasoning=None,
        think_tokens=0,
        budget_hit=False,
        answer_text=best.answer_text,
        answer=best.answer,
        field_probs=probs,
        error=best.error,
    )
    record = {"rank": best.rank, "score": best.score, "sum_logprob": best.sum_logprob}
    sample.beam = {"answer": record | {"probability": math.exp(best.sum_logprob)}}
    if isinstance(reasoning, ThinkBeam):
        sample = _with_reasoning(generator, sample, len(prompt), reasoning, keep_ids=True)
    elif isinstance(reasoning, StructuredSample):
        sample.reasoning = reasoning.reasoning
        sample.think_tokens = reasoning.think_tokens
        sample.budget_hit = reasoning.budget_hit
    return sample


def _with_reasoning(
    generator: StructuredGenerator,
    sample: StructuredSample,
    prompt_length: int,
    beam: ThinkBeam,
    keep_ids: bool = False,
) -> StructuredSample:
    """`sample` (answered after a beam reasoning) as one row of the original prompt."""
    decode = generator.text.token_bytes
    text = b"".join(decode[t] for t in beam.reasoning_ids).decode("utf-8", errors="replace")
    if not keep_ids:  # the sample was generated from prompt + reasoning: prepend it
        sample.token_ids = beam.token_ids + sample.token_ids
        sample.text = b"".join(decode[t] for t in sample.token_ids).decode(
            "utf-8", errors="replace"
        )
    sample.num_prompt_tokens = prompt_length
    sample.reasoning = text
    sample.think_tokens = len(beam.reasoning_ids)
    sample.budget_hit = beam.budget_hit
    sample.beam = {**(sample.beam or {}), "think": beam.record()}
    return sample
