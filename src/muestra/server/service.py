"""What `muestra serve` does with a request, apart from HTTP.

`ServedModel` holds the loaded model, its `StructuredGenerator` (tokenizer, grammar
backend, think tags) and the continuous-batching `Scheduler`. `chat_job` and
`completion_job` turn a validated request body into engine requests plus a hook (the
phase controller: thinking budget, then the `response_format` grammar), and a `Job`
that follows its samples as they decode.

How the samples become text and reach the client: `jobs.py`.

`max_tokens` (or `max_completion_tokens`) counts every generated token, reasoning
included, as vLLM and OpenAI's reasoning models count them: it bounds the cost of a
request whatever the model does. `thinking_token_budget` bounds the reasoning alone;
when it runs out the controller closes the think block and the answer follows.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

from muestra.answers.decoding import Phases, phases_from
from muestra.answers.grammar import DEFAULT_GRAMMAR_MEMORY_BYTES, GrammarSpec
from muestra.answers.phases import TEXT_CLOSE_TEXT, PhaseController, TagIds, ThinkConfig
from muestra.answers.structured import StructuredGenerator
from muestra.engine import GenerationRequest, NoHook, SamplingParams, StepHook
from muestra.engine.scheduler import Scheduler
from muestra.engine.seeds import fresh_run_seed, sample_seed
from muestra.errors import InputError, MuestraError
from muestra.models.loading import LoadedModel
from muestra.server.grammars import (
    DEFAULT_GRAMMAR_TIMEOUT,
    DEFAULT_MAX_GRAMMAR_BYTES,
    GrammarGate,
)
from muestra.server.jobs import Job, choice_seeds
from muestra.server.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    MuestraOptions,
    SamplingFields,
)
from muestra.server.templates import (
    TemplateLimits,
    refuse_request_template,
    render_prompt,
    request_template,
)
from muestra.settings import (
    AnswerSettings,
    PhaseSettings,
    ThinkSettings,
    from_request,
    serving_defaults,
)

ANY_JSON_OBJECT = {"type": "object", "additionalProperties": True}
# prompts × n of one request: bounds what a single client can queue at once
DEFAULT_MAX_ROWS_PER_REQUEST = 256
# rows waiting or decoding, all requests together: beyond it a request gets 503 at once
DEFAULT_MAX_QUEUED_ROWS = 2048


class ServedModel:
    def __init__(
        self,
        loaded: LoadedModel,
        name: str,
        *,
        max_batch: int = 64,
        max_tokens_limit: int | None = None,
        max_rows_per_request: int = DEFAULT_MAX_ROWS_PER_REQUEST,
        max_queued_rows: int = DEFAULT_MAX_QUEUED_ROWS,
        max_grammar_bytes: int = DEFAULT_MAX_GRAMMAR_BYTES,
        grammar_timeout: float = DEFAULT_GRAMMAR_TIMEOUT,
        grammar_cache_bytes: int = DEFAULT_GRAMMAR_MEMORY_BYTES,
        trust_request_chat_template: bool = False,
        template_limits: TemplateLimits = TemplateLimits(),
        draft: Any = None,
        num_speculative_tokens: int = 4,
    ) -> None:
        if max_queued_rows < max_rows_per_request:
            raise InputError(
                f"--max-queued-rows ({max_queued_rows}) must be at least "
                f"--max-rows-per-request ({max_rows_per_request})"
            )
        self.loaded = loaded
        self.name = name
        self.structured = StructuredGenerator(
            loaded, max_batch=max_batch, grammar_cache_bytes=grammar_cache_bytes
        )
        self.grammars = GrammarGate(
            lambda: self.structured.backend, max_grammar_bytes, grammar_timeout
        )
        self.max_queued_rows = max_queued_rows
        self.beam_lock = asyncio.Lock()  # one beam search at a time (server/beams.py)
        # speculative decoding's draft (server/drafting.py), from `--draft-model`
        self.draft = draft
        self.num_speculative_tokens = num_speculative_tokens
        self.text = self.structured.text
        self.tokenizer = loaded.tokenizer
        self.scheduler = Scheduler(self.text.engine, max_batch)
        self.context = loaded.max_length
        self.max_tokens_limit = max_tokens_limit
        self.max_rows_per_request = max_rows_per_request
        self.trust_request_chat_template = trust_request_chat_template
        self.template_limits = template_limits
        self.tags = self.structured.tag_ids(ThinkConfig())
        self.created = int(time.time())
        # what a request that leaves a setting out samples with (OpenAI's defaults, or
        # the model's own when its generation config samples)
        self.defaults = serving_defaults(loaded.generation_config.to_dict())

    def close(self) -> None:
        self.scheduler.close()
        self.grammars.close()

    # ---- building jobs --------------------------------------------------------------

    def check_model(self, body: SamplingFields) -> None:
        """A request names the served model, or no model (then it is the served one)."""
        if body.model is not None and body.model != self.name:
            raise ApiError(
                404,
                f"the model {body.model!r} does not exist; this server serves {self.name!r}",
                param="model",
                code="model_not_found",
            )

    def params(self, body: SamplingFields) -> SamplingParams:
        """The engine's sampling of a request: its settings over the server's defaults."""
        value = from_request(body, self.defaults)
        bias: dict[int, float] = {}
        for key, amount in (body.logit_bias or {}).items():
            token = int(key)
            if not 0 <= token < self.loaded.vocab_size:
                raise ApiError(
                    400,
                    f"logit_bias: token id {token} is outside [0, {self.loaded.vocab_size})",
                    param="logit_bias",
                )
            bias[token] = amount
        try:
            params = SamplingParams(**value, logit_bias=bias)
            # as vLLM: a top_k above the vocabulary keeps all of it
            params = replace(params, top_k=min(params.top_k, self.loaded.vocab_size))
            if params.dola_layers is not None:  # refused here, not in the batch
                self.text.engine.dola_layers(params)
            return params
        except InputError as err:
            raise ApiError(400, str(err)) from err

    def max_tokens(self, asked: int | None, prompt_tokens: int, prompt_param: str) -> int:
        room = None if self.context is None else self.context - prompt_tokens
        if room is not None and room < 1:
            raise ApiError(
                413,
                f"the prompt has {prompt_tokens} tokens; the model's context is {self.context}",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if asked is None:
            limits = [x for x in (room, self.max_tokens_limit) if x is not None]
            return min(limits) if limits else 1024
        if self.max_tokens_limit is not None and asked > self.max_tokens_limit:
            raise ApiError(
                413,
                f"max_tokens={asked} is above this server's limit of {self.max_tokens_limit} "
                "(--max-tokens-limit)",
                param="max_tokens",
                code="max_tokens_exceeded",
            )
        if room is not None and asked > room:
            raise ApiError(
                413,
                f"prompt ({prompt_tokens} tokens) + max_tokens ({asked}) = "
                f"{prompt_tokens + asked} exceeds the model's context of {self.context} "
                "tokens; lower max_tokens or shorten the prompt",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return asked

    def chat_prompt(self, body: ChatRequest) -> list[int]:
        """The prompt's token ids; blocking work, so `chat_job` runs it in a thread."""
        messages = [m.for_template() for m in body.messages]
        given = body.chat_template_kwargs or {}
        template = request_template(body.chat_template, given)
        if template is not None and not self.trust_request_chat_template:
            top = body.chat_template is not None
            raise refuse_request_template(
                "chat_template" if top else "chat_template_kwargs.chat_template"
            )
        if template is None and not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, "this model has no chat template; use /v1/completions")
        # the caller's kwargs reach the template, but never change what the call returns
        kwargs = {
            **given,
            "tokenize": False,
            "add_generation_prompt": True,
            "return_dict": False,
        }
        if template is not None:
            kwargs["chat_template"] = template
        limits = self.template_limits if template is not None else None
        text = render_prompt(self.tokenizer, messages, kwargs, limits)
        return self.text.encode_text(text)

    def grammar(self, body: ChatRequest) -> GrammarSpec | None:
        fmt = body.response_format
        if fmt is None or fmt.type == "text":
            return None
        try:
            if fmt.type == "json_object":
                return GrammarSpec.json_schema(ANY_JSON_OBJECT)
            if fmt.json_schema is None:
                raise ApiError(
                    400,
                    "response_format of type json_schema needs a json_schema object",
                    param="response_format.json_schema",
                )
            return GrammarSpec.json_schema(
                fmt.json_schema.schema_, source="response_format.json_schema.schema"
            )
        except InputError as err:
            raise ApiError(400, str(err), param="response_format") from err

    def check_rows(self, prompts: int, n: int) -> None:
        if prompts * n > self.max_rows_per_request:
            raise ApiError(
                413,
                f"{prompts} prompt(s) × n={n} = {prompts * n} samples is above this server's "
                f"limit of {self.max_rows_per_request} per request "
                "(--max-rows-per-request); split the request",
                param="prompt" if prompts > 1 else "n",
                code="too_many_rows",
            )

    def check_queue(self, rows: int) -> None:
        open_rows = self.scheduler.open_rows
        if open_rows + rows > self.max_queued_rows:
            raise ApiError(
                503,
                f"the server is busy: {open_rows} samples are queued or decoding and this "
                f"request adds {rows}, above the limit of {self.max_queued_rows} "
                "(--max-queued-rows); retry later",
                code="server_busy",
            )

    async def chat_job(self, body: ChatRequest) -> Job:
        self.check_model(body)
        body.refuse_unsupported()
        self.check_rows(1, body.n)
        params = self.params(body)
        prompt = await asyncio.to_thread(self.chat_prompt, body)
        options = body.muestra or MuestraOptions()
        tags = self.think_tags(body, options)
        phases, max_tokens = self.chat_phases(body, options, params, tags, len(prompt))
        grammar = self.grammar(body)
        compiled = None
        if grammar is not None:
            compiled = await self.grammars.compile(grammar, "response_format")
        hook = PhaseController(
            phases.think,
            phases.answer,
            tags,
            self.loaded.eos_token_ids,
            compiled,
            jump_forward=self.text.encode_text if self.structured.jump_forward else None,
        )
        top = body.top_logprobs if body.top_logprobs is not None else 0
        request = self.request(body, prompt, params, max_tokens, top if body.logprobs else None)
        return self.job([request], hook, len(prompt), body)

    def think_tags(self, body: ChatRequest, options: MuestraOptions) -> TagIds | None:
        """The ids of a chat request's think tags and closing text; None when it does not
        think (the model has no think tags, or `muestra.think` is false)."""
        tags = self.tags
        if options.think and options.think_mode == "text":
            # plain-text reasoning, as a local run of a tagless model reasons
            if body.thinking_token_budget is None:
                raise ApiError(
                    400,
                    'muestra.think_mode "text" needs thinking_token_budget (the reasoning\'s '
                    "token budget)",
                    param="thinking_token_budget",
                )
            close = options.close_text or TEXT_CLOSE_TEXT
            tags = self.structured.tag_ids(ThinkConfig(close_text=close, mode="text"))
        elif tags is not None and options.close_text is not None:
            tags = self.structured.tag_ids(ThinkConfig(close_text=options.close_text))
        if not options.think:
            tags = None
        if tags is None and body.thinking_token_budget is not None and options.think:
            raise ApiError(
                400,
                "thinking_token_budget: this model does not think (its chat template has no "
                "<think> tags); leave it out",
                param="thinking_token_budget",
            )
        return tags

    def chat_phases(
        self,
        body: ChatRequest,
        options: MuestraOptions,
        params: SamplingParams,
        tags: TagIds | None,
        prompt_tokens: int,
    ) -> tuple[Phases, int]:
        """The request's think and answer phases (`answers.decoding.phases_from`) and its
        token budget. The request's own sampling (penalties and logit bias included)
        drives the reasoning, and the answer unless `muestra.answer` sets the answer's."""
        if options.answer is not None:  # the local runner's budget rule
            answer = AnswerSettings(**options.answer.model_dump())
            total = answer.max_tokens
            if tags is not None:
                budget = body.thinking_token_budget or 0
                total += budget + len(tags.open_ids) + len(tags.close_ids) + 2
            max_tokens = self.max_tokens(total, prompt_tokens, "messages")
        else:
            asked = body.max_completion_tokens or body.max_tokens
            max_tokens = self.max_tokens(asked, prompt_tokens, "messages")
            answer = AnswerSettings(max_tokens=max_tokens)
        think = None
        if tags is not None:
            budget = body.thinking_token_budget
            think = ThinkSettings(
                budget=max_tokens if budget is None else budget,
                close_text=options.close_text,
                mode="text" if tags.text else "tags",
            )
        phases = phases_from(PhaseSettings(think, answer), self.loaded)
        return Phases(
            replace(phases.think, params=params) if phases.think is not None else None,
            phases.answer if options.answer is not None else replace(phases.answer, params=params),
        ), max_tokens

    async def completion_job(self, body: CompletionRequest) -> Job:
        self.check_model(body)
        body.refuse_unsupported()
        params = self.params(body)
        prompts = body.prompts()
        self.check_rows(len(prompts), body.n)
        requests = []
        prompt_tokens = 0
        asked = body.max_tokens
        if "max_tokens" not in body.model_fields_set and self.max_tokens_limit is not None:
            asked = min(16, self.max_tokens_limit)  # OpenAI's default, within --max-tokens-limit
        for index, ids in enumerate(await self.encode_prompts(prompts)):
            prompt_tokens += len(ids)
            max_tokens = self.max_tokens(asked, len(ids), "prompt")
            request = self.request(body, ids, params, max_tokens, body.logprobs)
            if index:  # each prompt's choices get their own seeds
                seeds = choice_seeds(sample_seed(request.seed, index, 0), body.n)
                request = GenerationRequest(**{**request.__dict__, "seeds": seeds})
            requests.append(GenerationRequest(**{**request.__dict__, "prompt_index": index}))
        return self.job(requests, NoHook(), prompt_tokens, body)

    async def encode_prompts(self, prompts: list[str | list[int]]) -> list[list[int]]:
        """Token ids of a text completion's prompts (text tokenized off the event loop)."""
        encoded = []
        for index, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                ids = await asyncio.to_thread(self.text.encode_prompt, prompt)
            else:
                ids = list(prompt)
            if not ids:
                raise ApiError(400, f"prompt {index} is empty", param="prompt")
            if max(ids) >= self.loaded.vocab_size or min(ids) < 0:
                raise ApiError(400, f"prompt {index}: a token id is out of range", param="prompt")
            encoded.append(ids)
        return encoded

    def request(
        self,
        body: SamplingFields,
        prompt: list[int],
        params: SamplingParams,
        max_tokens: int,
        logprobs: int | None,
    ) -> GenerationRequest:
        seed = fresh_run_seed() if body.seed is None else body.seed
        return GenerationRequest(
            prompt,
            n=body.n,
            params=params,
            max_new_tokens=max_tokens,
            seed=seed,
            stop=tuple(body.stops()),
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            seeds=choice_seeds(seed, body.n),
        )

    def job(
        self,
        requests: list[GenerationRequest],
        hook: StepHook,
        prompt_tokens: int,
        body: SamplingFields,
    ) -> Job:
        self.check_queue(sum(r.n for r in requests))
        hold = max((len(s.encode()) for s in body.stops()), default=1) - 1
        job = Job(self, requests, hook, prompt_tokens, hold, stream=body.stream)
        try:
            job.start()
        except MuestraError as err:
            raise ApiError(400, str(err)) from err
        return job

    # ---- token text ---------------------------------------------------------------------

    def piece(self, token_id: int) -> bytes:
        return self.text.token_bytes[token_id]
