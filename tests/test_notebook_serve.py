"""`mn.serve` with real child processes: it is ready only when its own child answers (a
port another process answers is refused by name, and no child is left behind), and the
child ends with the script that started it — a normal exit (atexit) or SIGKILL (Linux's
parent-death signal)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import muestra.notebook as mn
from muestra.errors import InputError
from muestra.notebook import serving


class ForeignHealth(BaseHTTPRequestHandler):
    """Another process's server: /health answers 200, as a muestra server would."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = json.dumps({"status": "ok", "model": "someone else", "pid": 1}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def foreign_port():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ForeignHealth)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def dead(pid: int) -> bool:
    """Gone, or a zombie waiting for its reaper."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def wait_dead(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if dead(pid):
            return True
        time.sleep(0.2)
    return dead(pid)


def test_a_port_another_process_answers_is_refused(tiny_kit, foreign_port, monkeypatch, cli):
    """It was taken for this server's: `mn.serve(..., port=P)` returned a Server attached
    to the foreign process while its own child had exited."""
    with pytest.raises(InputError, match=f"port {foreign_port} .*taken by another process"):
        mn.serve(str(tiny_kit), port=foreign_port)
    # and when the port is taken between the check and the child's start: the child's
    # own refusal (or the foreign pid) ends the wait, and the child is not left running
    started = []
    real_popen = serving.subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(serving, "_check_port_free", lambda port: None)
    monkeypatch.setattr(serving.subprocess, "Popen", popen)
    with pytest.raises(InputError, match=f"port {foreign_port}|--port {foreign_port}"):
        mn.serve(str(tiny_kit), port=foreign_port, timeout=120)
    (child,) = started
    assert child.poll() is not None
    refused = cli("serve", str(tiny_kit), "--port", str(foreign_port))
    assert refused.code == 2 and f"--port {foreign_port}: cannot listen" in refused.stderr


SCRIPT = """
import os, sys, time
import muestra.notebook as mn
server = mn.serve(sys.argv[1])
print(server.process.pid, server.port, flush=True)
if sys.argv[2] == "exit":
    sys.exit(0)  # without stop(): the atexit hook ends the child
time.sleep(600)  # killed by the test: the kernel's parent-death signal ends the child
"""


@pytest.mark.slow  # a serve child starts and loads the tiny kit (~10 s each)
@pytest.mark.parametrize("how", ["exit", "kill"])
def test_the_child_dies_with_the_script_that_started_it(tiny_kit, tmp_path, how):
    script = tmp_path / "serve.py"
    script.write_text(SCRIPT)
    parent = subprocess.Popen(
        [sys.executable, str(script), str(tiny_kit), how],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = parent.stdout.readline()
        assert line, parent.stderr.read()[-2000:]
        child, port = (int(x) for x in line.split())
        if how == "kill":
            os.kill(parent.pid, signal.SIGKILL)
        parent.wait(60)
        assert wait_dead(child, 30), f"the serve child {child} outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
