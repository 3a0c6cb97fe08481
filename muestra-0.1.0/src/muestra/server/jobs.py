"""One HTTP request's samples, followed from the scheduler thread into asyncio.

A `Job` submits a request's engine requests to the `Scheduler` and turns each step's
update into records on an asyncio queue: `TokenRecord`s (streaming, or all at once when
a sample finishes) and `Finished`.

How tokens become text: every generated token is labelled by the phase controller as
`reasoning`, `content` or `tag` (think tags, the forced closing text, the final EOS).
`SampleText` keeps the bytes of each sample with those labels and hands out text per
channel through incremental UTF-8 decoders, holding back the last bytes that could
still become a stop string, so a stream never shows part of a stop string or half a
character. Stop strings are matched on everything the model generates (as the engine
does), and the text is cut where the first one starts.
"""

from __future__ import annotations

import asyncio
import codecs
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from muestra.answers.phases import PhaseState
from muestra.engine import GenerationRequest, Sample, StepHook
from muestra.engine.scheduler import Scheduler, Submission, Update
from muestra.engine.seeds import sample_seed
from muestra.server.protocol import ApiError


class Served(Protocol):
    """What a job and its formatters use of the model it runs on (`service.ServedModel`,
    which imports this module: the protocol keeps the import one way)."""

    name: str
    scheduler: Scheduler
    tags: Any

    def piece(self, token_id: int) -> bytes: ...


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
        self.logprobs_sent = 0

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

    def take_logprobs(self) -> list[Any]:
        """The logprobs of the content tokens `take` has released since the last call: a
        stream sends each token's logprobs with its text, and none past a stop string."""
        new = []
        while self.logprobs_sent < len(self.logprobs):
            start, lp = self.logprobs[self.logprobs_sent]
            if start >= self.sent:
                break
            new.append(lp)
            self.logprobs_sent += 1
        return new


@dataclass
class Job:
    """One HTTP request's samples, followed from the scheduler thread into asyncio."""

    served: Served
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
                # a row may take several tokens a step (jump-forward): each one's channel
                # is the one the controller gave it, counted back from the row's last
                left = Counter(id(row) for row, _ in update.tokens)
                for row, token in update.tokens:
                    left[id(row)] -= 1
                    records.append(
                        TokenRecord(
                            self.choice_of(update.first_index, row.request_index, row.sample_index),
                            token.token_id,
                            _channel(row, token, left[id(row)]),
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


def _channel(row: Any, token: Any, later: int) -> str:
    """The channel of a token the row took `later` tokens before its last one."""
    state = row.state
    if isinstance(state, PhaseState) and len(state.channels) > later:
        return state.channels[-1 - later]
    return _plain_channel(token.token_id, token.finish_reason, row.stop_reason)


def _plain_channel(token_id: int, finish_reason: str | None, stop_reason: Any) -> str:
    """Without a phase controller every token is content, but the EOS that ended it."""
    return "tag" if finish_reason == "stop" and stop_reason == token_id else "content"
