"""Free-text answers by prompt lookup or speculative decoding, after an optional reasoning.

`run_drafted_answers` is `StructuredGenerator.run` for conditions whose answer is decoded
by a drafting decoder (an experiment's `[answer] prompt_lookup` or `draft_model`): the
reasoning, when there is a think phase, is sampled as usual and closed
(`beam_phases.sampled_reasonings`); then every answer of the batch decodes in one ragged
batch (`engine.lookup.lookup_decode`, `engine.speculative.speculative_decode`). The
answer is free text: these decoders take no step hooks, so no grammar can constrain them
(the spec refuses one).

Prompt lookup is greedy: its answers are the ordinary greedy answers, token for token.
Speculative sampling follows the answer's sampling distribution exactly, but from a
fresh generator seeded with the sample's seed (the ordinary pipeline continues the
reasoning's generator): the same distribution, not the same draws.

`load_draft` resolves a draft reference: `layers:N` (the model's own first N layers,
weights shared) or another model with the same vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from muestra.answers.beam_phases import sampled_reasonings
from muestra.answers.phases import AnswerConfig, ThinkConfig
from muestra.answers.structured import StructuredGenerator, StructuredSample
from muestra.engine import GenerationRequest
from muestra.engine.lookup import lookup_decode
from muestra.engine.seeds import sample_seed
from muestra.engine.speculative import layer_draft, speculative_decode
from muestra.errors import InputError


def load_draft(loaded: Any, draft_ref: str, dtype: str = "auto", device: str = "auto") -> Any:
    """A speculative draft for `loaded`: `layers:N` (the torch runtime) or a model sharing
    its vocabulary, on the same runtime as `loaded` (a GGUF for llama.cpp)."""
    from muestra.models.loading import load_model

    runtime = loaded.runtime.name
    if draft_ref.startswith("layers:"):
        try:
            layers = int(draft_ref.split(":", 1)[1])
        except ValueError:
            raise InputError(f"draft model {draft_ref!r}: use layers:N or a model") from None
        if runtime != "torch":
            raise InputError(
                f"draft model {draft_ref!r}: a draft of the model's own first layers needs the "
                f"torch runtime (this model runs on {runtime}); give a smaller GGUF with the "
                "same vocabulary, or --runtime torch"
            )
        return layer_draft(loaded.model, layers)
    other = load_model(draft_ref, dtype=dtype, device=device, runtime=runtime)  # type: ignore[arg-type]
    if other.tokenizer.get_vocab() != loaded.tokenizer.get_vocab():
        raise InputError(
            f"draft model {draft_ref}: its vocabulary differs from the model's; a draft "
            "must share the tokenizer"
        )
    return other.runtime


def run_drafted_answers(
    generator: StructuredGenerator,
    prompts: Sequence[Sequence[int]],
    *,
    counts: Sequence[int],
    seed: int,
    first_samples: Sequence[int] | None = None,
    prompt_indices: Sequence[int] | None = None,
    think: ThinkConfig | None = None,
    answer: AnswerConfig | None = None,
    prompt_lookup: int | None = None,
    draft: Any = None,
    num_speculative_tokens: int = 4,
) -> list[StructuredSample]:
    """Samples `first_samples[i] … + counts[i] - 1` of each prompt; exactly one of
    `prompt_lookup` (draft tokens per forward) and `draft` (a draft model) is given."""
    if (prompt_lookup is None) == (draft is None):
        raise InputError("give exactly one of prompt_lookup and a draft model")
    answer = answer or AnswerConfig()
    firsts = list(first_samples or [0] * len(prompts))
    indices = list(prompt_indices or range(len(prompts)))
    contexts: list[tuple[int, int, list[int], Any]] = [
        (i, r, list(p), None)
        for i, p in enumerate(prompts)
        for r in range(firsts[i], firsts[i] + counts[i])
    ]
    think = generator.resolve_think(think)
    if think is not None:
        contexts = sampled_reasonings(generator, contexts, indices, seed, think, answer)
    requests = [
        GenerationRequest(
            ids,
            params=answer.params,
            max_new_tokens=answer.max_tokens,
            seeds=[sample_seed(seed, indices[i], rank)],
        )
        for i, rank, ids, _ in contexts
    ]
    engine = generator.text.engine
    if prompt_lookup is not None:
        found = lookup_decode(engine, requests, num_tokens=prompt_lookup)
    else:
        found = speculative_decode(engine, draft, requests, num_speculative_tokens)
    decode = generator.text.token_bytes
    samples = []
    for (i, rank, ids, reasoning), (result,) in zip(contexts, found, strict=True):
        answer_ids = result.token_ids
        shown = answer_ids[:-1] if result.finish_reason == "stop" else answer_ids
        generated = ids[len(prompts[i]) :] + answer_ids
        text_ids = generated[:-1] if result.finish_reason == "stop" else generated
        samples.append(
            StructuredSample(
                prompt_index=indices[i],
                sample=rank,
                seed=sample_seed(seed, indices[i], rank),
                text=b"".join(decode[t] for t in text_ids).decode("utf-8", errors="replace"),
                token_ids=generated,
                finish_reason=result.finish_reason,
                stop_reason=answer_ids[-1] if result.finish_reason == "stop" else None,
                num_prompt_tokens=len(prompts[i]),
                reasoning=reasoning.reasoning if reasoning is not None else None,
                think_tokens=reasoning.think_tokens if reasoning is not None else 0,
                budget_hit=reasoning.budget_hit if reasoning is not None else False,
                answer_text=b"".join(decode[t] for t in shown).decode("utf-8", errors="replace"),
                answer=None,
                field_probs=None,
                error=None,
            )
        )
    return samples
