"""Beam search over the OpenAI API, with vLLM's names: `use_beam_search: true` searches
with `n` beams and returns all `n` hypotheses, best first; `length_penalty` as vLLM and
HF; `early_stopping` (true | false | "never", HF's) is muestra's extension. The search is
`engine.beam.beam_search`, equal to HF `generate(num_beams=n)`.

A beam search draws nothing, so the sampling fields (`temperature`, `top_p`, `top_k`,
`min_p`, penalties, `logit_bias`, `seed`, `dola_layers`) are refused when set, as are
`stop`, `logprobs`, `stream`, `response_format` and a thinking model's reasoning (beam
search over the think phase is not built yet: send `muestra: {"think": false}` or
`chat_template_kwargs` that turn thinking off). The search runs in a worker thread, one
search at a time, beside the scheduler's batches; its rows do not join them, and a
client that disconnects does not stop it (it ends within `max_tokens` steps).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING, Any

from muestra import __version__
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

if TYPE_CHECKING:
    from muestra.server.service import ServedModel

SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "logit_bias", "seed",
    "dola_layers", "stop",
)  # fmt: skip


def refuse_with_beams(body: SamplingFields) -> None:
    given = [name for name in SAMPLING_FIELDS if getattr(body, name) is not None]
    given += [
        name for name in ("presence_penalty", "frequency_penalty") if getattr(body, name) != 0
    ]
    if body.stream:
        given.append("stream")
    if getattr(body, "logprobs", None):
        given.append("logprobs")
    if isinstance(body, ChatRequest) and body.response_format is not None:
        given.append("response_format")
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


def _text(served: ServedModel, h: Hypothesis) -> str:
    ids = h.token_ids[:-1] if h.finish_reason == "stop" else h.token_ids
    return b"".join(served.piece(i) for i in ids).decode("utf-8", errors="replace")


def _extension(h: Hypothesis) -> dict[str, Any]:
    return {
        "beam": {"rank": h.rank, "score": h.score, "sum_logprob": h.sum_logprob},
        "completion_tokens": len(h.token_ids),
    }


def _usage(prompts: list[list[int]], found: list[list[Hypothesis]]) -> dict[str, Any]:
    prompt_tokens = sum(len(p) for p in prompts)
    completion = sum(len(h.token_ids) for hs in found for h in hs)
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
    if served.tags is not None and options.think and not thinking_off(body):
        raise ApiError(
            400,
            "use_beam_search: this model reasons in <think> tags and beam search over the "
            'reasoning is not available yet; send "muestra": {"think": false} or turn '
            "thinking off in chat_template_kwargs",
            param="use_beam_search",
        )
    prompt = await asyncio.to_thread(served.chat_prompt, body)
    found = await search(served, body, [prompt], "messages")
    choices = [
        {
            "index": h.rank,
            "message": {"role": "assistant", "content": _text(served, h)},
            "logprobs": None,
            "finish_reason": h.finish_reason,
            "muestra": _extension(h),
        }
        for h in found[0]
    ]
    return {
        **response_head(served, "chatcmpl", "chat.completion"),
        "choices": choices,
        "usage": _usage([prompt], found),
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
            "text": _text(served, h),
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
        "usage": _usage(prompts, found),
    }


def thinking_off(body: ChatRequest) -> bool:
    kwargs = body.chat_template_kwargs or {}
    return kwargs.get("enable_thinking") is False
