"""Think, then answer: a phase controller on top of the engine's hooks.

Each row starts in the *think* phase when its prompt leaves a `<think>` block open
(Qwen3-Thinking-2507), or when thinking is wanted and the template did not open the
block (hybrid Qwen3 with `enable_thinking` on: `<think>\\n` is forced first). It starts
in the *answer* phase when the prompt closed an empty block (`enable_thinking=False`)
or the tokenizer has no think tags.

A model without think tags can still reason first, in *plain text* (`mode="text"`):
the prompt asks it to reason (`with_instruction`), the reasoning is an ordinary
assistant message sampled with the think parameters, and it ends either with the
model's own end of turn (an EOS id, which stays in the context) or at the budget;
then the closing text (default `"\\n\\nFinal answer:\\n"`) is forced and the answer
follows as with tags.

- think: the row samples with the think parameters; EOS ids are masked (a row may not
  end its message inside `<think>`). When the model writes `</think>` itself, `\\n\\n`
  is forced after it, as the chat template renders a finished turn. When `budget`
  think tokens have been generated, the closing text is forced (default: Qwen's own
  sentence + `</think>\\n\\n`); `budget_hit` records it.
- answer: the row switches to the answer parameters (default greedy; already while
  its closing text is forced, so that the engine can prepare DoLa's layers) and, with a
  grammar, every step is masked by its xgrammar matcher (all answer rows filled at
  once) plus a mask of added tokens that may never appear in an answer. The grammar
  starts only after `</think>`. If `max_tokens` answer tokens pass before the grammar
  completes, the row ends with `finish_reason="length"` and an error. Where the grammar
  allows one continuation only (keys, quotes, separators, the rest of an enum value),
  `draft` hands its tokens to the engine, which feeds them in one forward and keeps
  each one the row samples (jump-forward: fewer forwards, the same answers).

The controller never samples; it only forces tokens, masks logits and finishes rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Literal

import torch

from muestra.answers.grammar import GrammarBackend
from muestra.engine import Row, SamplingParams
from muestra.settings import ANSWER_DEFAULT, QWEN_THINKING, AnswerSettings, ThinkSettings

QWEN_CLOSE_TEXT = (
    "\n\nConsidering the limited time by the user, I have to give the solution based on "
    "the thinking directly now.\n</think>\n\n"
)
# Plain-text reasoning, for models without think tags.
TEXT_CLOSE_TEXT = "\n\nFinal answer:\n"
TEXT_INSTRUCTION = (
    "Before answering, think it through step by step in plain text. "
    "You will be asked for the final answer after your reasoning."
)
Phase = Literal["think", "closing", "answer"]
ThinkMode = Literal["auto", "tags", "text"]


@dataclass(frozen=True)
class ThinkConfig:
    """The think phase: its own sampling, a hard budget and the text that closes it."""

    params: SamplingParams = field(
        default_factory=lambda: SamplingParams(**QWEN_THINKING.model_dump())
    )
    budget: int = ThinkSettings.model_fields["budget"].default
    close_text: str = QWEN_CLOSE_TEXT
    open_tag: str = "<think>"
    close_tag: str = "</think>"
    # "tags": the model's own think block (skipped when it has none); "text": plain-text
    # reasoning (any instruct model); "auto": tags when the model has them, else text.
    mode: ThinkMode = "tags"
    instruction: str = TEXT_INSTRUCTION  # appended to the prompt in text mode

    def for_text(self) -> ThinkConfig:
        """This config in plain-text mode (Qwen's closing sentence becomes the plain one)."""
        close = TEXT_CLOSE_TEXT if self.close_text == QWEN_CLOSE_TEXT else self.close_text
        return replace(self, mode="text", close_text=close)


def with_instruction(
    prompt: str | list[dict[str, Any]], instruction: str
) -> str | list[dict[str, Any]]:
    """`prompt` with `instruction` appended to its last user message (or to a raw text)."""
    if isinstance(prompt, str):
        return f"{prompt}\n\n{instruction}"
    messages = [dict(m) for m in prompt]
    last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last is None:
        return [*messages, {"role": "user", "content": instruction}]
    messages[last]["content"] = f"{messages[last]['content']}\n\n{instruction}"
    return messages


@dataclass(frozen=True)
class AnswerConfig:
    params: SamplingParams = field(
        default_factory=lambda: SamplingParams(**ANSWER_DEFAULT.model_dump())
    )
    max_tokens: int = AnswerSettings.model_fields["max_tokens"].default
    # free text without a think phase: the answer ends at the first of these (not kept)
    stop: tuple[str, ...] = ()


@dataclass
class PhaseState:
    """What the controller knows about one row (handed back on `Sample.state`)."""

    phase: Phase
    think_start: int = 0  # index in the row's tokens where reasoning text starts
    think_end: int | None = None  # index of the first closing token (forced or `</think>`)
    answer_start: int | None = None
    think_tokens: int = 0
    budget_hit: bool = False
    matcher: Any = None
    error: str | None = None
    answer_tokens: int = 0
    # per generated token: "reasoning", "content" or "tag" (think tags, the forced closing
    # text, the final EOS) — how a server splits a stream into reasoning and content
    channels: list[str] = field(default_factory=list)
    # plain-text reasoning: the row's EOS ids, held back while it reasons
    saved_eos_ids: frozenset[int] | None = None


@dataclass(frozen=True)
class TagIds:
    open_ids: list[int]  # ids of the open tag + "\n", forced for hybrid models
    close_id: int | None  # the `</think>` token (None in plain-text mode)
    close_ids: list[int]  # ids of the closing text
    after_close_ids: list[int]  # ids of "\n\n", forced after a `</think>` the model wrote
    text: bool = False  # plain-text reasoning: EOS ends it, nothing to open


def initial_phase(prompt_ids: Sequence[int], open_id: int | None, close_id: int | None) -> str:
    """`think` if the prompt leaves a think block open, `answer` if it closed an empty one
    at its very end, else `open` (a hybrid template with thinking on: force the tag)."""
    if open_id is None or close_id is None:
        return "answer"
    last_open = max((i for i, t in enumerate(prompt_ids) if t == open_id), default=-1)
    last_close = max((i for i, t in enumerate(prompt_ids) if t == close_id), default=-1)
    if last_open > last_close:
        return "think"
    if last_close >= len(prompt_ids) - 4:
        return "answer"
    return "open"


def answer_budget_error(max_tokens: int) -> str:
    return (
        f"the answer budget of {max_tokens} tokens ended before the grammar completed; "
        "raise the answer max tokens"
    )


class PhaseController:
    """A `StepHook` for think → answer generation (see the module docstring)."""

    def __init__(
        self,
        think: ThinkConfig | None,
        answer: AnswerConfig,
        tags: TagIds | None,
        eos_ids: Sequence[int],
        grammar: tuple[GrammarBackend, Any] | None = None,
        end_after_think: bool = False,
        probabilities: Any = None,
        jump_forward: Callable[[str], list[int]] | None = None,
    ) -> None:
        self.think = think
        self.answer = answer
        self.tags = tags
        # end each row once its closing text is in, before any answer token (the answer
        # then comes from elsewhere: beam search under the grammar)
        self.end_after_think = end_after_think
        self.eos_ids = torch.tensor(sorted(eos_ids), dtype=torch.long)
        self.grammar = grammar
        # an `AnswerProbabilities` scoring answers inside the loop (`field_probs`): it keeps
        # each answer step's masked logits and scores a row when it finishes
        self.probabilities = probabilities
        # grammar jump-forward: the text the grammar forces, tokenized (None: off); rows
        # of one schema meet the same keys and separators, so their ids are kept
        self._forced_ids = (
            lru_cache(maxsize=4096)(lambda text: tuple(jump_forward(text)))
            if jump_forward is not None
            else None
        )

    # ---- StepHook -----------------------------------------------------------------------

    def before_step(self, rows: Sequence[Row]) -> None:
        for row in rows:
            if row.state is None:
                self._start(row)
            state: PhaseState = row.state
            if state.phase == "think" and self.think and state.think_tokens >= self.think.budget:
                assert self.tags is not None
                state.phase, state.budget_hit = "closing", True
                state.think_end = len(row.tokens)
                row.forced_queue.extend(self.tags.close_ids)
                row.params = self.answer.params
            if state.phase == "closing" and not row.forced_queue:
                self._enter_answer(row)

    def mask_logits(self, logits: torch.Tensor, rows: Sequence[Row]) -> None:
        # With tags a row may not end its message while thinking; in text mode the EOS is
        # how the model says its reasoning is done (see `after_token`).
        text = self.tags is not None and self.tags.text
        thinking = [
            i
            for i, r in enumerate(rows)
            if r.state.phase == "closing" or (r.state.phase == "think" and not text)
        ]
        if thinking:
            index = torch.tensor(thinking, device=logits.device).unsqueeze(1)
            logits[index, self.eos_ids.to(logits.device).unsqueeze(0)] = float("-inf")
        if self.grammar is None:
            return
        answering = [i for i, r in enumerate(rows) if r.state.phase == "answer" and r.state.matcher]
        if answering:
            backend, _ = self.grammar
            matchers = [rows[i].state.matcher for i in answering]
            allowed = backend.fill_and_apply(logits, matchers, answering)
            if self.probabilities is not None:
                self.probabilities.record(logits, rows, answering, allowed)

    def draft(self, row: Row) -> list[int]:
        """Jump-forward: the tokens of the text the grammar forces next (JSON keys,
        quotes, separators, the rest of an enum value once it is unambiguous), tokenized
        as ordinary text; the engine feeds them with the row's next token and keeps each
        one only if the row samples it (`Batch.forward`), so they change speed, not
        output. The tokens a row is forced to take next (a closing text) go the same way.
        Empty elsewhere."""
        state: PhaseState = row.state
        if self._forced_ids is None:
            return []
        if row.forced_queue:
            return list(row.forced_queue)
        if state.phase != "answer" or state.matcher is None:
            return []
        if state.matcher.is_terminated():
            return []
        forced = state.matcher.find_jump_forward_string()
        if not forced:
            return []
        room = self.answer.max_tokens - state.answer_tokens
        return list(self._forced_ids(forced)[: max(room, 0)])

    def row_finishing(self, row: Row, context: Any) -> None:
        if self.probabilities is not None:
            self.probabilities.finish(row, context)

    def wave_done(self) -> None:
        """Expand the finished rows' waiting branches before the next wave: on llama.cpp
        their kept contexts tag cells the next wave's rows are booked into."""
        if self.probabilities is not None:
            self.probabilities.flush()

    def after_token(self, row: Row, token_id: int, forced: bool) -> None:
        state: PhaseState = row.state
        if state.phase == "think":
            assert self.tags is not None
            if self.tags.text and token_id in (state.saved_eos_ids or ()):
                self._close(row, self.tags.close_ids)
            elif token_id == self.tags.close_id:
                self._close(row, self.tags.after_close_ids)
            elif not forced:
                state.think_tokens += 1
                state.channels.append("reasoning")
            else:
                state.channels.append("tag")  # the open tag forced for a hybrid model
            return
        if state.phase == "closing":
            state.channels.append("tag")
            if self.end_after_think and not row.forced_queue:
                row.finish("stop")  # the closing text is in: the caller answers later
            return
        end = row.finish_reason == "stop" and row.stop_reason == token_id
        state.channels.append("tag" if end else "content")
        state.answer_tokens += 1
        if state.matcher is not None:
            accepted = state.matcher.accept_token(token_id)
            assert accepted, f"the grammar mask let token {token_id} through but it was refused"
        if row.finish_reason is None and state.answer_tokens >= self.answer.max_tokens:
            row.finish("length")
            if state.matcher is not None and not state.matcher.is_terminated():
                state.error = answer_budget_error(self.answer.max_tokens)

    # ---- transitions --------------------------------------------------------------------

    def first_params(self, prompt_ids: Sequence[int]) -> SamplingParams:
        """The parameters of the phase a row with this prompt starts in: its request's, so
        that the prefill computes what the first sampled token needs (DoLa's layers)."""
        if self.think is not None and self.first_phase(prompt_ids) != "answer":
            return self.think.params
        return self.answer.params

    def first_phase(self, prompt_ids: Sequence[int]) -> str:
        """Where a row with this prompt starts: "text" (plain-text reasoning), "open" (the
        think tag is forced first), "think" (the prompt left the block open) or "answer"."""
        tags = self.tags
        if tags is not None and tags.text and self.think is not None:
            return "text"
        return initial_phase(prompt_ids, tags.open_ids[0], tags.close_id) if tags else "answer"

    def _close(self, row: Row, forced: list[int]) -> None:
        """The row ended its reasoning (its `</think>`, or its EOS in text mode): the
        closing tokens are queued and the answer's parameters apply from now on (the
        forced tokens are not sampled; switching here lets the engine prepare DoLa)."""
        state: PhaseState = row.state
        state.think_end = len(row.tokens) - 1
        state.phase = "closing"
        row.forced_queue.extend(forced)
        state.channels.append("tag")
        row.params = self.answer.params

    def _start(self, row: Row) -> None:
        start = self.first_phase(row.prompt_ids)
        if start == "text" and self.think is not None:
            # the row's EOS ids end its reasoning instead of the row, until the answer
            row.state = PhaseState("think", saved_eos_ids=row.eos_ids)
            row.eos_ids = frozenset()
            row.params = self.think.params
            return
        if start == "open" and self.think is not None and self.tags is not None:
            row.forced_queue.extend(self.tags.open_ids)
            row.state = PhaseState("think", think_start=len(self.tags.open_ids))
            row.params = self.think.params
        elif start == "think" and self.think is not None:
            row.state = PhaseState("think")
            row.params = self.think.params
        else:
            row.state = PhaseState("closing")
            self._enter_answer(row)

    def _enter_answer(self, row: Row) -> None:
        state: PhaseState = row.state
        state.phase = "answer"
        state.answer_start = len(row.tokens)
        row.params = self.answer.params
        if state.saved_eos_ids is not None:
            row.eos_ids, state.saved_eos_ids = state.saved_eos_ids, None
        if self.grammar is not None:
            backend, compiled = self.grammar
            state.matcher = backend.matcher(compiled)
