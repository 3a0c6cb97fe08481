"""How the compute threads wait: one OpenMP wait policy for the whole process.

Both runtimes compute on OpenMP threads of one libgomp: torch ships it, and llama.cpp's
CPU backend (an OpenMP build) links the copy torch loaded. Between two pieces of work a
thread waits — at llama.cpp's barrier after every node of a graph, and between graphs.
libgomp's default wait *spins* (~300,000 rounds, milliseconds) before it sleeps: alone,
that costs nothing; when the cores are shared with other work, a spinning thread holds a
core its partner needs to reach the barrier, and decoding collapses (a run with 2
threads stored 0 rows in 7 minutes on a busy 2-core machine). With `sleep`
(OMP_WAIT_POLICY=PASSIVE) a waiting thread sleeps at once and gives the core back.
`benchmarks/busy_machine.py` measures both, with and without a competing load.

libgomp reads the policy once, when it loads — with torch — so it is set before torch is
imported (the command line does it first thing: `--thread-wait`, else the environment's
OMP_WAIT_POLICY, else the default) and is fixed afterwards: asking for the other policy
later in the same process is refused by name, never silently ignored.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from muestra.errors import InputError

THREAD_WAITS = ("sleep", "spin")
DEFAULT_THREAD_WAIT = "sleep"
POLICY = {"sleep": "PASSIVE", "spin": None}  # None: libgomp's default (spin, then sleep)


def openmp_started() -> bool:
    """Whether libgomp is loaded in this process (its wait policy is then fixed)."""
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:  # not Linux: torch brings libgomp
        return "torch" in sys.modules


def thread_wait_now() -> str:
    """The policy this process's environment says: sleep, spin or active (spin forever,
    OMP_WAIT_POLICY=ACTIVE)."""
    policy = os.environ.get("OMP_WAIT_POLICY", "").strip().upper()
    return {"PASSIVE": "sleep", "ACTIVE": "active"}.get(policy, "spin")


def apply_thread_wait(wait: str | None, where: str = "--thread-wait") -> str:
    """Make `wait` the process's policy (None: the environment's OMP_WAIT_POLICY when set,
    else the default) and return the policy in effect; refuse, naming `where`, a policy
    that can no longer be set because OpenMP has started with another."""
    if wait is not None and wait not in THREAD_WAITS:
        raise InputError(f"{where} {wait!r} is not one of {', '.join(THREAD_WAITS)}")
    if openmp_started():
        now = thread_wait_now()
        if wait is not None and wait != now:
            raise InputError(
                f"{where} {wait}: this process's compute threads started already with "
                f"{now!r} (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}: "
                "torch was imported first); set the environment before Python starts "
                f"(OMP_WAIT_POLICY={POLICY[wait] or 'unset'}) or give it on the command line"
            )
        return now
    if wait is None:
        if "OMP_WAIT_POLICY" in os.environ:
            return thread_wait_now()
        wait = DEFAULT_THREAD_WAIT
    policy = POLICY[wait]
    if policy is None:
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = policy
    return wait
