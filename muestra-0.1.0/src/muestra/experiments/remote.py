"""The remote backend: run an experiment against OpenAI-compatible endpoints.

A model in the spec with `endpoint = "http://host:port/v1"` (or a list of them) is not
loaded; each missing sample becomes one chat request:

- `messages` rendered from the spec, `n = 1`, `seed` = the sample's own seed (the
  same `sample_seed(run seed, prompt, sample)` a local run uses and stores);
- the sampling fields `temperature`, `top_p`, `top_k`, `min_p`, always all four: the
  think phase's as `sampling.py` resolved them before the run (spec, else the model's
  generation_config.json, else the model's `sampling_fallback`; only "server" leaves
  fields out), or the answer's when there is no think phase; `thinking_token_budget`,
  `response_format` json_schema (strict) when the spec has a schema,
  `chat_template_kwargs` for `enable_thinking`;
- `muestra = {answer, close_text, think}`: muestra's own extension, which `muestra
  serve` honours so that a remote run stores the same rows as a local run of the same
  spec (answer sampled apart from the reasoning, the same token budget). vLLM and SGLang
  ignore it: there, one set of sampling fields drives reasoning and answer alike, and
  `max_tokens` = think budget + answer max_tokens + 64.

Several endpoints serving the same model share the run (`EndpointPool`): each has
`concurrency` request slots, and a request goes to the healthy endpoint with the most
free slots, so a faster server takes more rows. 408/409/429, 5xx, timeouts and lost
connections are retried — at once on another healthy endpoint, else with exponential
backoff and jitter (honouring `Retry-After`) — and an endpoint that failed rests for a
while (2 s, doubling up to 60 s, reset by a success) so that the run moves to the
others; any other 4xx stops the run, since every request would fail the same way. Each
row records the endpoint that produced it (`samples.endpoint`). Each answer is stored as
it arrives, so a run killed at any moment resumes with only the missing samples. The
reasoning comes from `reasoning_content` (or `reasoning`, newer vLLM). `field_probs` need
the model's logits and are not available remotely (stored as NULL).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from muestra.answers.grammar import GrammarSpec
from muestra.answers.phases import TEXT_INSTRUCTION, answer_budget_error, with_instruction
from muestra.answers.structured import parse_answer
from muestra.engine.seeds import sample_seed
from muestra.errors import InputError, MuestraError
from muestra.experiments.prompts import messages_for, think_budget
from muestra.experiments.sampling import ThinkSampling, resolve_think
from muestra.experiments.spec import Condition, LoadedSpec, ModelSpec, PromptItem
from muestra.version import __version__

RETRY_STATUS = {408, 409, 429}
CLOSE_TEXT_SLACK = 64  # tokens for the closing text on servers without muestra's extension


class RemoteError(MuestraError):
    """An endpoint refused the run's requests, or stayed unreachable through every retry."""


@dataclass(frozen=True)
class Endpoints:
    model: ModelSpec
    key: str | None

    @classmethod
    def from_spec(cls, model: ModelSpec) -> Endpoints:
        key = None
        if model.api_key_env is not None:
            key = os.environ.get(model.api_key_env)
            if not key:
                raise InputError(
                    f"model {model.name!r}: the environment variable {model.api_key_env} "
                    "(api_key_env) is not set; export it with the endpoint's API key"
                )
        return cls(model, key)

    @property
    def headers(self) -> dict[str, str]:
        headers = {"User-Agent": f"muestra/{__version__}"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        return headers


def request_body(
    spec: LoadedSpec,
    model: ModelSpec,
    condition: Condition,
    item: PromptItem,
    seed: int,
    think_sampling: ThinkSampling | None,
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
        body.update(
            temperature=answer.temperature,
            top_p=answer.top_p,
            top_k=answer.top_k or -1,  # off: see ThinkSampling.request_fields
            min_p=answer.min_p,
        )
    body["muestra"] = {
        "answer": {
            "temperature": answer.temperature,
            "top_p": answer.top_p,
            "top_k": answer.top_k,
            "min_p": answer.min_p,
            "max_tokens": answer.max_tokens,
        },
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


class EndpointPool:
    """Request slots over the run's endpoints: `acquire` waits for a free slot and returns
    the healthy endpoint with the most free slots (ties: the one used least); `release`
    returns the slot and says whether the request failed, which rests the endpoint."""

    REST = 2.0  # seconds an endpoint rests after a failure, doubling per failure in a row
    MAX_REST = 60.0

    def __init__(self, endpoints: list[str], slots: int) -> None:
        self.endpoints = list(endpoints)
        self.free = {e: slots for e in endpoints}
        self.used = {e: 0 for e in endpoints}
        self.failures = {e: 0 for e in endpoints}
        self.resting_until = {e: 0.0 for e in endpoints}
        self.changed = asyncio.Condition()

    def healthy(self, avoid: str | None = None) -> list[str]:
        now = time.monotonic()
        return [e for e in self.endpoints if self.resting_until[e] <= now and e != avoid]

    async def acquire(self, avoid: str | None = None) -> str:
        """A slot on the best endpoint: healthy ones first (not `avoid`, the one that just
        failed this request, while another is healthy), resting ones when all rest."""
        async with self.changed:
            while True:
                candidates = self.healthy(avoid) or self.healthy() or list(self.endpoints)
                open_ = [e for e in candidates if self.free[e] > 0]
                if open_:
                    best = max(open_, key=lambda e: (self.free[e], -self.used[e]))
                    self.free[best] -= 1
                    self.used[best] += 1
                    return best
                # wake on a release, or when a resting endpoint may be back
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), timeout=self.REST)

    def rest(self, endpoint: str) -> None:
        """Count a failure of `endpoint` outside a request (it did not answer at start)."""
        self.failures[endpoint] += 1
        rest = min(self.MAX_REST, self.REST * 2 ** (self.failures[endpoint] - 1))
        self.resting_until[endpoint] = time.monotonic() + rest

    async def release(self, endpoint: str, failed: bool) -> None:
        async with self.changed:
            self.free[endpoint] += 1
            if failed:
                self.rest(endpoint)
            else:
                self.failures[endpoint] = 0
                self.resting_until[endpoint] = 0.0
            self.changed.notify_all()


class RemoteRunner:
    """Sends the missing samples of one model's units; `store(rows)` is called as they
    arrive (one call per sample). `sampling` is the think sampling of each condition
    (`sampling.resolve_think`); resolved here when not given, so that an unresolved field
    stops the run before any request."""

    def __init__(
        self,
        spec: LoadedSpec,
        model: ModelSpec,
        run_seed: int,
        row: Callable[..., dict[str, Any]],
        store: Callable[[list[dict[str, Any]]], None],
        note: Callable[[str], None] = lambda _: None,
        provenance: Callable[[dict[str, Any]], None] = lambda _: None,
        sampling: Mapping[str, ThinkSampling] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,  # tests put a fake server here
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

    def run(self, units: list[Any]) -> None:
        asyncio.run(self._run(units))

    async def _run(self, units: list[Any]) -> None:
        model = self.model
        connections = model.concurrency * len(model.endpoints)
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        timeout = httpx.Timeout(model.timeout, connect=min(30.0, model.timeout))
        async with httpx.AsyncClient(
            timeout=timeout, limits=limits, transport=self.transport
        ) as client:
            self.pool = EndpointPool(model.endpoints, model.concurrency)
            self.on_provenance(await self._describe(client))
            jobs = [self._sample(client, unit, index) for unit in units for index in unit.missing]
            tasks = [asyncio.ensure_future(job) for job in jobs]
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _describe(self, client: httpx.AsyncClient) -> dict[str, Any]:
        """Check that every endpoint that answers serves the model; its provenance for the
        store. With several endpoints, one that does not answer (two tries) is left
        resting and the run starts on the others; with one, or none answering, the run
        stops."""
        served_by = set()
        endpoints = self.endpoints.model.endpoints
        down: dict[str, str] = {}
        for endpoint in endpoints:
            try:
                data = await self._call(
                    client, "GET", "/models", None, endpoint,
                    retries=self.model.retries if len(endpoints) == 1 else 1,
                )  # fmt: skip
            except RemoteError as err:
                if len(endpoints) == 1 or "gave up" not in str(err):
                    raise
                down[endpoint] = str(err)
                continue
            entries = {m.get("id"): m for m in data.get("data", [])}
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
        if served_by != {"muestra"}:
            self.note(
                f"{self.model.name}: the endpoint is not muestra serve ({', '.join(served_by)}): "
                "the answer is sampled with the think settings, field_probs are not stored, "
                "and rows can differ from a local run"
            )
        return {
            "model_id": self.model.id,
            "endpoints": self.endpoints.model.endpoints,
            "served_by": sorted(served_by),
            "source": "remote",
            "sampling_fallback": self.model.sampling_fallback,
        }

    async def _sample(self, client: httpx.AsyncClient, unit: Any, index: int) -> None:
        seed = sample_seed(self.run_seed, unit.prompt_index, index)
        think_sampling = self.sampling.get(unit.condition.label)
        body = request_body(self.spec, self.model, unit.condition, unit.item, seed, think_sampling)
        data, endpoint, seconds = await self._post(client, "/chat/completions", body)
        self.store([self._row(unit, index, seed, data, seconds, endpoint)])

    async def _post(
        self, client: httpx.AsyncClient, path: str, body: dict[str, Any]
    ) -> tuple[dict[str, Any], str, float]:
        """One sample's request through the pool, with retries: (answer, the endpoint
        that gave it, its seconds)."""
        last, failed_on = "", None
        for attempt in range(self.model.retries + 1):
            base = await self.pool.acquire(avoid=failed_on)
            started = time.perf_counter()
            try:
                data, last, wait = await self._once(client, "POST", f"{base}{path}", body, attempt)
            except BaseException:
                await self.pool.release(base, failed=False)
                raise
            await self.pool.release(base, failed=data is None)
            if data is not None:
                return data, base, time.perf_counter() - started
            failed_on = base
            if attempt < self.model.retries and not self.pool.healthy(avoid=base):
                await asyncio.sleep(wait)  # nowhere else to go: back off
        raise RemoteError(f"gave up after {self.model.retries} retries; last error: {last}")

    async def _once(
        self,
        client: httpx.AsyncClient,
        method: str,
        url: str,
        body: dict[str, Any] | None,
        attempt: int,
    ) -> tuple[dict[str, Any] | None, str, float]:
        """One try: (answer or None when it may be retried, what went wrong, how long to
        wait before the next try); a refusal no retry can mend raises `RemoteError`."""
        wait = min(30.0, 0.5 * 2**attempt) * (0.5 + random.random())
        try:
            response = await client.request(method, url, json=body, headers=self.endpoints.headers)
        except httpx.TransportError as err:
            return None, f"{url}: {type(err).__name__}: {err}", wait
        if response.status_code == 200:
            return response.json(), "", wait
        last = f"{url} answered {response.status_code}: {_error_message(response)}"
        if response.status_code not in RETRY_STATUS and response.status_code < 500:
            raise RemoteError(last)
        after = response.headers.get("retry-after", "")
        if after.replace(".", "", 1).isdigit():
            wait = max(wait, float(after))
        return None, last, wait

    async def _call(
        self,
        client: httpx.AsyncClient,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        endpoint: str,
        retries: int | None = None,
    ) -> dict[str, Any]:
        """One request to one endpoint (the start's checks), with retries and backoff."""
        last = ""
        retries = self.model.retries if retries is None else retries
        for attempt in range(retries + 1):
            data, last, wait = await self._once(client, method, f"{endpoint}{path}", body, attempt)
            if data is not None:
                return data
            if attempt < retries:
                await asyncio.sleep(wait)
        raise RemoteError(f"gave up after {retries} retries; last error: {last}")

    def _row(
        self, unit: Any, index: int, seed: int, data: dict[str, Any], seconds: float, endpoint: str
    ) -> dict[str, Any]:
        try:
            choice = data["choices"][0]
            message = choice["message"]
        except (KeyError, IndexError, TypeError) as err:
            raise RemoteError(f"the endpoint's answer has no choices[0].message: {data}") from err
        content = message.get("content") or ""
        reasoning = message.get("reasoning_content", message.get("reasoning"))
        extension = choice.get("muestra") or {}
        usage = data.get("usage") or {}
        details = usage.get("completion_tokens_details") or {}
        budget = think_budget(unit.condition, unit.item)
        think_tokens = int(extension.get("reasoning_tokens", details.get("reasoning_tokens") or 0))
        budget_hit = extension.get("budget_hit", budget is not None and think_tokens >= budget)
        finish = choice.get("finish_reason") or "stop"
        answer, error = None, None
        if self.grammar is not None:
            if finish == "length":
                error = answer_budget_error(unit.condition.answer.max_tokens)
            else:
                answer, _, error = parse_answer(content, finish, self.grammar)
        sample = _RemoteSample(
            sample=index,
            seed=seed,
            reasoning=(reasoning or "") if unit.condition.think is not None else None,
            think_tokens=think_tokens,
            budget_hit=bool(budget_hit),
            answer_text=content,
            answer=answer,
            field_probs=None,
            finish_reason=finish,
            error=error,
            num_prompt_tokens=int(usage.get("prompt_tokens") or 0),
            num_tokens=int(extension.get("completion_tokens", usage.get("completion_tokens") or 0)),
        )
        return {**self.row(unit, sample, budget, seconds), "endpoint": endpoint}


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


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
        if isinstance(error, dict):
            return str(error.get("message"))
        return str(error or response.text[:300])
    except ValueError:
        return response.text[:300]
