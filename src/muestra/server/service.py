"""What `muestra serve` does with a request, apart from HTTP.

`ServedModel` holds the loaded model, its `StructuredGenerator` (tokenizer, grammar
backend, think tags) and the continuous-batching `Scheduler`. `chat_job` and
`completion_job` turn a validated request body into engine requests plus a hook (the
phase controller: thinking budget, then the `response_format` grammar), and a `Job`
that follows its samples as they decode.

How tokens become text: every generated token is labelled by the phase controller as
`reasoning`, `content` or `tag` (think tags, the forced closing text, the final EOS).
`SampleText` keeps the bytes of each sample with those labels and hands out text per
channel through incremental UTF-8 decoders, holding back the last bytes that could
still become a stop string, so a stream never shows part of a stop string or half a
character. Stop strings are matched on everything the model generates (as the engine
does), and the text is cut where the first one starts.

`max_tokens` (or `max_completion_tokens`) counts every generated token, reasoning
included, as vLLM and OpenAI's reasoning models count them: it bounds the cost of a
request whatever the model does. `thinking_token_budget` bounds the reasoning alone;
when it runs out the controller closes the think block and the answer follows.
"""

from __future__ import annotations

import asyncio
import codecs
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from muestra.answers.grammar import GrammarSpec
from muestra.answers.phases import AnswerConfig, PhaseController, PhaseState, ThinkConfig
from muestra.answers.structured import StructuredGenerator
from muestra.engine import GenerationRequest, NoHook, Sample, SamplingParams, StepHook
from muestra.engine.scheduler import Scheduler, Submission, Update
from muestra.engine.seeds import fresh_run_seed, sample_seed
from muestra.errors import InputError, MuestraError
from muestra.models.loading import LoadedModel
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

ANY_JSON_OBJECT = {"type": "object", "additionalProperties": True}
# prompts × n of one request: bounds what a single client can queue at once
DEFAULT_MAX_ROWS_PER_REQUEST = 256


@dataclass
class TokenRecord:
    choice: int
    token_id: int
    channel: str  # "reasoning", "content" or "tag"
    logprobs: Any  # engine TokenLogprobs or None


@dataclass
class Finished:
    choice: int
    sample: Sample
    reasoning_tokens: int
    budget_hit: bool


class SampleText:
    """The text of one sample, split into reasoning and content (see the module doc)."""

    def __init__(self, hold: int) -> None:
        self.hold = hold
        self.data = bytearray()
        self.spans: list[tuple[int, int, str]] = []
        self.sent = 0
        self.decoders = {
            name: codecs.getincrementaldecoder("utf-8")(errors="replace")
            for name in ("reasoning", "content")
        }
        self.logprobs: list[tuple[int, Any]] = []  # (byte start, TokenLogprobs) of content

    def add(self, piece: bytes, channel: str, logprobs: Any) -> None:
        start = len(self.data)
        self.data += piece
        self.spans.append((start, len(self.data), channel))
        if channel == "content" and logprobs is not None:
            self.logprobs.append((start, logprobs))

    def take(self, final: bool = False, cut: int | None = None) -> dict[str, str]:
        """New text per channel; `final` flushes everything up to `cut` (a stop string)."""
        end = len(self.data)
        limit = min(end, cut) if cut is not None else end
        if not final:
            limit = min(limit, end - self.hold)
        out = {"reasoning": "", "content": ""}
        if limit > self.sent:
            for start, stop, channel in self.spans:
                if channel == "tag" or stop <= self.sent or start >= limit:
                    continue
                chunk = bytes(self.data[max(start, self.sent) : min(stop, limit)])
                out[channel] += self.decoders[channel].decode(chunk)
            self.sent = limit
        if final:
            for channel, decoder in self.decoders.items():
                out[channel] += decoder.decode(b"", final=True)
        return out

    def content_logprobs(self, cut: int | None) -> list[Any]:
        return [lp for start, lp in self.logprobs if cut is None or start < cut]


@dataclass
class Job:
    """One HTTP request's samples, followed from the scheduler thread into asyncio."""

    served: ServedModel
    requests: list[GenerationRequest]
    hook: StepHook
    prompt_tokens: int
    hold: int
    stream: bool = False
    queue: asyncio.Queue[list[Any]] = field(default_factory=asyncio.Queue)
    submission: Submission | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def choices(self) -> int:
        return sum(r.n for r in self.requests)

    def choice_of(self, first_index: int, request_index: int, sample_index: int) -> int:
        local = request_index - first_index
        return sum(r.n for r in self.requests[:local]) + sample_index

    def start(self) -> None:
        loop = asyncio.get_running_loop()

        def deliver(update: Update) -> None:  # runs in the scheduler thread
            records: list[Any] = []
            if self.stream:
                for row, token in update.tokens:
                    records.append(
                        TokenRecord(
                            self.choice_of(update.first_index, row.request_index, row.sample_index),
                            token.token_id,
                            _channel(row, token),
                            token.logprobs,
                        )
                    )
            for sample in update.finished:
                choice = self.choice_of(
                    update.first_index, sample.request_index, sample.sample_index
                )
                state = sample.state
                if not self.stream:  # the whole sample at once: no event-loop work per step
                    records += _token_records(choice, sample)
                records.append(
                    Finished(
                        choice,
                        sample,
                        state.think_tokens if isinstance(state, PhaseState) else 0,
                        bool(state.budget_hit) if isinstance(state, PhaseState) else False,
                    )
                )
            if update.error is not None:
                records.append(update.error)
            if records:
                loop.call_soon_threadsafe(self.queue.put_nowait, records)

        self.submission = self.served.scheduler.submit(self.requests, deliver, self.hook)

    def cancel(self) -> None:
        if self.submission is not None and not self.submission.done.is_set():
            self.served.scheduler.cancel(self.submission)

    async def records(self) -> AsyncIterator[list[Any]]:
        """Lists of `TokenRecord`/`Finished` until every choice finished; raises on error."""
        left = self.choices
        while left:
            batch = await self.queue.get()
            for record in batch:
                if isinstance(record, BaseException):
                    raise ApiError(500, f"generation failed: {record}", code="engine_error")
            left -= sum(isinstance(r, Finished) for r in batch)
            yield batch


def choice_seeds(seed: int, n: int) -> list[int]:
    """Generator seed of each choice: choice 0 uses `seed` itself, so any stored sample
    seed replays through the API with n=1; the others derive from it."""
    return [seed] + [sample_seed(seed, 0, i) for i in range(1, n)]


def _token_records(choice: int, sample: Sample) -> list[TokenRecord]:
    """The token records of a finished sample (what a stream would have delivered)."""
    state = sample.state
    channels = state.channels if isinstance(state, PhaseState) else None
    logprobs = sample.logprobs or [None] * len(sample.token_ids)
    records = []
    last = len(sample.token_ids) - 1
    for index, token_id in enumerate(sample.token_ids):
        if channels is not None:
            channel = channels[index]
        else:
            finish = sample.finish_reason if index == last else None
            channel = _plain_channel(token_id, finish, sample.stop_reason)
        records.append(TokenRecord(choice, token_id, channel, logprobs[index]))
    return records


def _channel(row: Any, token: Any) -> str:
    state = row.state
    if isinstance(state, PhaseState) and state.channels:
        return state.channels[-1]
    return _plain_channel(token.token_id, token.finish_reason, row.stop_reason)


def _plain_channel(token_id: int, finish_reason: str | None, stop_reason: Any) -> str:
    """Without a phase controller every token is content, but the EOS that ended it."""
    return "tag" if finish_reason == "stop" and stop_reason == token_id else "content"


class ServedModel:
    def __init__(
        self,
        loaded: LoadedModel,
        name: str,
        *,
        max_batch: int = 64,
        max_tokens_limit: int | None = None,
        max_rows_per_request: int = DEFAULT_MAX_ROWS_PER_REQUEST,
        trust_request_chat_template: bool = False,
        template_limits: TemplateLimits = TemplateLimits(),
    ) -> None:
        self.loaded = loaded
        self.name = name
        self.structured = StructuredGenerator(loaded, max_batch=max_batch)
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
        config = loaded.model.generation_config
        sampled = bool(getattr(config, "do_sample", False))
        self.defaults = {
            "temperature": float(config.temperature or 1.0) if sampled else 1.0,
            "top_p": float(config.top_p or 1.0) if sampled else 1.0,
            "top_k": int(config.top_k or 0) if sampled else 0,
            "min_p": float(getattr(config, "min_p", None) or 0.0) if sampled else 0.0,
            "repetition_penalty": float(getattr(config, "repetition_penalty", None) or 1.0),
        }

    def close(self) -> None:
        self.scheduler.close()

    # ---- building jobs --------------------------------------------------------------

    def check_model(self, body: SamplingFields) -> None:
        if body.model != self.name:
            raise ApiError(
                404,
                f"the model {body.model!r} does not exist; this server serves {self.name!r}",
                param="model",
                code="model_not_found",
            )

    def params(self, body: SamplingFields) -> SamplingParams:
        value = {k: getattr(body, k) for k in self.defaults}
        value = {k: self.defaults[k] if v is None else v for k, v in value.items()}
        if value["top_k"] == -1:
            value["top_k"] = 0  # vLLM's "off"
        # as vLLM: a top_k above the vocabulary keeps all of it
        value["top_k"] = min(value["top_k"], self.loaded.vocab_size)
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
            return SamplingParams(
                **value,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                logit_bias=bias,
            )
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

    async def chat_job(self, body: ChatRequest) -> Job:
        self.check_model(body)
        body.refuse_unsupported()
        self.check_rows(1, body.n)
        params = self.params(body)
        prompt = await asyncio.to_thread(self.chat_prompt, body)
        options = body.muestra or MuestraOptions()
        tags = self.tags
        if tags is not None and options.close_text is not None:
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
        if options.answer is not None:  # the local runner's budget rule
            a = options.answer
            answer = AnswerConfig(
                SamplingParams(
                    temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p
                ),
                a.max_tokens,
            )
            total = a.max_tokens
            if tags is not None:
                budget = body.thinking_token_budget or 0
                total += budget + len(tags.open_ids) + len(tags.close_ids) + 2
            max_tokens = self.max_tokens(total, len(prompt), "messages")
        else:
            asked = body.max_completion_tokens or body.max_tokens
            max_tokens = self.max_tokens(asked, len(prompt), "messages")
            answer = AnswerConfig(params=params, max_tokens=max_tokens)
        think = None
        if tags is not None:
            budget = body.thinking_token_budget
            think = ThinkConfig(
                params=params,
                budget=max_tokens if budget is None else budget,
                close_text=options.close_text or ThinkConfig().close_text,
            )
        grammar = self.grammar(body)
        compiled = None
        if grammar is not None:
            backend = self.structured.backend
            try:
                compiled = (backend, await asyncio.to_thread(backend.compile, grammar))
            except InputError as err:
                raise ApiError(400, str(err), param="response_format") from err
        hook = PhaseController(think, answer, tags, self.loaded.eos_token_ids, compiled)
        top = body.top_logprobs if body.top_logprobs is not None else 0
        request = self.request(body, prompt, params, max_tokens, top if body.logprobs else None)
        return self.job([request], hook, len(prompt), body)

    async def completion_job(self, body: CompletionRequest) -> Job:
        self.check_model(body)
        body.refuse_unsupported()
        params = self.params(body)
        prompts = body.prompts()
        self.check_rows(len(prompts), body.n)
        requests = []
        prompt_tokens = 0
        for index, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                ids = await asyncio.to_thread(self.text.encode_text, prompt)
            else:
                ids = list(prompt)
            if not ids:
                raise ApiError(400, f"prompt {index} is empty", param="prompt")
            if max(ids) >= self.loaded.vocab_size or min(ids) < 0:
                raise ApiError(400, f"prompt {index}: a token id is out of range", param="prompt")
            prompt_tokens += len(ids)
            max_tokens = self.max_tokens(body.max_tokens, len(ids), "prompt")
            request = self.request(body, ids, params, max_tokens, body.logprobs)
            if index:  # each prompt's choices get their own seeds
                seeds = choice_seeds(sample_seed(request.seed, index, 0), body.n)
                request = GenerationRequest(**{**request.__dict__, "seeds": seeds})
            requests.append(GenerationRequest(**{**request.__dict__, "prompt_index": index}))
        return self.job(requests, NoHook(), prompt_tokens, body)

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
