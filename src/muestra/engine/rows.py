"""What the engine works on: requests in, rows while they decode, samples and events out.

A `GenerationRequest` is one prompt with `n` samples; each sample decodes as a `Row`
(its tokens, its own generator, its stop rules, a slot for a hook's state) and ends as
a `Sample`. `StepEvent`s report each decoding step. A `StepHook` steers rows without
the engine knowing why (see `engine.py`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from muestra.engine.sampling import SamplingParams
from muestra.engine.stops import StopMatcher

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt and how to sample it `n` times."""

    prompt_ids: Sequence[int]
    n: int = 1
    params: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 256
    seed: int = 0
    prompt_index: int = 0
    first_sample: int = 0  # sample indices are first_sample … first_sample + n - 1
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k: chosen token plus k alternatives
    seeds: Sequence[int] | None = None  # explicit generator seed of each sample (else derived)


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    raw_logprob: float
    top: list[tuple[int, float]]
    raw_top: list[tuple[int, float]]


@dataclass
class Row:
    """The state of one sample while it decodes."""

    request_index: int
    sample_index: int
    seed: int
    prompt_ids: Sequence[int]
    prompt_length: int
    max_new_tokens: int
    eos_ids: frozenset[int]
    params: SamplingParams  # a hook may replace it between steps (e.g. think → answer)
    generator: torch.Generator
    stop_matcher: StopMatcher | None
    want_logprobs: int | None
    tokens: list[int] = field(default_factory=list)
    forced: list[bool] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    forced_queue: deque[int] = field(default_factory=deque)
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    stop_byte_offset: int | None = None
    state: Any = None  # free slot for a hook's per-row state

    def finish(self, reason: FinishReason, stop_reason: int | str | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason, self.stop_reason = reason, stop_reason


@dataclass
class TokenEvent:
    request_index: int
    sample_index: int
    token_id: int
    forced: bool
    logprobs: TokenLogprobs | None
    finish_reason: FinishReason | None


@dataclass
class StepEvent:
    step: int
    tokens: list[TokenEvent]
    finished: list[Sample]


@dataclass
class Sample:
    """A finished sample: everything needed to report it and redo it."""

    request_index: int
    sample_index: int
    seed: int
    prompt_length: int
    token_ids: list[int]
    forced: list[bool]
    finish_reason: FinishReason
    stop_reason: int | str | None
    stop_byte_offset: int | None
    logprobs: list[TokenLogprobs] | None
    state: Any = None  # the hook's per-row state, handed back

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class StepHook(Protocol):
    """What a hook may do at each step (see the module docstring). A hook may also define
    `row_finishing(row, context)`: called for each row that finished, while its KV cache
    is still live; `context(generated)` gives the keys and values of the row's prompt and
    first `generated` tokens (`Batch.row_context`), or None where the cache cannot be cut;
    and `wave_done()`: called when a wave of rows has ended, before the next is admitted
    (what the hook keeps of finished rows is released there: the next wave's rows need
    the cache the kept rows still tag)."""

    def before_step(self, rows: Sequence[Row]) -> None: ...
    def mask_logits(self, logits: torch.Tensor, rows: Sequence[Row]) -> None: ...
    def after_token(self, row: Row, token_id: int, forced: bool) -> None: ...


class NoHook:
    def before_step(self, rows: Sequence[Row]) -> None:
        return None

    def mask_logits(self, logits: torch.Tensor, rows: Sequence[Row]) -> None:
        return None

    def after_token(self, row: Row, token_id: int, forced: bool) -> None:
        return None
