"""The endpoints of a remote model: their key, their request slots and health, and what
their answers must hold.

- `Endpoints`: the model's endpoint URLs and the API key read from `api_key_env`.
- `EndpointPool`: `concurrency` request slots per endpoint; a request goes to the healthy
  endpoint with the most free slots, and an endpoint that failed rests (2 s, doubling per
  failure in a row up to 60 s, reset by a success).
- `AiohttpTransport`: how requests reach them (aiohttp: a third of the CPU per request
  that httpx takes, which capped a runner at a few hundred samples/s; see
  benchmarks/remote_ceiling.py). Tests put their own `Transport` in its place.
- `read_chat` and `read_models`: an endpoint's 200 answer, checked field by field. An
  answer that is not JSON, or lacks what the runner reads (`choices[0].message`, numbers
  where numbers go), raises `Malformed`: that endpoint failed this request, like a 5xx —
  the runner rests it and sends the request elsewhere, never stores it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import yarl
from aiohttp.helpers import get_env_proxy_for_url

from muestra.errors import InputError
from muestra.experiments.spec import ModelSpec
from muestra.version import __version__


class Malformed(ValueError):
    """An endpoint answered 200 with a body the runner cannot read (says what is wrong)."""


class Unreachable(Exception):
    """A request got no HTTP answer: refused, lost or timed out (the runner retries it)."""


@dataclass(frozen=True)
class Answer:
    """An endpoint's HTTP answer."""

    status: int
    headers: Mapping[str, str]  # looked up without regard to case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class Transport(Protocol):
    async def request(
        self, method: str, url: str, body: bytes | None, headers: Mapping[str, str]
    ) -> Answer: ...

    async def aclose(self) -> None: ...


class AiohttpTransport:
    """Keep-alive connections to the endpoints, at most `connections` open at once; a
    request that gets no answer in `timeout` seconds (`connect` to connect) raises
    `Unreachable`. Made inside the running event loop, closed with `aclose`."""

    def __init__(self, connections: int, timeout: float, connect: float) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections, limit_per_host=0),
            timeout=aiohttp.ClientTimeout(total=timeout, connect=connect),
        )
        self.proxies: dict[str, tuple[Any, Any]] = {}  # by host: (proxy URL, its auth)

    async def request(
        self, method: str, url: str, body: bytes | None, headers: Mapping[str, str]
    ) -> Answer:
        proxy, auth = self._proxy(url)
        try:
            async with self.session.request(
                method, url, data=body, headers=headers, proxy=proxy, proxy_auth=auth
            ) as response:
                return Answer(response.status, response.headers, await response.read())
        except (aiohttp.ClientError, TimeoutError) as err:
            raise Unreachable(f"{type(err).__name__}: {err}") from err

    def _proxy(self, url: str) -> tuple[Any, Any]:
        """HTTP(S)_PROXY and NO_PROXY as httpx and curl read them, once per host (aiohttp's
        trust_env reads them again in a thread for every request)."""
        host = "/".join(url.split("/", 3)[:3])  # scheme://host:port
        if host not in self.proxies:
            try:
                self.proxies[host] = get_env_proxy_for_url(yarl.URL(url))
            except LookupError:  # no proxy for this host
                self.proxies[host] = (None, None)
        return self.proxies[host]

    async def aclose(self) -> None:
        await self.session.close()


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
        headers = {"User-Agent": f"muestra/{__version__}", "Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        return headers


@dataclass(frozen=True)
class ChatReply:
    """What the runner reads from one chat completion."""

    content: str
    reasoning: str | None  # `reasoning_content`, or `reasoning` (newer vLLM)
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int | None  # muestra's extension, else usage's details, else None
    budget_hit: bool | None  # muestra's extension only


def read_chat(data: Any) -> ChatReply:
    """A chat completion's answer, or `Malformed` naming the first field that is wrong."""
    choice = _item(_field(data, "choices", list, "the answer"), "choices")
    message = _field(choice, "message", dict, "choices[0]")
    extension = _field(choice, "muestra", dict, "choices[0]", optional=True) or {}
    usage = _field(data, "usage", dict, "the answer", optional=True) or {}
    details = _field(usage, "completion_tokens_details", dict, "usage", optional=True) or {}
    reasoning = message.get("reasoning_content", message.get("reasoning"))
    if reasoning is not None and not isinstance(reasoning, str):
        raise Malformed(f"message.reasoning_content is {type(reasoning).__name__}, not text")
    think = _count(extension, "reasoning_tokens", "muestra")
    if think is None:
        think = _count(details, "reasoning_tokens", "usage.completion_tokens_details")
    budget_hit = extension.get("budget_hit")
    if budget_hit is not None and not isinstance(budget_hit, bool):
        raise Malformed(f"choices[0].muestra.budget_hit is {budget_hit!r}, not true or false")
    completion = _count(extension, "completion_tokens", "muestra")
    return ChatReply(
        content=_field(message, "content", str, "choices[0].message", optional=True) or "",
        reasoning=reasoning,
        finish_reason=_field(choice, "finish_reason", str, "choices[0]", optional=True) or "stop",
        prompt_tokens=_count(usage, "prompt_tokens", "usage") or 0,
        completion_tokens=(
            completion if completion is not None else _count(usage, "completion_tokens", "usage")
        )
        or 0,
        reasoning_tokens=think,
        budget_hit=budget_hit,
    )


def read_models(data: Any) -> dict[str, dict[str, Any]]:
    """`GET /models`: the served models by id, or `Malformed`."""
    entries = _field(data, "data", list, "the answer")
    if not all(isinstance(e, dict) for e in entries):
        raise Malformed("data holds something that is not a model object")
    return {str(e.get("id")): e for e in entries}


def _field(data: Any, name: str, kind: type, where: str, optional: bool = False) -> Any:
    if not isinstance(data, dict):
        raise Malformed(f"{where} is {type(data).__name__}, not an object")
    value = data.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, kind):
        shown = "missing" if value is None else f"{type(value).__name__}, not {kind.__name__}"
        raise Malformed(f"{where}.{name} is {shown}")
    return value


def _item(values: list[Any], where: str) -> Any:
    if not values:
        raise Malformed(f"{where} is empty")
    return values[0]


def _count(data: dict[str, Any], name: str, where: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise Malformed(f"{where}.{name} is {value!r}, not a count")
    return value


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
