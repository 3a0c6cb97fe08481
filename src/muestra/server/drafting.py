"""Prompt lookup and speculative decoding over the OpenAI API (muestra's extensions;
vLLM configures speculation per server, for every request).

- `"prompt_lookup": N` decodes greedily with up to `N` draft tokens copied from the prompt
  and the text so far (`engine.lookup`): the same text as plain greedy decoding. Greedy
  only: `temperature` must be 0 and `n` 1.
- `"speculative": true`, on a server started with `--draft-model`, decodes with that
  draft (`engine.speculative`, `--num-speculative-tokens` per round): greedy output is
  plain greedy's, sampled output follows the same distribution (the exact rejection
  rule); `temperature`, `top_p`, `top_k`, `min_p`, `n` and `seed` apply as usual (unset
  ones from the model's generation config, choice `i` seeded as the scheduler seeds it).

Every prompt and choice of a request decodes in one ragged batch; each choice reports
forwards/rounds and its acceptance rate under `muestra`. Penalties, `logit_bias`,
`dola_layers`, `stop`, `logprobs`, `stream`, `response_format`, beam search and a
thinking model's reasoning are refused by name. Like beam search, decoding runs in a
worker thread beside the scheduler's batches, one at a time (`ServedModel.beam_lock`),
and stops at its next step when the client disconnects.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import TYPE_CHECKING, Any

from muestra.engine import SamplingParams
from muestra.engine.lookup import LookupResult, lookup_decode
from muestra.engine.speculative import speculative_decode
from muestra.errors import MuestraError
from muestra.server.beams import finished_text, response_head, thinking_off, usage
from muestra.server.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    MuestraOptions,
    SamplingFields,
)
from muestra.settings import LOOKUP, NAMES, SETTING, SPECULATIVE, given_in_request, use

if TYPE_CHECKING:
    from muestra.server.service import ServedModel


def refuse(body: SamplingFields) -> None:
    """What a drafted decode cannot honour, by name: a sampling setting its strategy does
    not apply (`settings.Use.strategies`; prompt lookup is greedy: temperature 0 only)."""
    lookup = body.prompt_lookup is not None
    strategy = LOOKUP if lookup else SPECULATIVE
    given = given_in_request(body, [n for n in NAMES if strategy not in use(n).strategies])
    given += [name for name in ("logit_bias", "stop") if getattr(body, name) is not None]
    if lookup:
        given += ["seed"] if body.seed is not None else []
        given += [SETTING.temperature] if body.temperature != 0 else []
        given += ["n"] if body.n != 1 else []
        given += ["speculative"] if body.speculative else []
    given += [n for n in ("use_beam_search", "stream") if getattr(body, n)]
    if getattr(body, "logprobs", None):
        given.append("logprobs")
    if isinstance(body, ChatRequest) and body.response_format is not None:
        given.append("response_format")
    if given:
        what = (
            "prompt_lookup is greedy decoding of one choice per prompt (send temperature 0)"
            if lookup
            else "speculative decoding samples with "
            + ", ".join(n for n in NAMES if SPECULATIVE in use(n).strategies)
            + " only"
        )
        raise ApiError(400, f"{what}; leave out {', '.join(given)}", param=given[0])


async def decode(
    served: ServedModel, body: SamplingFields, prompts: list[list[int]], param: str
) -> list[list[Any]]:
    """Per prompt, its choices' results (LookupResult or SpeculativeResult)."""
    refuse(body)
    served.check_rows(len(prompts), body.n)
    asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if body.prompt_lookup is not None:
        params = SamplingParams(temperature=0)
    else:
        if served.draft is None:
            raise ApiError(
                400,
                "speculative: this server has no draft model; start it with "
                "`muestra serve MODEL --draft-model DRAFT|layers:N`",
                param="speculative",
            )
        params = served.params(body)
    requests = [
        served.request(body, ids, params, served.max_tokens(asked, len(ids), param), None)
        for ids in prompts
    ]
    if body.prompt_lookup is not None:
        run: Any = partial(lookup_decode, served.text.engine, requests, body.prompt_lookup)
    else:
        run = partial(
            speculative_decode,
            served.text.engine,
            served.draft,
            requests,
            served.num_speculative_tokens,
        )
    async with served.beam_lock:
        try:
            return await asyncio.to_thread(run)
        except MuestraError as err:
            raise ApiError(400, str(err)) from err


def _extension(result: Any) -> dict[str, Any]:
    if isinstance(result, LookupResult):
        key, rounds = "prompt_lookup", {"forwards": result.forwards}
    else:
        key, rounds = "speculative", {"rounds": result.rounds}
    return {
        key: {
            **rounds,
            "drafted": result.drafted,
            "accepted": result.accepted,
            "acceptance_rate": result.acceptance_rate,
        },
        "completion_tokens": len(result.token_ids),
    }


async def chat(served: ServedModel, body: ChatRequest) -> dict[str, Any]:
    served.check_model(body)
    body.refuse_unsupported()
    options = body.muestra or MuestraOptions()
    if served.tags is not None and options.think and not thinking_off(body):
        name = "prompt_lookup" if body.prompt_lookup is not None else "speculative"
        raise ApiError(
            400,
            f"{name}: this model reasons in <think> tags and drafted decoding produces plain "
            'text; send "muestra": {"think": false} or turn thinking off in '
            "chat_template_kwargs",
            param=name,
        )
    refuse(body)
    prompt = await asyncio.to_thread(served.chat_prompt, body)
    (results,) = await decode(served, body, [prompt], "messages")
    choices = [
        {
            "index": index,
            "message": {
                "role": "assistant",
                "content": finished_text(served, result.token_ids, result.finish_reason),
            },
            "logprobs": None,
            "finish_reason": result.finish_reason,
            "muestra": _extension(result),
        }
        for index, result in enumerate(results)
    ]
    return {
        **response_head(served, "chatcmpl", "chat.completion"),
        "choices": choices,
        "usage": usage([prompt], results),
    }


async def completion(served: ServedModel, body: CompletionRequest) -> dict[str, Any]:
    served.check_model(body)
    body.refuse_unsupported()
    refuse(body)
    prompts = await served.encode_prompts(body.prompts())
    found = await decode(served, body, prompts, "prompt")
    choices = [
        {
            "index": index * body.n + k,
            "text": finished_text(served, result.token_ids, result.finish_reason),
            "logprobs": None,
            "finish_reason": result.finish_reason,
            "muestra": _extension(result),
        }
        for index, results in enumerate(found)
        for k, result in enumerate(results)
    ]
    return {
        **response_head(served, "cmpl", "text_completion"),
        "choices": choices,
        "usage": usage(prompts, [r for rs in found for r in rs]),
    }
