"""What lm-evaluation-harness asks of a completions server, answered exactly.

`local-completions` scores multiple choice by log-likelihood: it sends the context and a
continuation as one prompt (token ids by default) with `echo: true, max_tokens: 1,
logprobs: 1, temperature: 0` and sums `logprobs.token_logprobs[ctxlen:-1]`; `is_greedy`
compares each of those with `max(top_logprobs[i].values())`. So an echo response carries
the prompt's own tokens with their log-probabilities under the model (teacher-forced:
position i given tokens < i; the first token has none, `null`, as OpenAI's), then the
generated token(s). Echo is answered from one forward pass per prompt: `max_tokens` 0
(the prompt only) or 1 greedy token (the argmax of the last position) — what lm-eval
sends; anything else is refused by name rather than half done.

Without a `tokenizer=` path lm-eval looks for a remote tokenizer at the server's root:
`GET /tokenizer_info` (its `eos_token`, `bos_token`, `pad_token`, `chat_template`),
`POST /tokenize` `{"prompt", "add_special_tokens"}` → `{"tokens"}` and `POST /detokenize`
`{"tokens"}` → `{"prompt"}` (vLLM's shapes); these are served too, so lm-eval runs
against `muestra serve` fully offline.
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from muestra.server.beams import response_head
from muestra.server.protocol import ApiError, CompletionRequest
from muestra.server.service import ServedModel


def refuse(body: CompletionRequest) -> None:
    """What echo cannot be combined with, by name."""
    if body.stream:
        raise ApiError(400, "echo cannot be streamed; send stream: false", param="echo")
    if body.n != 1:
        raise ApiError(400, "echo returns one choice per prompt; send n: 1", param="n")
    if (body.max_tokens or 0) > 1 or (body.max_tokens == 1 and (body.temperature or 0) > 0):
        raise ApiError(
            400,
            "echo supports max_tokens 0 (the prompt's log-probabilities) or 1 greedy token "
            "(temperature 0), as lm-evaluation-harness sends; generate separately otherwise",
            param="max_tokens",
        )


async def completion(served: ServedModel, body: CompletionRequest) -> dict[str, Any]:
    served.check_model(body)
    body.refuse_unsupported()
    refuse(body)
    served.check_rows(len(body.prompts()), 1)  # the same limit as a generating request
    prompts = await served.encode_prompts(body.prompts())
    for ids in prompts:
        served.max_tokens(max(body.max_tokens or 0, 1), len(ids), "prompt")
    scored = [await asyncio.to_thread(_forward, served, ids) for ids in prompts]
    choices, completion_tokens = [], 0
    for index, (ids, (logprobs, top, tops)) in enumerate(zip(prompts, scored, strict=True)):
        tokens = list(ids)
        token_logprobs: list[float | None] = [None, *logprobs]
        top_logprobs: list[dict[str, float] | None] = [None, *tops[:-1]]
        finish = "length"
        if body.max_tokens:  # one greedy token: the last position's argmax
            token, value = top
            tokens.append(token)
            token_logprobs.append(value)
            top_logprobs.append(tops[-1])
            completion_tokens += 1
            finish = "stop" if token in served.loaded.eos_token_ids else "length"
        pieces = [served.piece(t).decode("utf-8", errors="replace") for t in tokens]
        entry: dict[str, Any] = {
            "index": index,
            "text": b"".join(served.piece(t) for t in tokens).decode("utf-8", errors="replace"),
            "logprobs": None,
            "finish_reason": finish,
        }
        if body.logprobs is not None:
            k = max(body.logprobs, 1)
            offsets, at = [], 0
            for piece in pieces:
                offsets.append(at)
                at += len(piece)
            entry["logprobs"] = {
                "tokens": pieces,
                "token_logprobs": token_logprobs,
                "top_logprobs": [
                    None if t is None else dict(list(t.items())[:k]) for t in top_logprobs
                ],
                "text_offset": offsets,
            }
        choices.append(entry)
    prompt_tokens = sum(len(p) for p in prompts)
    return {
        **response_head(served, "cmpl", "text_completion"),
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


TOP = 20  # alternatives kept per position (the API's maximum)


@torch.inference_mode()
def _forward(
    served: ServedModel, ids: list[int]
) -> tuple[list[float], tuple[int, float], list[dict[str, float]]]:
    """(log-probability of tokens 1…, (argmax after the prompt, its log-probability),
    per position the top alternatives {piece: logprob}, best first)."""
    rows, fed = served.loaded.runtime.prefill([ids], 1, "all")
    rows.close()
    assert fed.ahead is not None
    logprobs = torch.log_softmax(fed.ahead[0].float(), dim=-1)
    targets = torch.tensor(ids[1:], device=logprobs.device)
    chosen = logprobs[:-1].gather(-1, targets[:, None]).squeeze(-1).tolist()
    values, indices = logprobs.topk(TOP, dim=-1)
    tops = []
    for row_values, row_indices in zip(values.tolist(), indices.tolist(), strict=True):
        top: dict[str, float] = {}
        for token, value in zip(row_indices, row_values, strict=True):
            top.setdefault(served.piece(token).decode("utf-8", errors="replace"), value)
        tops.append(top)
    last = (int(indices[-1, 0]), float(values[-1, 0]))
    return chosen, last, tops


def tokenizer_info(served: ServedModel) -> dict[str, Any]:
    tokenizer = served.loaded.tokenizer
    return {
        "eos_token": tokenizer.eos_token,
        "bos_token": tokenizer.bos_token,
        "pad_token": tokenizer.pad_token,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "model_max_length": served.context,
        "vocab_size": served.loaded.vocab_size,
    }


def detokenize_limit(served: ServedModel) -> int:
    """Token ids one `/detokenize` request may send: as many as the server would
    generate for one request at most."""
    return served.max_rows_per_request * (served.context or 32_768)


def tokenize(served: ServedModel, prompt: str, add_special_tokens: bool) -> dict[str, Any]:
    tokens = served.loaded.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    return {"tokens": tokens, "count": len(tokens), "max_model_len": served.context}


def detokenize(served: ServedModel, tokens: list[int]) -> dict[str, Any]:
    limit = detokenize_limit(served)
    if len(tokens) > limit:
        raise ApiError(
            413,
            f"{len(tokens):,} token ids are more than this server detokenizes in one request "
            f"({limit:,}: --max-rows-per-request × the model's context); split the request",
            param="tokens",
            code="too_many_tokens",
        )
    if any(not 0 <= t < served.loaded.vocab_size for t in tokens):
        raise ApiError(400, "a token id is out of range", param="tokens")
    text = b"".join(served.piece(t) for t in tokens).decode("utf-8", errors="replace")
    return {"prompt": text}
