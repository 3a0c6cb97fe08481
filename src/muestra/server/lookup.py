"""Prompt-lookup decoding over the OpenAI API: `"prompt_lookup": N` (muestra's extension;
vLLM configures n-gram speculation per server, not per request) decodes greedily with up
to `N` draft tokens copied from the prompt and the text so far (`engine.lookup`), every
prompt of the request in one ragged batch. The output is plain greedy decoding's, token
for token; each choice reports its forwards and acceptance rate under `muestra`.

Greedy only: `temperature` must be 0 and `n` 1; the other sampling fields, `stop`,
`logprobs`, `stream`, `response_format` and a thinking model's reasoning are refused by
name. Like beam search, it runs in a worker thread beside the scheduler's batches, one
at a time (`ServedModel.beam_lock`).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from muestra.engine import GenerationRequest, SamplingParams
from muestra.engine.lookup import LookupResult, lookup_decode
from muestra.errors import MuestraError
from muestra.server.beams import response_head, thinking_off
from muestra.server.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    MuestraOptions,
    SamplingFields,
)

if TYPE_CHECKING:
    from muestra.server.service import ServedModel

REFUSED = (
    "top_p", "top_k", "min_p", "repetition_penalty", "logit_bias", "seed", "dola_layers",
    "stop",
)  # fmt: skip


def refuse(body: SamplingFields) -> None:
    given = [name for name in REFUSED if getattr(body, name) is not None]
    given += [n for n in ("presence_penalty", "frequency_penalty") if getattr(body, n) != 0]
    if body.temperature != 0:
        given.insert(0, "temperature")
    if body.n != 1:
        given.append("n")
    if body.use_beam_search:
        given.append("use_beam_search")
    if body.stream:
        given.append("stream")
    if getattr(body, "logprobs", None):
        given.append("logprobs")
    if isinstance(body, ChatRequest) and body.response_format is not None:
        given.append("response_format")
    if given:
        raise ApiError(
            400,
            f"prompt_lookup is greedy decoding of one choice per prompt: send temperature 0 "
            f"and leave out {', '.join(g for g in given if g != 'temperature') or 'nothing else'}"
            f" (got {', '.join(given)})",
            param=given[0],
        )


async def decode(
    served: ServedModel, body: SamplingFields, prompts: list[list[int]], param: str
) -> list[LookupResult]:
    refuse(body)
    served.check_rows(len(prompts), 1)
    asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
    requests = [
        GenerationRequest(
            ids,
            params=SamplingParams(temperature=0),
            max_new_tokens=served.max_tokens(asked, len(ids), param),
            ignore_eos=body.ignore_eos,
        )
        for ids in prompts
    ]
    async with served.beam_lock:
        try:
            found = await asyncio.to_thread(
                lookup_decode, served.text.engine, requests, body.prompt_lookup or 10
            )
        except MuestraError as err:
            raise ApiError(400, str(err)) from err
    return [results[0] for results in found]


def _text(served: ServedModel, result: LookupResult) -> str:
    ids = result.token_ids[:-1] if result.finish_reason == "stop" else result.token_ids
    return b"".join(served.piece(i) for i in ids).decode("utf-8", errors="replace")


def _extension(result: LookupResult) -> dict[str, Any]:
    return {
        "prompt_lookup": {
            "forwards": result.forwards,
            "drafted": result.drafted,
            "accepted": result.accepted,
            "acceptance_rate": result.acceptance_rate,
        },
        "completion_tokens": len(result.token_ids),
    }


def _usage(prompts: list[list[int]], results: list[LookupResult]) -> dict[str, Any]:
    prompt_tokens = sum(len(p) for p in prompts)
    completion = sum(len(r.token_ids) for r in results)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


async def chat(served: ServedModel, body: ChatRequest) -> dict[str, Any]:
    served.check_model(body)
    body.refuse_unsupported()
    options = body.muestra or MuestraOptions()
    if served.tags is not None and options.think and not thinking_off(body):
        raise ApiError(
            400,
            "prompt_lookup: this model reasons in <think> tags and prompt lookup decodes "
            'plain text; send "muestra": {"think": false} or turn thinking off in '
            "chat_template_kwargs",
            param="prompt_lookup",
        )
    refuse(body)
    prompt = await asyncio.to_thread(served.chat_prompt, body)
    (result,) = await decode(served, body, [prompt], "messages")
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": _text(served, result)},
        "logprobs": None,
        "finish_reason": result.finish_reason,
        "muestra": _extension(result),
    }
    return {
        **response_head(served, "chatcmpl", "chat.completion"),
        "choices": [choice],
        "usage": _usage([prompt], [result]),
    }


async def completion(served: ServedModel, body: CompletionRequest) -> dict[str, Any]:
    served.check_model(body)
    body.refuse_unsupported()
    refuse(body)
    prompts = await served.encode_prompts(body.prompts())
    results = await decode(served, body, prompts, "prompt")
    choices = [
        {
            "index": index,
            "text": _text(served, result),
            "logprobs": None,
            "finish_reason": result.finish_reason,
            "muestra": _extension(result),
        }
        for index, result in enumerate(results)
    ]
    return {
        **response_head(served, "cmpl", "text_completion"),
        "choices": choices,
        "usage": _usage(prompts, results),
    }
