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

Faults stay with the request that caused them. A hook that raises ends only its own
submission (`_SlicedHook` catches it per submission). A prefill that fails is redone per
submission to find the one at fault; a step that fails before any row took its token is
probed per submission (its parameters rebuilt and warped alone), the faulty ones are
ended and the step is run again for the others, whose generators have not moved, so
their samples are exactly what they would have been. Only a fault that cannot be pinned
on one submission ends every row of the batch.

Models whose cache cannot be merged (sliding-window or linear-attention layers on the
torch runtime) still work: new rows then wait until the running batch is empty. On
llama.cpp's fixed cache a row waits until its whole budget (prompt + max_new_tokens)
fits beside the budgets of the rows running, which stay booked until each row ends.
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
from muestra.engine.batch import Batch
from muestra.engine.engine import Engine
from muestra.engine.progress import RateTracker
from muestra.engine.rows import (
    GenerationRequest,
    NoHook,
    Row,
    Sample,
    StepEvent,
    StepHook,
    TokenEvent,
)
from muestra.engine.sampling import SamplingBatch


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
        self._open_rows = 0
        self.stats: dict[str, float] = {
            "steps": 0,
            "rows_stepped": 0,
            "admissions": 0,
            "max_rows": 0,
            "running": 0,
            "busy_s": 0.0,  # time spent prefilling and stepping
            "prefill_s": 0.0,
        }
        self.rate = RateTracker()  # rows finished and tokens generated, recent window
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
            self._open_rows += submission.rows_left
            self._lock.notify()
        return submission

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def open_rows(self) -> int:
        """Rows submitted and not yet finished, cancelled or failed, all submissions."""
        return self._open_rows

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
                if batch is not None:
                    batch.close()
                batch = None
                self.stats["running"] = 0

    def _take_waiting(self, batch: Batch | None) -> list[tuple[Submission, Row]]:
        """Rows that may start now (called with the lock held)."""
        running = len(batch.rows) if batch is not None else 0
        if running and not batch.can_extend:  # type: ignore[union-attr]
            return []
        room = self.max_batch - running
        fits = getattr(self.engine.runtime, "fits", None)
        taken: list[tuple[Submission, Row]] = []
        while self._waiting and len(taken) < room:
            submission, row = self._waiting[0]
            if submission.cancelled:
                self._waiting.popleft()
                self._row_gone(submission)
                continue
            # a runtime with a fixed KV cache (llama.cpp): a row waits until its whole
            # budget fits beside the budgets booked by the rows running (an idle engine
            # takes at least one row: `Engine.validate` refused those that never fit)
            need = self.engine.cells_for([r for _, r in taken] + [row])
            if fits is not None and (running or taken) and not fits(need):
                break
            taken.append(self._waiting.popleft())
        return taken

    def _admit(self, batch: Batch | None, admitted: list[tuple[Submission, Row]]) -> Batch | None:
        if not admitted:
            return batch
        self.stats["admissions"] += 1
        try:
            fresh = self.engine.start_batch([row for _, row in admitted])
        except Exception:  # noqa: BLE001 - find the submission at fault, keep the others
            admitted = self._without_faulty_prefills(admitted)
            if not admitted:
                return batch
            fresh = self.engine.start_batch([row for _, row in admitted])
        if batch is None or not batch.rows:
            return fresh
        batch.extend(fresh)
        return batch

    def _without_faulty_prefills(
        self, admitted: list[tuple[Submission, Row]]
    ) -> list[tuple[Submission, Row]]:
        """Prefill each submission's rows alone; end those that fail, return the rest."""
        groups: dict[Submission, list[Row]] = {}
        for submission, row in admitted:
            groups.setdefault(submission, []).append(row)
        for submission, rows in groups.items():
            try:
                self.engine.start_batch(rows)
            except Exception as err:  # noqa: BLE001 - reported to that submission only
                self._fail(submission, err)
                for _ in rows:
                    self._row_gone(submission)
        return [(s, r) for s, r in admitted if not s.cancelled]

    def _fail(self, submission: Submission, err: BaseException) -> None:
        """End one submission with an error; its running rows leave at the next drop."""
        if not submission.cancelled:
            self._deliver(submission, Update(submission.first_index, error=err))
        self.cancel(submission)

    def _owner_of(self, row: Row) -> Submission:
        return self._owner[row.request_index]

    def _step(self, batch: Batch) -> None:
        self._drop_cancelled(batch)
        if not batch.rows:
            return
        self.stats["steps"] += 1
        self.stats["rows_stepped"] += len(batch.rows)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(batch.rows))
        rows, event, hook = self._step_isolated(batch)
        if not rows:
            return
        for submission, err in hook.faults.items():
            self._fail(submission, err)
        updates: dict[Submission, Update] = {}
        assert event is not None
        self.rate.add(len(event.finished), len(event.tokens))
        # before the replies go out: a client that reads /health after its reply sees
        # its rows done and no longer running
        self.stats["running"] = max(0, len(rows) - len(event.finished))
        by_key = {(r.request_index, r.sample_index): r for r in rows}
        for token in event.tokens:  # jump-forward: a row may take several tokens a step
            row = by_key[token.request_index, token.sample_index]
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

    def _step_isolated(self, batch: Batch) -> tuple[list[Row], StepEvent | None, _SlicedHook]:
        """`batch.step`; if it fails before any row took its token, end the submissions
        whose rows fail alone and step the others again (without re-running their
        `before_step`, which already ran). Returns the rows stepped and the event."""
        rows = list(batch.rows)
        lengths = [len(r.tokens) for r in rows]
        hook = _SlicedHook(self._owner_of)
        try:
            return rows, batch.step(hook), hook
        except Exception:
            untouched = batch.next_tokens is None and all(
                len(r.tokens) == n for r, n in zip(rows, lengths, strict=True)
            )
            if not untouched:
                raise
            faults = {**self._probe(batch), **hook.faults}
            if not faults:
                raise
        for submission, err in faults.items():
            self._fail(submission, err)
        self._drop_cancelled(batch)
        rows = list(batch.rows)
        if not rows:
            return rows, None, hook
        hook = _SlicedHook(self._owner_of, before_step_done=True)
        return rows, batch.step(hook), hook

    def _probe(self, batch: Batch) -> dict[Submission, BaseException]:
        """The submissions whose rows cannot be sampled on their own (pure: builds and
        warps their parameters, draws nothing)."""
        engine, faults = self.engine, {}
        for submission, start, end in _runs(batch.rows, self._owner_of):
            try:
                params = [r.params for r in batch.rows[start:end]]
                sampling = SamplingBatch.build(params, engine.vocab_size, engine.device)
                sampling.warp(batch.logits[start:end])
            except Exception as err:  # noqa: BLE001 - this submission is at fault
                faults[submission] = err
        return faults

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
            if submission.done.is_set():  # ended earlier: its rows were counted then
                return
            submission.rows_left -= 1
            self._open_rows -= 1
            if submission.rows_left == 0:
                self._forget(submission)

    def _end(self, submission: Submission, update: Update) -> None:
        if not submission.done.is_set():
            submission.cancelled = True
            self._deliver(submission, update)
            self._forget(submission)

    def _forget(self, submission: Submission) -> None:
        with self._lock:
            self._open_rows -= submission.rows_left  # rows of a submission ended early
            submission.rows_left = 0
            for index in range(
                submission.first_index, submission.first_index + len(submission.requests)
            ):
                self._owner.pop(index, None)
            submission.done.set()


def _runs(
    rows: Sequence[Row], owner_of: Callable[[Row], Submission]
) -> list[tuple[Submission, int, int]]:
    """(submission, start, end) of each contiguous slice of rows one submission owns."""
    runs: list[tuple[Submission, int, int]] = []
    for index, row in enumerate(rows):
        owner = owner_of(row)
        if runs and runs[-1][0] is owner and runs[-1][2] == index:
            runs[-1] = (owner, runs[-1][1], index + 1)
        else:
            runs.append((owner, index, index + 1))
    return runs


class _SlicedHook:
    """Calls each submission's hook with only its own rows (a contiguous slice). A hook
    that raises is not called again this step; its submission lands in `faults`."""

    def __init__(
        self, owner_of: Callable[[Row], Submission], before_step_done: bool = False
    ) -> None:
        self.owner_of = owner_of
        self.before_step_done = before_step_done
        self.faults: dict[Submission, BaseException] = {}

    def before_step(self, rows: Sequence[Row]) -> None:
        if self.before_step_done:  # the step's first call only (a retried step)
            self.before_step_done = False
            return
        # all rows, or (jump-forward) the rows still taking draft tokens
        for submission, start, end in _runs(rows, self.owner_of):
            self._call(submission, submission.hook.before_step, rows[start:end])

    def mask_logits(self, logits: torch.Tensor, rows: Sequence[Row]) -> None:
        # all rows, or (jump-forward) the rows still taking draft tokens
        for submission, start, end in _runs(rows, self.owner_of):
            if not isinstance(submission.hook, NoHook):
                self._call(
                    submission, submission.hook.mask_logits, logits[start:end], rows[start:end]
                )

    def after_token(self, row: Row, token_id: int, forced: bool) -> None:
        submission = self.owner_of(row)
        self._call(submission, submission.hook.after_token, row, token_id, forced)

    def draft(self, row: Row) -> list[int]:
        submission = self.owner_of(row)
        drafting = getattr(submission.hook, "draft", None)
        if drafting is None or submission in self.faults:
            return []
        try:
            return list(drafting(row))
        except Exception as err:  # noqa: BLE001 - the scheduler ends this submission
            self.faults[submission] = err
            return []

    def _call(self, submission: Submission, method: Callable[..., None], *args: object) -> None:
        if submission in self.faults:
            return
        try:
            method(*args)
        except Exception as err:  # noqa: BLE001 - the scheduler ends this submission
            self.faults[submission] = err
