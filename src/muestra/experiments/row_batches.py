"""Rows on their way to the store, written a batch at a time (the remote backend's).

A commit per row caps a run at the disk's fsyncs per second (~60 samples/s here, see
benchmarks/remote_ceiling.py); `RowBatches` writes the rows that arrived in one
transaction when `size` are waiting, or `seconds` after the first of them arrived, and
whatever is left when the run ends, however it ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class RowBatches:
    """The answers on their way to the store: written in one transaction per batch, when
    `size` rows are waiting or `seconds` after the first of them arrived (a commit per
    row would cap a run at the disk's fsyncs per second). A run killed in between loses
    at most the rows of the last `seconds`: the resume requests them again, with the
    same seeds."""

    def __init__(
        self, store: Callable[[list[dict[str, Any]]], None], size: int = 256, seconds: float = 0.2
    ) -> None:
        self.store = store
        self.size = size
        self.seconds = seconds
        self.rows: list[dict[str, Any]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.failed: BaseException | None = None  # a timed write that failed, raised next

    def add(self, row: dict[str, Any]) -> None:
        if self.failed is not None:
            raise self.failed
        self.rows.append(row)
        if len(self.rows) >= self.size:
            self.flush()
        elif self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.seconds, self._timed)

    def _timed(self) -> None:
        self.timer = None
        try:
            self.flush()
        except BaseException as err:  # the loop would only log it: the next add raises it
            self.failed = err

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        rows, self.rows = self.rows, []
        if rows:
            self.store(rows)
        if self.failed is not None:
            failed, self.failed = self.failed, None
            raise failed
