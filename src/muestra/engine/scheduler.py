"""Continuous batching: requests that arrive at any time share the engine's batches.

A `Scheduler` owns one `Engine` and one background thread. `submit` hands it a group of
`GenerationRequest`s with their own `StepHook` (a server request: one prompt, `n`
samples, its grammar and thinking budget) and a `deliver` callback. The thread runs one
decoding step at a time over every admitted row; between steps it

- admits waiting rows up to `max_batch` (their prompts are prefilled on their own, then
  their cache is merged into the running one, left-padded — `Batch.extend`);
- drops the rows of cancelled submissions at once (a client that disconnected);
- calls each submission's `deliver(update)` from the scheduler thread with the tokens
  its rows produced in that step and the samples that finished.

A row's tokens depend only on its own seed, prompt and parameters, never on which
other rows share its batch (the per-row generators of `sampling.py`), so a request
gives the same samples alone or under load, up to floating-point noise of batched
matrix products. Hooks see only their own rows: the scheduler calls each submission's
hook on the contiguous slice of the batch its rows occupy (rows are admitted together
and keep their order, so a slice of `logits` is a view and in-place masks land).

Models whose cache cannot be merged (sliding-window or linear-attention layers) still
work: new rows then wait until the running batch is empty.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from muestra.allocator import single_malloc_arena
from muestra.engine.engine import (
    Batch,
    Engine,
    GenerationRequest,
    NoHook,
    Row,
    Sample,
    StepHook,
    TokenEvent,
)


@dataclass
class Update:
    """What one step produced for one submission. `tokens` pairs each token event with
    its row (read the row's hook state here: it is safe only inside `deliver`).
    `error` ends the submission when the step failed."""

    first_index: int = 0  # request index of the submission's first request
    tokens: list[tuple[Row, TokenEvent]] = field(default_factory=list)
    finished: list[Sample] = field(default_factory=list)
    error: BaseException | None = None


@dataclass(eq=False)
class Submission:
    requests: Sequence[GenerationRequest]
    hook: StepHook
    deliver: Callable[[Update], None]
    first_index: int  # request indices first_index … are this submission's
    rows_left: int = 0
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int | None = None) -> None:
        single_malloc_arena()
        self.engine = engine
        self.max_batch = max_batch or engine.max_batch
        self._waiting: deque[tuple[Submission, Row]] = deque()
        self._owner: dict[int, Submission] = {}  # request index → submission
        self._indices = itertools.count()
        self._lock = threading.Condition()
        self._closed = False
        self.stats: dict[str, float] = {
            "steps": 0,
            "rows_stepped": 0,
            "admissions": 0,
            "max_rows": 0,
            "running": 0,
            "busy_s": 0.0,  # time spent prefilling and stepping
            "prefill_s": 0.0,
        }
        self._thread = threading.Thread(target=self._loop, name="muestra-scheduler", daemon=True)
        self._thread.start()

    # ---- API for any thread ------------------------------------------------------------

    def submit(
        self,
        requests: Sequence[GenerationRequest],
        deliver: Callable[[Update], None],
        hook: StepHook | None = None,
    ) -> Submission:
        """Queue requests; bad requests raise here (`InputError`, `ContextLengthError`)."""
        for local, request in enumerate(requests):
            self.engine.validate(local, request)
        with self._lock:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            first = next(self._indices)
            for _ in range(len(requests) - 1):
                next(self._indices)
            submission = Submission(requests, hook or NoHook(), deliver, first)
            for local, request in enumerate(requests):
                self._owner[first + local] = submission
                for row in self.engine.rows_for(first + local, request):
                    self._waiting.append((submission, row))
                    submission.rows_left += 1
            self._lock.notify()
        return submission

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def cancel(self, submission: Submission) -> None:
        """Stop a submission: its waiting rows never start, its running rows leave the
        batch before the next step."""
        with self._lock:
            submission.cancelled = True
            waiting = [(s, r) for s, r in self._waiting if s is submission]
            if waiting:
                self._waiting = deque((s, r) for s, r in self._waiting if s is not submission)
                for _ in waiting:
                    self._row_gone(submission)
            self._lock.notify()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout=30)

    # ---- the thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        batch: Batch | None = None
        while True:
            with self._lock:
                while not self._closed and not self._waiting and (batch is None or not batch.rows):
                    self._lock.wait()
                if self._closed:
                    return
                admitted = self._take_waiting(batch)
            started = time.perf_counter()
            try:
                batch = self._admit(batch, admitted)
                self.stats["prefill_s"] += time.perf_counter() - started
                if batch is not None and batch.rows:
                    self._step(batch)
                self.stats["running"] = len(batch.rows) if batch is not None else 0
                self.stats["busy_s"] += time.perf_counter() - started
            except Exception as err:  # noqa: BLE001 - reported to every affected submission
                affected = {self._owner_of(r) for r in (batch.rows if batch else [])}
                affected |= {s for s, _ in admitted}
                for submission in affected:
                    self._end(submission, Update(submission.first_index, error=err))
                batch = None
                self.stats["running"] = 0

    def _take_waiting(self, batch: Batch | None) -> list[tuple[Submission, Row]]:
        """Rows that may start now (called with the lock held)."""
        running = len(batch.rows) if batch is not None else 0
        if running and not batch.can_extend:  # type: ignore[union-attr]
            return []
        room = self.max_batch - running
        taken = []
        while self._waiting and len(taken) < room:
            submission, row = self._waiting.popleft()
            if submission.cancelled:
                self._row_gone(submission)
                continue
            taken.append((submission, row))
        return taken

    def _admit(self, batch: Batch | None, admitted: list[tuple[Submission, Row]]) -> Batch | None:
        if not admitted:
            return batch
        self.stats["admissions"] += 1
        fresh = self.engine.start_batch([row for _, row in admitted])
        if batch is None or not batch.rows:
            return fresh
        batch.extend(fresh)
        return batch

    def _owner_of(self, row: Row) -> Submission:
        return self._owner[row.request_index]

    def _step(self, batch: Batch) -> None:
        self._drop_cancelled(batch)
        if not batch.rows:
            return
        rows = list(batch.rows)
        self.stats["steps"] += 1
        self.stats["rows_stepped"] += len(rows)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
        event = batch.step(_SlicedHook(rows, self._owner_of))
        updates: dict[Submission, Update] = {}
        for row, token in zip(rows, event.tokens, strict=True):
            owner = self._owner_of(row)
            updates.setdefault(owner, Update(owner.first_index)).tokens.append((row, token))
        for sample in event.finished:
            owner = self._owner[sample.request_index]
            updates.setdefault(owner, Update(owner.first_index)).finished.append(sample)
        for submission, update in updates.items():
            if not submission.cancelled:
                self._deliver(submission, update)
            for _ in update.finished:
                self._row_gone(submission)
        self._drop_cancelled(batch)
        if batch.rows:
            batch.forward()

    def _deliver(self, submission: Submission, update: Update) -> None:
        try:
            submission.deliver(update)
        except Exception:  # noqa: BLE001 - a broken receiver ends only its own submission
            submission.cancelled = True

    def _drop_cancelled(self, batch: Batch) -> None:
        keep = [i for i, r in enumerate(batch.rows) if not self._owner_of(r).cancelled]
        if len(keep) < len(batch.rows):
            for row in batch.rows:
                if self._owner_of(row).cancelled:
                    self._row_gone(self._owner_of(row))
            batch.keep_rows(keep)

    def _row_gone(self, submission: Submission) -> None:
        with self._lock:
            submission.rows_left -= 1
            if submission.rows_left == 0:
                self._forget(submission)

    def _end(self, submission: Submission, update: Update) -> None:
        if not submission.done.is_set():
            submission.cancelled = True
            self._deliver(submission, update)
            self._forget(submission)

    def _forget(self, submission: Submission) -> None:
        with self._lock:
            for index in range(
                submission.first_index, submission.first_index + len(submission.requests)
            ):
                self._owner.pop(index, None)
            submission.done.set()


class _SlicedHook:
    """Calls each submission's hook with only its own rows (a contiguous slice)."""

    def __init__(self, rows: list[Row], owner_of: Callable[[Row], Submission]) -> None:
        self.runs: list[tuple[StepHook, int, int]] = []
        for row_index, row in enumerate(rows):
            hook = owner_of(row).hook
            if self.runs and self.runs[-1][0] is hook and self.runs[-1][2] == row_index:
                self.runs[-1] = (hook, self.runs[-1][1], row_index + 1)
            else:
                self.runs.append((hook, row_index, row_index + 1))
        self.owner_of = owner_of

    def before_step(self, rows: Sequence[Row]) -> None:
        for hook, start, end in self.runs:
            hook.before_step(rows[start:end])

    def mask_logits(self, logits: torch.Tensor, rows: Sequence[Row]) -> None:
        for hook, start, end in self.runs:
            if not isinstance(hook, NoHook):
                hook.mask_logits(logits[start:end], rows[start:end])

    def after_token(self, row: Row, token_id: int, forced: bool) -> None:
        self.owner_of(row).hook.after_token(row, token_id, forced)
