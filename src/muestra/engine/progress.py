"""Where long work is: rows done of total, tokens per second, time left, resident memory.

One tracker for every place that shows it: the scheduler (the server's `/health`) and
the runner's progress (`muestra run`/`eval` bars, the notebook API's bar). Rates are
taken over a recent window (`WINDOW_S`), not since the start, so a run that slows down
says so at once and a server that goes idle shows 0 tok/s instead of its old average;
the time left is the rows left at the recent row rate.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

WINDOW_S = 30.0


class RateTracker:
    """Rows and tokens as they finish, on a clock (`time.monotonic`; tests pass a fake
    one). Safe to feed from one thread and read from another."""

    def __init__(
        self,
        total: int | None = None,
        *,
        window: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.window = window
        self.clock = clock
        self.started = clock()
        self.done = 0
        self.tokens = 0
        self._events: deque[tuple[float, int, int]] = deque()
        self._lock = threading.Lock()

    def add(self, rows: int = 0, tokens: int = 0) -> None:
        """`rows` more finished, `tokens` more generated, now."""
        now = self.clock()
        with self._lock:
            self.done += rows
            self.tokens += tokens
            self._events.append((now, rows, tokens))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] <= now - self.window:
            self._events.popleft()

    @property
    def elapsed(self) -> float:
        return self.clock() - self.started

    def rates(self) -> tuple[float, float]:
        """(rows/s, tokens/s) over the last `window` seconds (since the start when it is
        younger than that)."""
        now = self.clock()
        with self._lock:
            self._trim(now)
            rows = sum(e[1] for e in self._events)
            tokens = sum(e[2] for e in self._events)
        span = min(self.window, now - self.started)
        if span <= 0:
            return 0.0, 0.0
        return rows / span, tokens / span

    def eta(self) -> float | None:
        """Seconds until `total` rows are done at the recent row rate (None: no total,
        or no row finished lately to take a rate from)."""
        if self.total is None:
            return None
        left = self.total - self.done
        if left <= 0:
            return 0.0
        per_second = self.rates()[0]
        return left / per_second if per_second > 0 else None


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def resident_bytes() -> int | None:
    """This process's resident memory now (VmRSS; psutil off Linux; None if unknown)."""
    found = _status_kib("VmRSS")
    if found is not None:
        return found
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


def peak_resident_bytes() -> int | None:
    """This process's peak resident memory so far (VmHWM; None where unknown)."""
    return _status_kib("VmHWM")


def size_text(count: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count / 1024:.0f} KiB"


def duration_text(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_text(tokens_per_s: float, eta_s: float | None, rss: int | None) -> str:
    """ "340 tok/s · ETA 1m05s · RSS 812.0 MiB": the parts that are known."""
    parts = [f"{tokens_per_s:.0f} tok/s"]
    if eta_s is not None:
        parts.append(f"ETA {duration_text(eta_s)}")
    if rss is not None:
        parts.append(f"RSS {size_text(rss)}")
    return " · ".join(parts)
