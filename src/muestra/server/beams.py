"""Beam search over the OpenAI API, with vLLM's names: `use_beam_search: true` searches
with `n` beams and returns all `n` hypotheses, best first; `length_penalty` as vLLM and
HF; `early_stopping` (true | false | "never", HF's) is muestra's extension. The search is
`engine.beam.beam_search`, equal to HF `generate(num_beams=n)`.

A beam search draws nothing, so the sampling fields (`temperature`, `top_p`, `top_k`,
`min_p`, penalties, `logit_bias`, `seed`, `dola_layers`) are refused when set, as are
`stop`, `logprobs` and `stream`. With `response_format` (chat) the search is under the
grammar: the `n` most likely distinct complete answers, each with its probability
(`answers.beam_answers`). On a thinking model (chat, thinking on) the search is over the
reasoning, within `thinking_token_budget` (required): the `n` best reasonings, each
closed as a sampled one is and answered greedily (under `response_format` when given),
come back with `reasoning_content` and `muestra.beam` (`answers.beam_phases`, equal to
HF generate with `</think>` as the end token). The search runs in a worker thread, one
search at a time, beside the scheduler's batches; its rows do not join them. A client
that disconnects stops it at its next step (`app._off_loop`), so an abandoned search
does not keep the next one waiting.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING, Any

from muestra.engine import GenerationRequest
from muestra.engine.beam import BeamParams, Hypothesis, beam_search
from muestra.errors import MuestraError
from muestra.server.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    MuestraOptions,
    SamplingFields,
)
from muestra.settings import NAMES, given_in_request
from muestra.version import __version__

if TYPE_CHECKING:
    from muestra.answers.grammar import GrammarSpec
    from muestra.server.service import ServedModel

# besides the sampling settings (`settings.NAMES`), what only a sampled request takes
SAMPLED_ONLY = ("logit_bias", "seed", "stop")


def refuse_with_beams(body: SamplingFields) -> None:
    given = given_in_request(body, NAMES)
    given += [name for name in SAMPLED_ONLY if getattr(body, name) is not None]
    if body.stream:
        given.append("stream")
    if getattr(body, "logprobs", None):
        given.append("logprobs")
    if given:
        raise ApiError(
            400,
            f"use_beam_search: {', '.join(given)} cannot be combined with beam search (it "
            "scores the model's own log-probabilities, draws nothing and returns whole "
            "hypotheses); leave them out",
            param=given[0],
        )


def beam_params(body: SamplingFields) -> BeamParams:
    params = BeamParams(
        num_beams=body.n,
        length_penalty=float(body.length_penalty),
        early_stopping=body.early_stopping,
        num_return_sequences=body.n,
    )
    try:
        params.check()
    except MuestraError as err:
        raise ApiError(400, str(err), param="n") from err
    return params


async def search(
    served: ServedModel, body: SamplingFields, prompts: list[list[int]], param: str
) -> list[list[Hypothesis]]:
    served.check_rows(len(prompts), body.n)
    params = beam_params(body)
    asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
    requests = [
        GenerationRequest(
            ids,
            max_new_tokens=served.max_tokens(asked, len(ids), param),
            ignore_eos=body.ignore_eos,
        )
        for ids in prompts
    ]
    async with served.beam_lock:
        try:
            return await asyncio.to_thread(beam_search, served.text.engine, requests, params)
        except MuestraError as err:
            raise ApiError(400, str(err)) from err


def finished_text(served: ServedModel, token_ids: list[int], finish_reason: str) -> str:
    """The text of a finished sequence, without the EOS that ended it."""
    ids = token_ids[:-1] if finish_reason == "stop" else token_ids
    return b"".join(served.piece(i) for i in ids).decode("utf-8", errors="replace")


def _extension(h: Hypothesis) -> dict[str, Any]:
    return {
        "beam": {"rank": h.rank, "score": h.score, "sum_logprob": h.sum_logprob},
        "completion_tokens": len(h.token_ids),
    }


def usage(prompts: list[list[int]], completions: list[Any]) -> dict[str, Any]:
    """OpenAI's usage block: the prompts' tokens and the `token_ids` of every choice."""
    prompt_tokens = sum(len(p) for p in prompts)
    completion = sum(len(c.token_ids) for c in completions)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def response_head(served: ServedModel, prefix: str, kind: str) -> dict[str, Any]:
    return {
        "id": f"{prefix}-{uuid.uuid4().hex[:24]}",
        "object": kind,
        "created": int(time.time()),
        "model": served.name,
        "system_fingerprint": f"muestra-{__version__}",
    }


async def chat(served: ServedModel, body: ChatRequest) -> dict[str, Any]:
    served.check_model(body)
    body.refuse_unsupported()
    refuse_with_beams(body)
    options = body.muestra or MuestraOptions()
    grammar = served.grammar(body)
    if grammar is not None:  # refused or too slow: an ApiError before any search
        await served.grammars.compile(grammar, "response_format")
    if served.tags is not None and options.think and not thinking_off(body):
        return await _thinking_chat(served, body, options, grammar)
    prompt = await asyncio.to_thread(served.chat_prompt, body)
    if grammar is not None:
        return await _grammar_chat(served, body, prompt, grammar)
    found = await search(served, body, [prompt], "messages")
    choices = [
        {
            "index": h.rank,
            "message": {
                "role": "assistant",
                "content": finished_text(served, h.token_ids, h.finish_reason),
            },
            "logprobs": None,
            "finish_reason": h.finish_reason,
            "muestra": _extension(h),
        }
        for h in found[0]
    ]
    return {
        **response_head(served, "chatcmpl", "chat.completion"),
        "choices": choices,
        "usage": usage([prompt], found[0]),
    }


async def completion(served: ServedModel, body: CompletionRequest) -> dict[str, Any]:
    served.check_model(body)
    body.refuse_unsupported()
    refuse_with_beams(body)
    prompts = await served.encode_prompts(body.prompts())
    found = await search(served, body, prompts, "prompt")
    choices = [
        {
            "index": index * body.n + h.rank,
            "text": finished_text(served, h.token_ids, h.finish_reason),
            "logprobs": None,
            "finish_reason": h.finish_reason,
            "muestra": _extension(h),
        }
        for index, hypotheses in enumerate(found)
        for h in hypotheses
    ]
    return {
        **response_head(served, "cmpl", "text_completion"),
        "choices": choices,
        "usage": usage(prompts, [h for hs in found for h in hs]),
    }


async def _grammar_chat(
    served: ServedModel, body: ChatRequest, prompt: list[int], grammar: GrammarSpec
) -> dict[str, Any]:
    """The `n` most likely distinct complete answers under `response_format`
    (`answers.beam_answers`); fewer come back when fewer distinct ones were found."""
    from muestra.answers.beam_answers import beam_answer_batch

    served.check_rows(1, body.n)
    params = beam_params(body)
    asked = body.max_completion_tokens or body.max_tokens
    budget = served.max_tokens(asked, len(prompt), "messages")
    async with served.beam_lock:
        try:
            (answers,) = await asyncio.to_thread(
                beam_answer_batch, served.structured, [prompt], grammar, params, budget
            )
        except MuestraError as err:
            raise ApiError(400, str(err)) from err
    choices = [
        {
            "index": a.rank,
            "message": {"role": "assistant", "content": a.answer_text},
            "logprobs": None,
            "finish_reason": a.finish_reason,
            "muestra": {
                "beam": {
                    "rank": a.rank,
                    "score": a.score,
                    "sum_logprob": a.sum_logprob,
                    "probability": a.probability,
                },
                "error": a.error,
                "completion_tokens": len(a.token_ids),
            },
        }
        for a in answers
    ]
    return {
        **response_head(served, "chatcmpl", "chat.completion"),
        "choices": choices,
        "usage": usage([prompt], answers),
    }


async def _thinking_chat(
    served: ServedModel,
    body: ChatRequest,
    options: MuestraOptions,
    grammar: GrammarSpec | None = None,
) -> dict[str, Any]:
    """A thinking model: the `n` best reasonings within `thinking_token_budget`, each
    closed as a sampled one is and answered greedily (`answers.beam_phases`)."""
    from muestra.answers.decoding import Beams, PhaseBatch, decode, phases_from
    from muestra.settings import AnswerSettings, PhaseSettings, ThinkSettings

    if body.thinking_token_budget is None:
        raise ApiError(
            400,
            "use_beam_search on a thinking model searches the reasoning: give "
            'thinking_token_budget (its length), or send "muestra": {"think": false}',
            param="thinking_token_budget",
        )
    served.check_rows(1, body.n)
    params = beam_params(body)
    prompt = await asyncio.to_thread(served.chat_prompt, body)
    assert served.tags is not None
    budget = body.thinking_token_budget
    closing = len(served.tags.open_ids) + len(served.tags.close_ids) + 2
    asked = body.max_completion_tokens or body.max_tokens
    total = served.max_tokens(asked, len(prompt), "messages")
    if total <= budget + closing:
        raise ApiError(
            400,
            f"max_tokens {total} leaves no room for an answer after thinking_token_budget "
            f"{budget} and the closing text ({closing} tokens): raise max_tokens",
            param="max_tokens",
        )
    # the reasoning beam-searched, then answered greedily (the answer's default)
    settings = PhaseSettings(
        ThinkSettings(budget=budget, close_text=options.close_text, mode="tags"),
        AnswerSettings(max_tokens=total - budget - closing),
    )
    batch = PhaseBatch([prompt], [body.n], phases_from(settings, served.loaded), 0, grammar)
    async with served.beam_lock:
        try:
            samples = await asyncio.to_thread(decode, served.structured, batch, Beams(think=params))
        except MuestraError as err:
            raise ApiError(400, str(err)) from err
    choices = [
        {
            "index": sample.sample,
            "message": {
                "role": "assistant",
                "content": sample.answer_text,
                "reasoning_content": sample.reasoning,
            },
            "logprobs": None,
            "finish_reason": sample.finish_reason,
            "muestra": {
                "beam": sample.beam["think"] if sample.beam else None,
                "think_tokens": sample.think_tokens,
                "budget_hit": sample.budget_hit,
                "answer": sample.answer,
                "error": sample.error,
                "completion_tokens": sample.num_tokens,
            },
        }
        for sample in samples
    ]
    return {
        **response_head(served, "chatcmpl", "chat.completion"),
        "choices": choices,
        "usage": usage([prompt], samples),
    }


def thinking_off(body: ChatRequest) -> bool:
    kwargs = body.chat_template_kwargs or {}
    return kwargs.get("enable_thinking") is False
