"""Log-likelihood of continuations, as lm-evaluation-harness computes it, batched.

For a context and its continuations (a question's options), lm-eval's conventions:
trailing whitespace of the context moves to the front of each continuation; the context is
encoded alone, the continuation is what encoding context + continuation adds after the
context's tokens; the log-likelihood is the sum of the continuation tokens' log-softmax
given everything before them, and `is_greedy` says whether each of them was the argmax.

Here a batch of questions is prefilled once (one row per question, on any runtime); the
first token of every continuation is scored from the context's last logits, and the rest
in one more forward over all continuations of the batch, their rows copied from their
question's. A one-token continuation (" A") costs no forward of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from muestra.models.runtime.base import Runtime, Sequences
from muestra.models.runtime.torch_runtime import as_runtime

Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class Scored:
    loglik: float
    is_greedy: bool
    num_tokens: int


def encode_pair(encode: Encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: (context ids, continuation ids)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = encode(context + continuation)
    context_ids = encode(context)
    return context_ids, whole[len(context_ids) :]


def _encoded(
    encode: Encode, context: str, continuations: Sequence[str]
) -> tuple[list[int], list[list[int]]]:
    """One context's ids (shared by its continuations: whitespace moves the same way for
    all of them) and each continuation's ids."""
    pairs = [encode_pair(encode, context, c) for c in continuations]
    context_ids = pairs[0][0]
    if not context_ids:
        raise ValueError("an empty context has no position to score its continuation from")
    for ids, cont in pairs:
        if not cont:
            raise ValueError(f"continuation {continuations!r} adds no token to {context!r}")
        assert ids == context_ids
    return context_ids, [cont for _, cont in pairs]


@torch.inference_mode()
def loglikelihoods(
    model: Any,
    encode: Encode,
    questions: Sequence[tuple[str, Sequence[str]]],
    *,
    batch_questions: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[Scored]]:
    """Per (context, continuations) question, the `Scored` of each continuation. `model`:
    a runtime (`models/runtime`) or a transformers model."""
    runtime = as_runtime(model)
    encoded = [_encoded(encode, context, conts) for context, conts in questions]
    # questions of similar lengths batched together: less padding in both forwards
    order = sorted(
        range(len(encoded)),
        key=lambda q: (len(encoded[q][0]), max(len(c) for c in encoded[q][1])),
    )
    results: list[list[Scored]] = [[] for _ in encoded]
    for start in range(0, len(order), batch_questions):
        chunk = order[start : start + batch_questions]
        scored = _score_batch(runtime, [encoded[q] for q in chunk])
        for q, one in zip(chunk, scored, strict=False):
            results[q] = one
        if on_batch is not None:
            on_batch(len(chunk))
    return results


def _score_batch(
    runtime: Runtime, chunk: list[tuple[list[int], list[list[int]]]]
) -> list[list[Scored]]:
    reserve = getattr(runtime, "reserve", None)
    if reserve is not None:
        reserve(sum(len(ctx) + sum(len(c) for c in conts) for ctx, conts in chunk))
    room = max(len(c) for _, conts in chunk for c in conts)
    contexts, fed = runtime.prefill([ctx for ctx, _ in chunk], room)
    try:
        return _score_continuations(contexts, fed.last, chunk)
    finally:
        contexts.close()


def _score_continuations(
    contexts: Sequences, last: torch.Tensor, chunk: list[tuple[list[int], list[list[int]]]]
) -> list[list[Scored]]:
    first = torch.log_softmax(last.float(), dim=-1)  # (Q, V)
    # every continuation: its question, its tokens
    rows = [(q, cont) for q, (_, conts) in enumerate(chunk) for cont in conts]
    sums = [float(first[q, cont[0]]) for q, cont in rows]
    greedy = [bool(first[q].argmax() == cont[0]) for q, cont in rows]
    for group in _length_groups([r for r, (_, cont) in enumerate(rows) if len(cont) > 1], rows):
        rest = _rest(contexts, [rows[r] for r in group])
        for r, (loglik, is_greedy) in zip(group, rest, strict=True):
            sums[r] += loglik
            greedy[r] = greedy[r] and is_greedy
    scored = [Scored(s, g, len(cont)) for s, g, (_, cont) in zip(sums, greedy, rows, strict=True)]
    results, at = [], 0
    for _, conts in chunk:
        results.append(scored[at : at + len(conts)])
        at += len(conts)
    return results


def _length_groups(longer: list[int], rows: list[tuple[int, list[int]]]) -> list[list[int]]:
    """Continuations split by length so that padding stays under half of each forward:
    longest first, a group takes rows down to half its longest. (Options of one question
    differ a lot in length — " 7" and " 100 degrees Celsius" — and one padded forward
    spent two thirds of its positions on padding.)"""
    ordered = sorted(longer, key=lambda r: -len(rows[r][1]))
    groups: list[list[int]] = []
    for r in ordered:
        if groups and 2 * len(rows[r][1]) - 2 >= len(rows[groups[-1][0]][1]) - 1:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def _rest(contexts: Sequences, rows: list[tuple[int, list[int]]]) -> list[tuple[float, bool]]:
    """Tokens 2… of each continuation, scored in one forward from a copy of its
    question's context."""
    branch = contexts.clone([q for q, _ in rows])
    try:
        fed = branch.feed([cont[:-1] for _, cont in rows], "all")
    finally:
        branch.close()
    assert fed.ahead is not None
    result = []
    for logits, (_, cont) in zip(fed.ahead, rows, strict=True):
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # (len - 1, V)
        targets = torch.tensor(cont[1:], device=logprobs.device)
        picked = logprobs.gather(-1, targets[:, None]).squeeze(-1)
        hits = bool((logprobs.argmax(-1) == targets).all())
        result.append((float(picked.sum()), hits))
    return result
