"""Spec think modes against each kind of server, as a careless user combines them: every
`[think] mode` (none, auto, tags, text), with and without the model's tokenizer on this
machine, against `muestra serve` on a model without think tags (SmolLM2), on one with
them (the Qwen3-tokenizer kit) and llama.cpp's own `llama-server` (SmolLM2 GGUF).

Each run either stores every row — with its reasoning when the spec has a think phase —
or stops with one `error:` line naming why (exit 2). Never a traceback, never a 5xx in a
server's log, never rows stored without the reasoning the spec asked for (no silent
fallback). The expected outcome of each cell is written out in `expected()`.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from test_server import free_port

pytestmark = pytest.mark.long
SCHEMA = {"type": "object", "required": ["gender"],
          "properties": {"gender": {"enum": ["male", "female"]}}}  # fmt: skip
MODES = [None, "auto", "tags", "text"]  # None: no think phase
SAMPLES = 5  # × 2 prompts: past the 8 answers after which a missing reasoning stops a run


def spec_text(served: str, url: str, mode: str | None, tokenizer: Path | None) -> str:
    model = f'[model]\nid = "{served}"\nendpoint = "{url}/v1"\nconcurrency = 2\nretries = 1\n'
    if tokenizer is not None:
        model += f'generation_config = "{tokenizer}"\n'
    think = "" if mode is None else (
        "[think]\nbudget = 8\ntemperature = 1.0\ntop_p = 1.0\ntop_k = 0\nmin_p = 0.0\n"
        + ("" if mode == "auto" else f'mode = "{mode}"\n')
    )  # fmt: skip
    return (
        f'name = "modes"\nseed = 3\nsamples = {SAMPLES}\n{model}'
        '[prompt]\nuser = "Describe a {who} as a JSON character."\n'
        'items = [{id = "a", who = "warrior"}, {id = "b", who = "healer"}]\n'
        f'{think}[answer]\nmax_tokens = 24\nschema = "s.json"\nfield_probs = false\n'
    )


def expected(server: str, mode: str | None, tokenizer: bool) -> tuple[str, str]:
    """("rows", "") when every row is stored, else ("refused", words of the error).
    `server`: "serve-tagless" (SmolLM2), "serve-tags" (Qwen3 kit), "llama-server"."""
    if mode is None:
        return "rows", ""
    if mode == "auto" and not tokenizer:
        return "refused", 'mode = "auto" needs the model\'s tokenizer'
    tagless = server != "serve-tags"
    settled = mode if mode != "auto" else ("text" if tagless else "tags")
    if settled == "text" and server == "llama-server":
        return "refused", "reason in plain text"
    if settled == "tags" and tagless and server == "serve-tagless":
        return "refused", "thinking_token_budget"  # muestra serve names it (400)
    if settled == "tags" and tagless:
        return "refused", "no reasoning"  # llama-server answers without any: the run stops
    return "rows", ""


def wait_healthy(process: subprocess.Popen, base: str, log: Path) -> None:
    for _ in range(1200):
        if process.poll() is not None:
            raise AssertionError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("the server did not start")


def start(command: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [*command, "--port", str(port)], stdout=handle, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    wait_healthy(process, base, log)
    return process, base


def server_errors(log: Path) -> list[str]:
    """Lines of a server's log that show a 5xx or a traceback."""
    lines = log.read_text(errors="replace").splitlines()
    five = re.compile(r'" 5\d\d |request: \S+ \S+ \S+ 5\d\d')  # uvicorn, llama-server
    return [line for line in lines if five.search(line) or "Traceback" in line]


@pytest.fixture(scope="module")
def servers(smol_kit, tiny_kit, tmp_path_factory):
    """Each server started when a test first asks for it: (process, URL, log, the folder
    holding its tokenizer, its served name)."""
    folder = tmp_path_factory.mktemp("servers")
    muestra = [sys.executable, "-m", "muestra", "serve", "--dtype", "float32", "--threads",
               "1", "--log-level", "info", "--served-model-name"]  # fmt: skip

    def command(name: str) -> tuple[list[str], Path, str]:
        if name == "serve-tagless":
            return [*muestra, "smol", str(smol_kit)], smol_kit, "smol"
        if name == "serve-tags":
            return [*muestra, "tiny", str(tiny_kit)], tiny_kit, "tiny"
        from benchmarks.peers import build_peers  # waits for a build under way

        (gguf,) = smol_kit.glob("*.gguf")
        return (
            [str(build_peers()["llama-server"]), "-m", str(gguf), "--host", "127.0.0.1",
             "-np", "2", "-c", "4096", "-t", "1", "-nr", "--alias", "smol"],
            smol_kit, "smol",
        )  # fmt: skip

    running: dict[str, tuple] = {}

    def get(name: str) -> tuple:
        if name not in running:
            args, tokenizer, served = command(name)
            log = folder / f"{name}.log"
            process, base = start(args, log)
            running[name] = (process, base, log, tokenizer, served)
        return running[name]

    try:
        yield get
    finally:
        for process, *_ in running.values():
            process.terminate()
            process.wait(30)


CELLS = [
    # llama-server's cells need llama.cpp's own programs built (`peers`: `make test-long`
    # builds them; CI's PEERS=0 leaves them out)
    pytest.param(server, mode, tokenizer,
                 marks=[pytest.mark.peers] if server == "llama-server" else [])
    for server in ("serve-tagless", "serve-tags", "llama-server")
    for mode in MODES
    for tokenizer in (True, False)
    if not (mode is None and not tokenizer)
]  # fmt: skip


@pytest.mark.parametrize(("server", "mode", "tokenizer"), CELLS)
def test_each_think_mode_against_each_server(servers, cli, tmp_path, server, mode, tokenizer):
    _, base, log, folder, served = servers(server)
    (tmp_path / "s.json").write_text(json.dumps(SCHEMA))
    spec = tmp_path / "modes.toml"
    spec.write_text(spec_text(served, base, mode, folder if tokenizer else None))
    store = tmp_path / "modes.db"
    before = len(server_errors(log))
    result = cli("run", str(spec), "--out", str(store))
    outcome, words = expected(server, mode, tokenizer)
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert server_errors(log)[before:] == [], server_errors(log)[before:]
    if outcome == "refused":
        assert result.code == 2, (result.code, result.stderr[-1000:])
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and words in errors[0], (words, result.stderr[-1000:])
        return
    assert result.code == 0, result.stderr[-2000:]
    with sqlite3.connect(store) as db:
        rows = db.execute("SELECT reasoning, error FROM samples").fetchall()
    assert len(rows) == 2 * SAMPLES
    if mode is not None:  # the reasoning the spec asked for, in every row
        assert all(reasoning for reasoning, _ in rows), rows
