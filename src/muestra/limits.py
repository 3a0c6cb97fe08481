"""Bounds on what a user can ask for, checked before anything is allocated.

Each `Limit` has a default that fits this kind of machine and an environment variable to
raise (or lower) it. `MAX_THREADS` bounds a runtime's CPU threads wherever they are given
(`--threads`, `[model] threads`, `load_model(threads=…)`). The server's own limits (rows,
ids and characters per request) are `muestra serve` flags; see `server/templates.py` and
`muestra serve --help`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from muestra.errors import InputError


@dataclass(frozen=True)
class Limit:
    name: str  # the environment variable that overrides it
    default: int
    what: str  # "samples per cell", …

    @property
    def value(self) -> int:
        raw = os.environ.get(self.name)
        if raw is None or not raw.strip():
            return self.default
        try:
            value = int(raw.replace("_", ""))
        except ValueError:
            raise InputError(f"{self.name}={raw!r} must be a whole number") from None
        if value < 1:
            raise InputError(f"{self.name}={raw!r} must be at least 1")
        return value

    def check(self, count: int, where: str) -> None:
        """Refuse `count` over the limit, naming where it came from and how to change it."""
        if count > self.value:
            raise InputError(
                f"{where}: {count:,} {self.what} is over muestra's limit of {self.value:,} "
                f"(set {self.name} to change it, if the machine can hold the run)"
            )


# one prompt × condition × model cell: its samples are planned and stored together
SAMPLES_PER_CELL = Limit("MUESTRA_MAX_SAMPLES", 100_000, "samples per prompt × condition × model")
# a whole run: every cell's samples (a probe's templates × groups × samples, an eval's
# questions × draws …)
SAMPLES_PER_RUN = Limit("MUESTRA_MAX_RUN_SAMPLES", 10_000_000, "samples in one run")

# CPU threads of a runtime: more than any machine here has cores. Without a bound a typo
# (`--threads 10000`) starts that many llama.cpp workers, each spinning while it waits.
MAX_THREADS = 1024


def check_threads(threads: int, where: str = "threads") -> int:
    """`threads` if it is in [1, MAX_THREADS], else an `InputError` naming `where`."""
    if threads < 1:
        raise InputError(f"{where}={threads} must be at least 1")
    if threads > MAX_THREADS:
        raise InputError(
            f"{where}={threads:,} is over muestra's limit of {MAX_THREADS:,} CPU threads; "
            "give at most the machine's cores (leave it out: the cores, or OMP_NUM_THREADS)"
        )
    return threads
