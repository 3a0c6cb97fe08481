"""Reasoning + structured answers for users: prompts in, `StructuredSample`s out.

`StructuredGenerator` wires a loaded model, the engine, the phase controller
(`phases.py`) and an answer grammar (`grammar.py`) together, then turns each finished
row into a `StructuredSample`: the reasoning text and its token count, whether the
budget was hit, the answer text, the parsed answer (validated against the schema with
`jsonschema`), the exact probability of each allowed value of enum/boolean/choice
fields (`answer_probs.py`), and an explicit `error` whenever an answer is missing or
invalid. Nothing broken is passed off as an answer.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from muestra.answers.generation import TextGenerator
from muestra.answers.grammar import DEFAULT_GRAMMAR_MEMORY_BYTES, GrammarBackend, GrammarSpec
from muestra.answers.phases import (
    AnswerConfig,
    PhaseController,
    PhaseState,
    TagIds,
    ThinkConfig,
    ThinkMode,
    with_instruction,
)
from muestra.engine import GenerationRequest, Sample, SamplingParams
from muestra.engine.engine import drafts_off_note
from muestra.engine.seeds import fresh_run_seed
from muestra.errors import InputError
from muestra.models.loading import LoadedModel
from muestra.models.tokenization import token_id
from muestra.settings import Sampling, ThinkSettings, from_generation_config, sampling_of


@dataclass
class StructuredSample:
    prompt_index: int
    sample: int
    seed: int
    text: str
    token_ids: list[int]
    finish_reason: str
    stop_reason: int | str | None
    num_prompt_tokens: int
    reasoning: str | None
    think_tokens: int
    budget_hit: bool
    answer_text: str
    answer: Any
    field_probs: dict[str, dict[str, float]] | None
    error: str | None
    value: Any = field(default=None, repr=False)  # the Pydantic object, when a class was given
    # beam-searched phases: {"think"|"answer": {"rank", "score", "sum_logprob", …}}
    beam: dict[str, Any] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("value")
        data["num_tokens"] = self.num_tokens
        return data


def has_think_tags(tokenizer: Any, think: ThinkConfig) -> bool:
    """Whether the model has think tags: both in its vocabulary and its chat template
    mentions them (a base model's template, or none, does not)."""
    if token_id(tokenizer, think.open_tag) is None or token_id(tokenizer, think.close_tag) is None:
        return False
    template = getattr(tokenizer, "chat_template", None) or ""
    return think.open_tag in template


def resolve_think(tokenizer: Any, think: ThinkConfig | None) -> ThinkConfig | None:
    """`think` with mode "auto" settled (the model's tags when it has them, else plain text)
    and, in text mode, Qwen's closing sentence swapped for the plain one. Callers that
    build prompts resolve first: text mode adds an instruction to the prompt."""
    if think is None or think.mode == "tags":
        return think
    if think.mode == "auto" and has_think_tags(tokenizer, think):
        return replace(think, mode="tags")
    return think.for_text()


def think_phase(think: ThinkSettings, tokenizer: Any, defaults: Sampling) -> ThinkConfig:
    """The think phase of `think`: its sampling over `defaults` (the model's), its mode
    settled by `tokenizer`, its instruction and closing text."""
    params = SamplingParams(**{**sampling_of(defaults), **sampling_of(think)})
    config = ThinkConfig(params=params, budget=think.budget, mode=think.mode)
    if think.instruction is not None:
        config = replace(config, instruction=think.instruction)
    resolved = resolve_think(tokenizer, config)
    assert resolved is not None
    if think.close_text is not None:
        resolved = replace(resolved, close_text=think.close_text)
    return resolved


class StructuredGenerator:
    # `field_probs` inside the decoding loop (answer_probs.py); False: the post-hoc
    # computation only (the oracle the loop's values are tested against)
    live_field_probs = True
    # grammar jump-forward (`PhaseController.draft`); False: one forward per answer token
    jump_forward = True

    def __init__(
        self,
        loaded: LoadedModel,
        max_batch: int = 64,
        grammar_cache_bytes: int = DEFAULT_GRAMMAR_MEMORY_BYTES,
    ) -> None:
        self.text = TextGenerator(loaded, max_batch=max_batch)
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.grammar_cache_bytes = grammar_cache_bytes
        self._backend: GrammarBackend | None = None
        # how the last run's field_probs were computed (samples scored each way)
        self.field_probs_counts: dict[str, int] = {}
        # one-line notes on the last run: a fast path it could not take, and why
        self.notes: list[str] = []

    @property
    def backend(self) -> GrammarBackend:
        if self._backend is None:
            self._backend = GrammarBackend(
                self.tokenizer,
                self.loaded.vocab_size,
                self.loaded.eos_token_ids,
                memory_limit_bytes=self.grammar_cache_bytes,
            )
        return self._backend

    def resolve_think(self, think: ThinkConfig | None) -> ThinkConfig | None:
        return resolve_think(self.tokenizer, think)

    def tag_ids(self, think: ThinkConfig) -> TagIds | None:
        """Ids of the think tags and closing text; None for a model that does not think in
        tags (then tags mode skips the think phase)."""
        encode = self.text.encode_text
        if think.mode == "text":
            return TagIds([], None, encode(think.close_text), [], text=True)
        if not has_think_tags(self.tokenizer, think):
            return None
        return TagIds(
            open_ids=encode(think.open_tag + "\n"),
            close_id=token_id(self.tokenizer, think.close_tag),
            close_ids=encode(think.close_text),
            after_close_ids=encode("\n\n"),
        )

    def run(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        n: int = 1,
        seed: int | None = None,
        first_samples: Sequence[int] | None = None,
        prompt_indices: Sequence[int] | None = None,
        counts: Sequence[int] | None = None,
        think: ThinkConfig | None = None,
        answer: AnswerConfig | None = None,
        grammar: GrammarSpec | None = None,
        pydantic_model: type | None = None,
        field_probs: bool = True,
        think_only: bool = False,
    ) -> list[StructuredSample]:
        """`think_only`: each row ends once its reasoning is closed (the answer comes from
        elsewhere, e.g. `beam_answers`); its `token_ids` hold reasoning and closing text."""
        answer = answer or AnswerConfig()
        think = self.resolve_think(think)
        if answer.stop and (think is not None or grammar is not None):
            raise InputError("stop strings end a free-text answer without a think phase")
        tags = self.tag_ids(think) if think is not None else None
        compiled = (self.backend, self.backend.compile(grammar)) if grammar is not None else None
        scorer = None
        if field_probs and compiled is not None:
            from muestra.answers.answer_probs import AnswerProbabilities

            scorer = AnswerProbabilities(self, grammar, compiled[1])
        self.notes = []
        if compiled is not None and self.jump_forward and not think_only:
            # (DoLa while thinking only holds drafts back while a row of the batch thinks)
            note = drafts_off_note(self.loaded.runtime.config, [answer.params])
            self.notes += [note] if note is not None else []
        controller = PhaseController(
            think,
            answer,
            tags,
            self.loaded.eos_token_ids,
            compiled,
            end_after_think=think_only,
            probabilities=scorer if self.live_field_probs else None,
            jump_forward=self.text.encode_text if self.jump_forward else None,
        )
        budget = answer.max_tokens
        if think is not None and tags is not None:
            budget += think.budget + len(tags.open_ids) + len(tags.close_ids) + 2
        run_seed = fresh_run_seed() if seed is None else seed
        requests = [
            GenerationRequest(
                list(p),
                n=counts[i] if counts else n,
                params=controller.first_params(p),
                max_new_tokens=budget,
                seed=run_seed,
                prompt_index=prompt_indices[i] if prompt_indices else i,
                first_sample=first_samples[i] if first_samples else 0,
                stop=answer.stop,
            )
            for i, p in enumerate(prompts)
        ]
        try:
            results = self.text.engine.generate(requests, controller)
            if scorer is not None:
                scorer.flush()  # the rows still waiting for their untaken branches
            samples = [
                self._finish(s, requests[i], grammar, pydantic_model)
                for i, row in enumerate(results)
                for s in row
            ]
            if scorer is not None:
                self._score(scorer, samples, results, requests)
        finally:
            if scorer is not None:
                scorer.close()
        return samples

    def _score(
        self,
        scorer: Any,
        samples: list[StructuredSample],
        results: list[list[Sample]],
        requests: list[GenerationRequest],
    ) -> None:
        """Each valid answer's `field_probs`: from the loop, else computed after the fact."""
        self.field_probs_counts = {"in_loop": 0, "post_hoc": 0}
        for sample, raw in zip(samples, [s for row in results for s in row], strict=True):
            if sample.error is None and sample.answer is not None:
                live = scorer.live.get((raw.request_index, raw.sample_index))
                prompt = requests[raw.request_index].prompt_ids
                sample.field_probs = live if live is not None else scorer.score(prompt, raw)
                self.field_probs_counts["in_loop" if live is not None else "post_hoc"] += 1

    def _finish(
        self,
        sample: Sample,
        request: GenerationRequest,
        grammar: GrammarSpec | None,
        pydantic_model: type | None,
    ) -> StructuredSample:
        state: PhaseState = sample.state
        decode = self.text.token_bytes
        ids = sample.token_ids
        reasoning = None
        if state.think_end is not None or state.phase in ("think", "closing"):
            # a row that ran out of tokens while thinking keeps the trace it wrote
            end = state.think_end if state.think_end is not None else len(ids)
            reasoning = b"".join(decode[t] for t in ids[state.think_start : end])
            reasoning = reasoning.decode("utf-8", errors="replace")
        answer_ids = ids[state.answer_start :] if state.answer_start is not None else []
        if answer_ids and sample.finish_reason == "stop" and isinstance(sample.stop_reason, int):
            answer_ids = answer_ids[:-1]
        answer_bytes = b"".join(decode[t] for t in answer_ids)
        if sample.stop_byte_offset is not None:  # a stop string: cut where it starts
            before = sum(len(decode[t]) for t in ids[: state.answer_start or 0])
            answer_bytes = answer_bytes[: max(sample.stop_byte_offset - before, 0)]
        answer_text = answer_bytes.decode("utf-8", errors="replace")
        error = state.error
        answer = value = None
        if grammar is not None and error is None:
            answer, value, error = parse_answer(
                answer_text, sample.finish_reason, grammar, pydantic_model
            )
        return StructuredSample(
            prompt_index=request.prompt_index,
            sample=sample.sample_index,
            seed=sample.seed,
            text=self.text.sample_bytes(sample).decode("utf-8", errors="replace"),
            token_ids=ids,
            finish_reason=sample.finish_reason,
            stop_reason=sample.stop_reason,
            num_prompt_tokens=sample.prompt_length,
            reasoning=reasoning,
            think_tokens=state.think_tokens,
            budget_hit=state.budget_hit,
            answer_text=answer_text,
            answer=answer,
            field_probs=None,
            error=error,
            value=value,
        )


@functools.lru_cache(maxsize=32)
def _validator(schema_text: str) -> Any:
    """The jsonschema validator of a schema, built once: building it took a fifth of the
    remote backend's time per answer (benchmarks/remote_ceiling.py)."""
    import jsonschema

    schema = json.loads(schema_text)
    return jsonschema.validators.validator_for(schema)(schema)


def parse_answer(
    text: str, finish_reason: str, grammar: GrammarSpec, pydantic_model: type | None = None
) -> tuple[Any, Any, str | None]:
    """(answer, Pydantic value, error) for an answer text, wherever it was generated."""
    if finish_reason != "stop":
        return None, None, "the answer did not finish (token budget); it is not stored as valid"
    if grammar.kind == "json_schema":
        import jsonschema

        try:
            answer = json.loads(text)
        except json.JSONDecodeError as err:
            return None, None, f"the answer is not valid JSON: {err.msg} at {err.pos}"
        problem = jsonschema.exceptions.best_match(_validator(grammar.source).iter_errors(answer))
        if problem is not None:
            return None, None, f"the answer does not validate: {problem.message}"
        value = pydantic_model.model_validate(answer) if pydantic_model is not None else None
        return answer, value, None
    if grammar.kind == "choice" and text not in (grammar.choices or []):
        return None, None, f"the answer {text!r} is not one of the choices"
    return text, None, None


def sample_answers(
    model: str | LoadedModel,
    prompt: str | list[dict[str, Any]],
    *,
    schema: Any = None,
    regex: str | None = None,
    choice: list[str] | None = None,
    n: int = 1,
    seed: int | None = None,
    think_budget: int | None = 1024,
    think_params: SamplingParams | None = None,
    answer: AnswerConfig | None = None,
    enable_thinking: bool | None = None,
    field_probs: bool = True,
    think_mode: ThinkMode = "auto",
) -> list[StructuredSample]:
    """Notebook entry point: a prompt (text or messages) and a schema in, samples out.

    `schema` may be a Pydantic class (each sample's `.value` is then a validated instance),
    a JSON Schema dict or a path. The model thinks for at most `think_budget` tokens with
    `think_params` (default: its generation config), then answers (default greedy). A
    model without think tags reasons in plain text (`think_mode="auto"`; "tags" skips
    its reasoning instead), with an instruction appended to the prompt.
    """
    from muestra.models.loading import load_model

    loaded = load_model(model) if isinstance(model, str) else model
    generator = StructuredGenerator(loaded)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    grammar = GrammarSpec.from_options(schema=schema, regex=regex, choice=choice)
    think = None
    if think_budget is not None:
        defaults = from_generation_config(loaded.generation_config.to_dict())
        settings = ThinkSettings(budget=think_budget, mode=think_mode)
        think = think_phase(settings, generator.tokenizer, defaults)
        if think_params is not None:
            think = replace(think, params=think_params)
        if think.mode == "text":
            messages = with_instruction(messages, think.instruction)
    ids = generator.text.encode_messages(messages, enable_thinking)
    pydantic_model = schema if isinstance(schema, type) else None
    return generator.run(
        [ids],
        n=n,
        seed=seed,
        think=think,
        answer=answer,
        grammar=grammar,
        pydantic_model=pydantic_model,
        field_probs=field_probs,
    )
