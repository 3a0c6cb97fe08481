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

At most `concurrency` requests are in flight; 408/409/429, 5xx, timeouts and lost
connections are retried with exponential backoff and jitter (honouring `Retry-After`),
spreading retries over the endpoints; any other 4xx stops the run, since every request
would fail the same way. Each answer is stored as it arrives, so a run killed at any
moment resumes with only the missing samples. The reasoning comes from
`reasoning_content` (or `reasoning`, newer vLLM). `field_probs` need the model's logits
and are not available remotely (stored as NULL).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from muestra import __version__
from muestra.answers.grammar import GrammarSpec
from muestra.answers.phases import answer_budget_error
from muestra.answers.structured import parse_answer
from muestra.engine.seeds import sample_seed
from muestra.errors import InputError, MuestraError
from muestra.experiments.prompts import messages_for, think_budget
from muestra.experiments.sampling import ThinkSampling, resolve_think
from muestra.experiments.spec import Condition, LoadedSpec, ModelSpec, PromptItem

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
    body: dict[str, Any] = {
        "model": model.id,
        "messages": messages_for(spec, item),
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
    if spec.answer_schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": spec.answer_schema, "strict": True},
        }
    if spec.spec.prompt.enable_thinking is not None:
        body["chat_template_kwargs"] = {"enable_thinking": spec.spec.prompt.enable_thinking}
    return body


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
        self._turn = 0

    def run(self, units: list[Any]) -> None:
        asyncio.run(self._run(units))

    async def _run(self, units: list[Any]) -> None:
        model = self.model
        limits = httpx.Limits(
            max_connections=model.concurrency, max_keepalive_connections=model.concurrency
        )
        timeout = httpx.Timeout(model.timeout, connect=min(30.0, model.timeout))
        async with httpx.AsyncClient(
            timeout=timeout, limits=limits, transport=self.transport
        ) as client:
            self.on_provenance(await self._describe(client))
            gate = asyncio.Semaphore(model.concurrency)
            jobs = [
                self._sample(client, gate, unit, index) for unit in units for index in unit.missing
            ]
            tasks = [asyncio.ensure_future(job) for job in jobs]
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _describe(self, client: httpx.AsyncClient) -> dict[str, Any]:
        """Check that every endpoint serves the model; its provenance for the store."""
        served_by = set()
        for endpoint in self.endpoints.model.endpoints:
            data = await self._call(client, "GET", f"{endpoint}/models", None, endpoint)
            entries = {m.get("id"): m for m in data.get("data", [])}
            if self.model.id not in entries:
                raise RemoteError(
                    f"{endpoint} does not serve {self.model.id!r} (it serves "
                    f"{', '.join(map(str, entries)) or 'nothing'}); set [model] id to the served "
                    "name"
                )
            served_by.add(str(entries[self.model.id].get("owned_by", "unknown")))
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

    async def _sample(
        self, client: httpx.AsyncClient, gate: asyncio.Semaphore, unit: Any, index: int
    ) -> None:
        seed = sample_seed(self.run_seed, unit.prompt_index, index)
        think_sampling = self.sampling.get(unit.condition.label)
        body = request_body(self.spec, self.model, unit.condition, unit.item, seed, think_sampling)
        async with gate:
            started = time.perf_counter()
            data = await self._call(client, "POST", "/chat/completions", body)
            seconds = time.perf_counter() - started
        self.store([self._row(unit, index, seed, data, seconds)])

    async def _call(
        self,
        client: httpx.AsyncClient,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        endpoint: str | None = None,
    ) -> dict[str, Any]:
        """One request with retries; `path` is joined to the next endpoint in turn."""
        endpoints = self.endpoints.model.endpoints
        last = ""
        for attempt in range(self.model.retries + 1):
            base = endpoint or endpoints[(self._turn + attempt) % len(endpoints)]
            self._turn += endpoint is None
            url = path if path.startswith("http") else f"{base}{path}"
            wait = min(30.0, 0.5 * 2**attempt) * (0.5 + random.random())
            try:
                response = await client.request(
                    method, url, json=body, headers=self.endpoints.headers
                )
            except httpx.TransportError as err:
                last = f"{url}: {type(err).__name__}: {err}"
            else:
                if response.status_code == 200:
                    return response.json()
                message = _error_message(response)
                last = f"{url} answered {response.status_code}: {message}"
                if response.status_code not in RETRY_STATUS and response.status_code < 500:
                    raise RemoteError(last)
                after = response.headers.get("retry-after", "")
                if after.replace(".", "", 1).isdigit():
                    wait = max(wait, float(after))
            if attempt < self.model.retries:
                await asyncio.sleep(wait)
        raise RemoteError(f"gave up after {self.model.retries} retries; last error: {last}")

    def _row(
        self, unit: Any, index: int, seed: int, data: dict[str, Any], seconds: float
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
        return self.row(unit, sample, budget, seconds)


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
