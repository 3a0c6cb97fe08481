"""`mn.serve`: `muestra serve MODEL` in a child process on 127.0.0.1, owned by the caller.

- **Its own readiness.** The server is up when `/health` answers *from this child*: the
  answer carries the server's pid, and a port answered by another process (another
  server, an old child) is refused by name — before the child starts when the port is
  taken already, and while waiting when someone else answers it.
- **It dies with its parent.** On Linux the child asks the kernel for SIGTERM when the
  thread that started it ends (`prctl(PR_SET_PDEATHSIG)`, set between fork and exec; so
  only when started from the main thread: a worker thread's end would end it too), and
  an `atexit` hook stops it when the interpreter exits normally. `stop()` (or leaving the
  `with` block) ends it at once.
- A child that exits before answering (a flag it refused, a model that does not load, a
  port taken) is one `InputError` with the child's own error line and its log's path.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from muestra.errors import InputError
from muestra.notebook.checks import PathLike, Port, Seconds, checked

PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Server:
    """`muestra serve MODEL` in a child process on 127.0.0.1 (see the module docstring);
    up once /health answers from it. Its log is `self.log`."""

    @checked
    def __init__(
        self, model: PathLike, port: Port | None = None, timeout: Seconds = 300, **flags: Any
    ) -> None:
        if port is not None:
            _check_port_free(port)
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "muestra", "serve", str(model), "--host", "127.0.0.1",
                "--port", str(self.port)]  # fmt: skip
        for name, value in flags.items():
            flag = "--" + name.replace("_", "-")
            if value is True:
                args.append(flag)
            elif value not in (None, False):
                args += [flag, str(value)]
        self.log = Path(tempfile.mkstemp(prefix="muestra-serve-", suffix=".log")[1])
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(
                args, stdout=sink, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent()
            )
        atexit.register(self.stop)
        self._wait(timeout)

    def _wait(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise InputError(
                    f"muestra serve exited with {self.process.returncode} before answering: "
                    f"{_last_error(self.log)} (its log: {self.log})"
                )
            with contextlib.suppress(httpx.HTTPError, ValueError):
                answer = httpx.get(f"{self.url}/health", timeout=2)
                if answer.status_code == 200:
                    pid = answer.json().get("pid")
                    if pid == self.process.pid:
                        return
                    self.stop()
                    raise InputError(
                        f"port {self.port} on 127.0.0.1 is answered by another process (pid "
                        f"{pid}), not this server: pass another port, or none for a free one"
                    )
            time.sleep(0.3)
        self.stop()
        raise InputError(f"muestra serve did not answer /health in {timeout:.0f} s: see {self.log}")

    def client(self, **kwargs: Any) -> Any:
        """An `openai.OpenAI` client for this server."""
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", "none"), **kwargs)

    def stop(self) -> None:
        atexit.unregister(self.stop)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.process.poll() is None else f"stopped ({self.process.returncode})"
        return f"muestra serve at {self.url} · {state}"


@checked
def serve(model: PathLike, **flags: Any) -> Server:
    """Start `muestra serve MODEL` on a free loopback port (or `port=`); `flags` are its
    options (`max_batch=8`, `served_model_name="smol"`, `max_memory="6GiB"`: the llama.cpp
    KV cache's budget…). Use it in a `with` block or call `.stop()`; it also ends with the
    Python process that started it."""
    return Server(model, **flags)


def _die_with_parent() -> Callable[[], None] | None:
    """The child's set-up between fork and exec: SIGTERM when this thread ends (Linux), or
    None where that cannot be asked for or would fire too early (not the main thread)."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not (
        threading.main_thread()
    ):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before the fork
    parent = os.getpid()

    def setup() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return setup


def _check_port_free(port: int) -> None:
    """Refuse a port something already listens on, before a child starts for nothing."""
    with socket.socket() as probe:
        probe.settimeout(1)
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise InputError(
                f"port {port} on 127.0.0.1 is taken by another process: pass another port, "
                "or none for a free one"
            )


def _last_error(log: Path) -> str:
    """The child's own error line (`error: …`), else its log's last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("error:", "Error:"))]
    return (errors or lines or ["(no output)"])[-1][:300]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
