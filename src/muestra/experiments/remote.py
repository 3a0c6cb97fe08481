"""The remote backend: run an experiment against OpenAI-compatible endpoints.

A model in the spec with `endpoint = "http://host:port/v1"` (or a list of them) is not
loaded; each missing sample becomes one chat request:

- `messages` rendered from the spec, `n = 1`, `seed` = the sample's own seed (the
  same `sample_seed(run seed, prompt's seed index, sample)` a local run uses and
  stores);
- the sampling settings a remote run sends (`settings.REMOTE`: temperature, top-p, top-k,
  min-p), always all of them: the think phase's as `sampling.py` resolved them before
  the run (spec, else the model's generation_config.json, else the model's
  `sampling_fallback`; only "server" leaves fields out), or the answer's when there is
  no think phase; `thinking_token_budget`,
  `response_format` json_schema (strict) when the spec has a schema,
  `chat_template_kwargs` for `enable_thinking`;
- `muestra = {answer, close_text, think}`: muestra's own extension, which `muestra
  serve` honours so that a remote run stores the same rows as a local run of the same
  spec (answer sampled apart from the reasoning, the same token budget). vLLM and SGLang
  ignore it: there, one set of sampling fields drives reasoning and answer alike, and
  `max_tokens` = think budget + answer max_tokens + 64.

Several endpoints serving the same model share the run (`EndpointPool`, in
`endpoints.py`): each has `concurrency` request slots, one worker per slot takes the next
missing sample, and a request goes to the healthy endpoint with the most free slots, so a
faster server takes more rows. 408/409/429, 5xx, timeouts, lost connections and 200
answers that are not JSON or lack what the runner reads (`endpoints.read_chat`) are
retried — at once on another healthy endpoint, else with exponential backoff and jitter
(honouring `Retry-After`) — and an endpoint that failed rests for a while (2 s, doubling
up to 60 s, reset by a success) so that the run moves to the others; any other 4xx stops
the run, since every request would fail the same way. Each row records the endpoint that
produced it (`samples.endpoint`). Answers are stored as they arrive, in one transaction
per batch (`RowBatches`: 256 rows, or 0.2 s after the first), so a run killed at any
moment resumes with only the missing samples. The reasoning comes from
`reasoning_content` (or `reasoning`, newer vLLM). `field_probs` need the model's logits
and are not available remotely (stored as NULL).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from muestra.answers.grammar import GrammarSpec
from muestra.answers.phases import TEXT_INSTRUCTION, answer_budget_error, with_instruction
from muestra.answers.structured import parse_answer
from muestra.engine.seeds import sample_seed
from muestra.errors import MuestraError
from muestra.experiments.endpoints import (
    AiohttpTransport,
    Answer,
    ChatReply,
    EndpointPool,
    Endpoints,
    Malformed,
    Transport,
    Unreachable,
    read_chat,
    read_models,
)
from muestra.experiments.prompts import messages_for, think_budget
from muestra.experiments.row_batches import RowBatches
from muestra.experiments.sampling import RemoteThink, resolve_think
from muestra.experiments.spec import Condition, LoadedSpec, ModelSpec, PromptItem
from muestra.settings import REMOTE, phase_request, to_request

RETRY_STATUS = {408, 409, 429}
CLOSE_TEXT_SLACK = 64  # tokens for the closing text on servers without muestra's extension
NO_REASONING_LIMIT = 8  # answers of a think condition without reasoning before it stops
T = TypeVar("T")


class RemoteError(MuestraError):
    """An endpoint refused the run's requests, or stayed unreachable through every retry."""


def request_body(
    spec: LoadedSpec,
    model: ModelSpec,
    condition: Condition,
    item: PromptItem,
    seed: int,
    think_sampling: RemoteThink | None,
) -> dict[str, Any]:
    think, answer = condition.think, condition.answer
    budget = think_budget(condition, item)
    messages = messages_for(spec, item)
    text_mode = think is not None and think_sampling is not None and think_sampling.mode == "text"
    if text_mode:  # plain-text reasoning: asked for in the prompt, as a local run asks
        assert think is not None
        messages = with_instruction(messages, think.instruction or TEXT_INSTRUCTION)
    body: dict[str, Any] = {
        "model": model.id,
        "messages": messages,
        "n": 1,
        "seed": seed,
        "max_tokens": (budget or 0) + answer.max_tokens + (CLOSE_TEXT_SLACK if think else 0),
    }
    if think is not None:
        assert think_sampling is not None, f"condition {condition.label!r} was not resolved"
        body.update(think_sampling.request_fields())
        body["thinking_token_budget"] = budget
    else:
        body.update(_answer_fields(condition))
    body["muestra"] = {
        "answer": {**phase_request(answer), "max_tokens": answer.max_tokens},
        "think": think is not None,
    }
    if answer.stop:
        body["stop"] = list(answer.stop)
    if think is not None and think.close_text is not None:
        body["muestra"]["close_text"] = think.close_text
    if text_mode:
        body["muestra"]["think_mode"] = "text"
    if spec.answer_schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": spec.answer_schema, "strict": True},
        }
    if spec.spec.prompt.enable_thinking is not None:
        body["chat_template_kwargs"] = {"enable_thinking": spec.spec.prompt.enable_thinking}
    return body


class RemoteRunner:
    """Sends the missing samples of one model's units; `store(rows)` is called with the
    answers as they arrive, a batch at a time (`RowBatches`). `sampling` is the think
    sampling of each condition (`sampling.resolve_think`); resolved here when not given,
    so that an unresolved field stops the run before any request."""

    def __init__(
        self,
        spec: LoadedSpec,
        model: ModelSpec,
        run_seed: int,
        row: Callable[..., dict[str, Any]],
        store: Callable[[list[dict[str, Any]]], None],
        note: Callable[[str], None] = lambda _: None,
        provenance: Callable[[dict[str, Any]], None] = lambda _: None,
        sampling: Mapping[str, RemoteThink] | None = None,
        transport: Transport | None = None,  # tests put a fake server here
    ) -> None:
        self.spec = spec
        self.model = model
        self.endpoints = Endpoints.from_spec(model)
        self.sampling = sampling if sampling is not None else resolve_think(spec, model)
        self.run_seed = run_seed
        self.row = row
        self.store = store
        self.note = note
        self.on_provenance = provenance
        self.transport = transport
        self.grammar = (
            GrammarSpec.json_schema(spec.answer_schema) if spec.answer_schema is not None else None
        )
        self.pool = EndpointPool(model.endpoints, model.concurrency)
        self.bodies: dict[tuple[str, int], bytes] = {}  # a unit's encoded body, but the seed
        self.reasoned: dict[str, list[int]] = {}  # by condition: answers with, without reasoning

    def run(self, units: list[Any]) -> None:
        asyncio.run(self._run(units))

    async def _run(self, units: list[Any]) -> None:
        """One worker per request slot, each taking the next missing sample: as many
        requests in flight as the endpoints have slots, and memory that does not grow
        with the number of samples."""
        model = self.model
        connections = model.concurrency * len(model.endpoints)
        transport = self.transport or AiohttpTransport(
            connections, model.timeout, min(30.0, model.timeout)
        )
        try:
            self.pool = EndpointPool(model.endpoints, model.concurrency)
            self.on_provenance(await self._describe(transport))
            work = ((unit, index) for unit in units for index in unit.missing)
            rows = RowBatches(self.store)
            workers = [
                asyncio.ensure_future(self._work(transport, work, rows)) for _ in range(connections)
            ]
            try:
                await asyncio.gather(*workers)
            finally:
                for worker in workers:
                    worker.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                rows.flush()  # what arrived is stored, however the run ends
        finally:
            await transport.aclose()

    async def _work(self, transport: Transport, work: Iterator[Any], rows: RowBatches) -> None:
        for unit, index in work:
            rows.add(await self._sample(transport, unit, index))

    async def _describe(self, transport: Transport) -> dict[str, Any]:
        """Check that every endpoint that answers serves the model; its provenance for the
        store. With several endpoints, one that does not answer, or answers what is not a
        model list (two tries), is left resting and the run starts on the others; with
        one, or none answering, the run stops."""
        served_by = set()
        endpoints = self.endpoints.model.endpoints
        down: dict[str, str] = {}
        for endpoint in endpoints:
            try:
                entries = await self._call(
                    transport, "GET", "/models", read_models, endpoint,
                    retries=self.model.retries if len(endpoints) == 1 else 1,
                )  # fmt: skip
            except RemoteError as err:
                if len(endpoints) == 1 or "gave up" not in str(err):
                    raise
                down[endpoint] = str(err)
                continue
            if self.model.id not in entries:
                raise RemoteError(
                    f"{endpoint} does not serve {self.model.id!r} (it serves "
                    f"{', '.join(map(str, entries)) or 'nothing'}); set [model] id to the served "
                    "name"
                )
            served_by.add(str(entries[self.model.id].get("owned_by", "unknown")))
        if len(down) == len(endpoints):
            raise RemoteError(
                "no endpoint answers: " + "; ".join(f"{e}: {why}" for e, why in down.items())
            )
        for endpoint, why in down.items():
            self.pool.rest(endpoint)
            self.note(f"{self.model.name}: {endpoint} does not answer ({why}); the run starts "
                      "on the other endpoints and tries it again later")  # fmt: skip
        text = sorted(label for label, t in self.sampling.items() if t.mode == "text")
        if text and served_by != {"muestra"}:
            raise RemoteError(
                f"{self.model.name}: condition(s) {', '.join(text)} reason in plain text (the "
                "model has no think tags), which an endpoint answers only through muestra "
                f"serve's extension; these endpoints are {', '.join(sorted(served_by))}. Serve "
                "the model with `muestra serve`, or run the spec locally"
            )
        for note in endpoint_notes(self.spec, self.model, self.sampling, served_by):
            self.note(note)
        return {
            "model_id": self.model.id,
            "endpoints": self.endpoints.model.endpoints,
            "served_by": sorted(served_by),
            "source": "remote",
            "sampling_fallback": self.model.sampling_fallback,
        }

    async def _sample(self, transport: Transport, unit: Any, index: int) -> dict[str, Any]:
        seed = sample_seed(self.run_seed, unit.seed_index, index)
        key = (unit.condition.label, unit.prompt_index)
        if key not in self.bodies:  # the same for every sample of the unit but the seed
            think_sampling = self.sampling.get(unit.condition.label)
            body = request_body(
                self.spec, self.model, unit.condition, unit.item, seed, think_sampling
            )
            del body["seed"]  # encoded once; each sample's seed closes the object
            self.bodies[key] = json.dumps(body).removesuffix("}").encode() + b', "seed": '
        data = self.bodies[key] + b"%d}" % seed
        reply, endpoint, seconds = await self._post(transport, "/chat/completions", data)
        if unit.condition.think is not None:
            self._check_reasoning(unit.condition.label, reply)
        return self._row(unit, index, seed, reply, seconds, endpoint)

    def _check_reasoning(self, label: str, reply: ChatReply) -> None:
        """Stop a think condition whose first answers all come back without a reasoning
        field: the server did not reason or did not split the reasoning out, and every
        row would be stored without it (a silent fallback)."""
        seen = self.reasoned.setdefault(label, [0, 0])  # [with, without] reasoning
        seen[reply.reasoning is None] += 1
        if seen[0] == 0 and seen[1] >= NO_REASONING_LIMIT:
            mode = self.sampling[label].mode
            raise RemoteError(
                f"{self.model.name}, condition {label}: {seen[1]} answers in a row came back "
                "with no reasoning (no reasoning_content or reasoning field) although the "
                f"spec has a think phase (mode {mode!r}). Either the model has no think "
                'tags — then set [think] mode = "text" and serve it with `muestra serve` — '
                "or the server does not split the reasoning out (vLLM/SGLang: "
                "--reasoning-parser; llama-server: --reasoning-format deepseek)"
            )

    async def _post(
        self, transport: Transport, path: str, body: bytes
    ) -> tuple[ChatReply, str, float]:
        """One sample's request through the pool, with retries: (answer, the endpoint
        that gave it, its seconds)."""
        last, failed_on = "", None
        for attempt in range(self.model.retries + 1):
            base = await self.pool.acquire(avoid=failed_on)
            started = time.perf_counter()
            try:
                reply, last, wait = await self._once(
                    transport, "POST", f"{base}{path}", body, read_chat, attempt
                )
            except BaseException:
                await self.pool.release(base, failed=False)
                raise
            await self.pool.release(base, failed=reply is None)
            if reply is not None:
                return reply, base, time.perf_counter() - started
            failed_on = base
            if attempt < self.model.retries and not self.pool.healthy(avoid=base):
                await asyncio.sleep(wait)  # nowhere else to go: back off
        raise RemoteError(f"gave up after {self.model.retries} retries; last error: {last}")

    async def _once(
        self,
        transport: Transport,
        method: str,
        url: str,
        body: bytes | None,
        read: Callable[[Any], T],
        attempt: int,
    ) -> tuple[T | None, str, float]:
        """One try: (the answer as `read` reads it, or None when it may be retried; what
        went wrong; how long to wait before the next try). A 200 whose body `read` cannot
        read is the endpoint's failure, retried like a 5xx; a refusal no retry can mend
        raises `RemoteError`."""
        wait = min(30.0, 0.5 * 2**attempt) * (0.5 + random.random())
        try:
            response = await transport.request(method, url, body, self.endpoints.headers)
        except Unreachable as err:
            return None, f"{url}: {err}", wait
        if response.status == 200:
            try:
                return read(response.json()), "", wait
            except ValueError as err:  # not JSON (JSONDecodeError), or `Malformed`
                why = err if isinstance(err, Malformed) else "not JSON"
                shown = response.text[:120]
                return None, f"{url} answered 200 with an unreadable body ({why}): {shown!r}", wait
        last = f"{url} answered {response.status}: {_error_message(response)}"
        if response.status not in RETRY_STATUS and response.status < 500:
            raise RemoteError(last)
        after = response.headers.get("retry-after", "")
        if after.replace(".", "", 1).isdigit():
            wait = max(wait, float(after))
        return None, last, wait

    async def _call(
        self,
        transport: Transport,
        method: str,
        path: str,
        read: Callable[[Any], T],
        endpoint: str,
        retries: int | None = None,
    ) -> T:
        """One request to one endpoint (the start's checks), with retries and backoff."""
        last = ""
        retries = self.model.retries if retries is None else retries
        for attempt in range(retries + 1):
            answer, last, wait = await self._once(
                transport, method, f"{endpoint}{path}", None, read, attempt
            )
            if answer is not None:
                return answer
            if attempt < retries:
                await asyncio.sleep(wait)
        raise RemoteError(f"gave up after {retries} retries; last error: {last}")

    def _row(
        self, unit: Any, index: int, seed: int, reply: ChatReply, seconds: float, endpoint: str
    ) -> dict[str, Any]:
        budget = think_budget(unit.condition, unit.item)
        think_tokens = reply.reasoning_tokens or 0
        budget_hit = reply.budget_hit
        if budget_hit is None:
            budget_hit = budget is not None and think_tokens >= budget
        answer, error = None, None
        if self.grammar is not None:
            if reply.finish_reason == "length":
                error = answer_budget_error(unit.condition.answer.max_tokens)
            else:
                answer, _, error = parse_answer(reply.content, reply.finish_reason, self.grammar)
        sample = _RemoteSample(
            sample=index,
            seed=seed,
            reasoning=(reply.reasoning or "") if unit.condition.think is not None else None,
            think_tokens=think_tokens,
            budget_hit=budget_hit,
            answer_text=reply.content,
            answer=answer,
            field_probs=None,
            finish_reason=reply.finish_reason,
            error=error,
            num_prompt_tokens=reply.prompt_tokens,
            num_tokens=reply.completion_tokens,
        )
        return {**self.row(unit, sample, budget, seconds), "endpoint": endpoint}


def endpoint_notes(
    spec: LoadedSpec,
    model: ModelSpec,
    sampling: Mapping[str, RemoteThink],
    served_by: set[str],
) -> list[str]:
    """What a run on these endpoints cannot do as a local run does; each note only when it
    applies to this spec."""
    notes = []
    if spec.answer_schema is not None and any(c.answer.field_probs for c in spec.conditions):
        notes.append(
            f"{model.name}: field_probs need the model's logits: an endpoint model stores "
            "none (NULL)"
        )
    if served_by == {"muestra"}:
        return notes
    servers = ", ".join(sorted(served_by))
    differ = [
        c.label
        for c in spec.conditions
        if c.think is not None and _answer_fields(c) != sampling[c.label].request_fields()
    ]
    if differ:
        notes.append(
            f"{model.name}: the endpoint is not muestra serve ({servers}): it samples the "
            f"answer with the think settings, not the [answer] ones, in condition(s) "
            f"{', '.join(differ)}"
        )
    notes.append(
        f"{model.name}: the endpoint is not muestra serve ({servers}): its rows can differ "
        "from a local run's"
    )
    return notes


def _answer_fields(condition: Condition) -> dict[str, Any]:
    """The answer's sampling, as a request carries it (`settings.to_request`: top_k off
    goes out as -1)."""
    answer = condition.answer
    return {name: to_request(name, getattr(answer, name)) for name in REMOTE}


@dataclass
class _RemoteSample:
    """The fields of a `StructuredSample` the store keeps, from an endpoint's answer."""

    sample: int
    seed: int
    reasoning: str | None
    think_tokens: int
    budget_hit: bool
    answer_text: str
    answer: Any
    field_probs: Any
    finish_reason: str
    error: str | None
    num_prompt_tokens: int
    num_tokens: int


def _error_message(response: Answer) -> str:
    try:
        data = response.json()
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):
            return str(error.get("message"))
        return str(error or response.text[:300])
    except ValueError:
        return response.text[:300]
