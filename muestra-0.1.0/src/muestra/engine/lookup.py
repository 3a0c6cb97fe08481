"""Prompt-lookup decoding: greedy output, several tokens per forward when the text copies.

`lookup_greedy(engine, request, num_tokens=10, max_ngram=2)` decodes one greedy request:

1. draft: the last `n` tokens (n = `max_ngram` … 1) are looked up in the prompt and the
   text so far; the first earlier occurrence gives up to `num_tokens` draft tokens that
   followed it (HF's `PromptLookupCandidateGenerator` rule, EOS included as a stop);
2. verify: one forward pass of the last token plus the draft; the model's argmax at each
   position is compared with the draft, the matching prefix is accepted and the model's own
   next token follows it (so a step yields 1 … draft+1 tokens);
3. the rows forget the positions of the rejected draft tokens (`RaggedModel.agree`).

Every emitted token is the model's argmax given the tokens before it, so the output is
plain greedy decoding's, token for token (up to the last bits of multi-token vs one-token
matrix products; the tests check equality on the real model and the kits). It pays off
when the answer copies from its prompt (quoting, editing, extraction); without matches
it is plain greedy with a lookup per step.

`lookup_decode` runs several requests as one ragged batch: each row accepts its own
number of draft tokens per forward, the rejected ones stay in the cache as masked holes
(`speculative.RaggedModel`). Stop strings, logprobs, penalties, bias, DoLa and sampling
are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from muestra.engine.engine import Engine, GenerationRequest
from muestra.engine.sampling import SamplingParams
from muestra.engine.speculative import RaggedModel, emit, verify
from muestra.errors import InputError


@dataclass
class LookupResult:
    token_ids: list[int]
    finish_reason: str  # "stop" (an EOS) or "length"
    forwards: int  # model calls after the prefill
    drafted: int  # draft tokens proposed
    accepted: int  # draft tokens accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def find_draft(context: list[int], num_tokens: int, max_ngram: int) -> list[int]:
    """Up to `num_tokens` tokens that followed the first earlier occurrence of the
    context's last n-gram (longest n first), or []."""
    length = len(context)
    for n in range(min(max_ngram, length - 1), 0, -1):
        tail = context[-n:]
        for start in range(length - n):
            if context[start : start + n] == tail:
                follow = context[start + n : start + n + num_tokens]
                if follow:
                    return follow
    return []


def check_lookup_request(request: GenerationRequest) -> None:
    if request.n != 1:
        raise InputError("prompt lookup decodes one greedy sample; set n=1")
    allowed = SamplingParams(temperature=0)
    if request.params != allowed:
        raise InputError(
            "prompt lookup is greedy decoding: temperature 0 and no top-k/top-p/min-p, "
            "penalties, logit bias or DoLa"
        )
    if request.stop or request.logprobs is not None:
        raise InputError("prompt lookup does not support stop strings or logprobs")


@torch.inference_mode()
def lookup_decode(
    engine: Engine,
    requests: Sequence[GenerationRequest],
    num_tokens: int = 10,
    max_ngram: int = 2,
) -> list[list[LookupResult]]:
    """Every request decoded greedily with prompt lookup, in one ragged batch (each row
    accepts its own number of draft tokens per forward; see `speculative.RaggedModel`)."""
    if not 1 <= num_tokens <= 64 or not 1 <= max_ngram <= 8:
        raise InputError(
            f"prompt lookup: num_tokens={num_tokens} must be in [1, 64] and "
            f"max_ngram={max_ngram} in [1, 8]"
        )
    for index, request in enumerate(requests):
        engine.validate(index, request)
        check_lookup_request(request)
    rows = [
        (
            i,
            list(r.prompt_ids),
            r.max_new_tokens,
            frozenset() if r.ignore_eos else engine.eos_token_ids,
            LookupResult([], "length", 0, 0, 0),
        )
        for i, r in enumerate(requests)
    ]
    results = [[row[4]] for row in rows]
    prompts = [row[1] for row in rows]
    reserve = getattr(engine.runtime, "reserve", None)
    if reserve is not None:
        budgets = sum(r.max_new_tokens + num_tokens for r in requests)
        reserve(sum(len(p) for p in prompts) + 2 * budgets)
    target = RaggedModel(engine.runtime, prompts, 64 + num_tokens)
    try:
        _lookup(target, rows, num_tokens, max_ngram)
    finally:
        target.close()
    return results


def _lookup(target: RaggedModel, rows: list[Any], num_tokens: int, max_ngram: int) -> None:
    live = []  # the prefill's argmax is the first token
    for i, (_, _, limit, eos, result) in enumerate(rows):
        finish = emit(result.token_ids, [int(target.last[i].argmax())], eos, limit)
        if finish is None:
            live.append(i)
        else:
            result.finish_reason = finish
    if len(live) < len(rows):
        rows = [rows[i] for i in live]
        if live:
            target.keep(live)
    while rows:
        drafts = []
        for _, prompt, limit, _, result in rows:
            room = limit - len(result.token_ids)  # the model's own token included
            drafts.append(
                find_draft(prompt + result.token_ids, min(num_tokens, room - 1), max_ngram)
            )
        logits = target.feed(
            [[row[4].token_ids[-1], *draft] for row, draft in zip(rows, drafts, strict=True)]
        )
        finished = []
        for i, ((_, prompt, limit, eos, result), draft) in enumerate(
            zip(rows, drafts, strict=True)
        ):
            result.forwards += 1
            new = verify(draft, None, logits[i], greedy=True, rng=None)
            result.drafted += len(draft)
            result.accepted += len(new) - 1
            target.agree(i, prompt + result.token_ids + new)
            finish = emit(result.token_ids, new, eos, limit)
            if finish is not None:
                result.finish_reason = finish
                finished.append(i)
        if finished:
            stay = [i for i in range(len(rows)) if i not in finished]
            rows = [rows[i] for i in stay]
            if stay:
                target.keep(stay)


def lookup_greedy(
    engine: Engine, request: GenerationRequest, num_tokens: int = 10, max_ngram: int = 2
) -> LookupResult:
    """One request, as `lookup_decode` decodes it."""
    return lookup_decode(engine, [request], num_tokens, max_ngram)[0][0]
