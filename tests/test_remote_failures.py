"""The remote backend when endpoints misbehave, and what a remote run leaves and says:
a malformed 200 is that endpoint's failure (retried elsewhere, the endpoint rested, the
row stored once); a run whose endpoints never answer leaves nothing behind, as a local
model that does not load; a think mode no local tokenizer can settle is refused; the
notes printed are true for the run; answers reach the store in batches, as they arrive,
with at most `concurrency` requests in flight per endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from muestra.errors import InputError
from muestra.experiments.spec import load_spec
from test_remote import MockEndpoints, answer, fake_server, remote_runner, write_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MALFORMED = [
    ("<html>bad gateway</html>", "not JSON"),
    ("[]", "not an object"),
    ("{}", "choices is missing"),
    ('{"choices": []}', "choices is empty"),
    ('{"choices": [{"message": "hola"}]}', "message is str"),
    ('{"choices": [{"message": {"content": 7}}]}', "content is int"),
    (
        '{"choices": [{"message": {"content": "x"}}], "usage": {"prompt_tokens": "many"}}',
        "prompt_tokens is 'many'",
    ),
]


@pytest.mark.parametrize(("body", "why"), MALFORMED)
def test_a_malformed_200_is_retried_on_the_healthy_endpoint(tmp_path, body, why):
    """b.test answers every chat request 200 with a body the runner cannot read; a.test is
    healthy: every row is stored once, from a.test, and b.test rests after failing."""
    failures = []

    def script(request, attempt):
        if request.url.host == "b.test":
            failures.append(request)
            return httpx.Response(200, text=body, headers={"content-type": "application/json"})
        return answer(request)

    transport, _ = fake_server(script)
    remote, units, rows, _ = remote_runner(tmp_path, transport)
    remote.run(units)
    assert sorted((r["prompt_id"], r["sample_index"]) for r in rows) == [
        (p, i) for p in (1, 2) for i in (0, 1)
    ]
    assert {r["endpoint"] for r in rows} == {"http://a.test/v1"}
    assert all(r["error"] is None for r in rows)
    assert 1 <= len(failures) <= 2  # then it rests, and the run stays on a.test
    assert remote.pool.failures["http://b.test/v1"] >= 1


def test_a_malformed_answer_from_the_only_endpoint_gives_up_by_name(tmp_path):
    from muestra.experiments.remote import RemoteError

    transport, calls = fake_server(lambda request, attempt: httpx.Response(200, text="oops"))
    remote, units, rows, _ = remote_runner(tmp_path, transport, retries=1)
    with pytest.raises(RemoteError, match=r"gave up after 1 retries.*200 .*not JSON.*'oops'"):
        remote.run(units)
    assert rows == []


def test_a_model_list_that_is_not_json_rests_that_endpoint_at_start(tmp_path):
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            if request.url.host == "b.test":
                return httpx.Response(200, text="<html>login</html>")
            return httpx.Response(200, json={"data": [{"id": "m", "owned_by": "vllm"}]})
        return answer(request)

    remote, units, rows, notes = remote_runner(tmp_path, MockEndpoints(handler))
    remote.run(units)
    assert len(rows) == 4 and {r["endpoint"] for r in rows} == {"http://a.test/v1"}
    (resting,) = [n for n in notes if "http://b.test/v1 does not answer" in n]
    assert "not JSON" in resting and "tries it again later" in resting


def test_a_failed_run_stores_what_arrived_and_the_store_sees_batches(tmp_path):
    """A refusal (400) at the last sample ends the run, but the answers that arrived
    before it are stored; answers are written in batches, not one transaction each."""
    from muestra.experiments.remote import RemoteError

    served = []

    def script(request, attempt):
        served.append(request)
        if len(served) == 4:
            return httpx.Response(400, json={"error": {"message": "bad request"}})
        return answer(request)

    transport, _ = fake_server(script)
    remote, units, rows, _ = remote_runner(
        tmp_path, transport, 'sampling_fallback = "neutral"\nconcurrency = 1'
    )
    batches = []
    remote.store = lambda batch: (batches.append(len(batch)), rows.extend(batch))
    with pytest.raises(RemoteError, match="400: bad request"):
        remote.run(units)
    assert len(rows) == 3 == sum(batches)


def test_rows_are_stored_as_they_arrive_with_bounded_requests_in_flight(tmp_path):
    """Slow answers (0.3 s) are stored within the batch window (0.2 s), before the run
    ends; fast ones share transactions; never more requests in flight than the
    endpoints' slots (2 endpoints × concurrency)."""
    in_flight, most, served = 0, 0, 0

    def handler_for(delay):
        async def handler(request: httpx.Request) -> httpx.Response:
            nonlocal in_flight, most, served
            if request.url.path.endswith("/models"):
                return httpx.Response(200, json={"data": [{"id": "m", "owned_by": "vllm"}]})
            in_flight += 1
            most = max(most, in_flight)
            await asyncio.sleep(delay)
            in_flight -= 1
            served += 1
            return answer(request)

        return handler

    def runner(folder, delay, concurrency, samples):
        folder.mkdir()
        remote, units, rows, _ = remote_runner(
            folder,
            MockEndpoints(handler_for(delay)),
            f'sampling_fallback = "neutral"\nconcurrency = {concurrency}',
        )
        for unit in units:
            object.__setattr__(unit, "missing", tuple(range(samples)))
        writes = []  # answers served when each batch was written
        remote.store = lambda batch: (writes.append((len(batch), served)), rows.extend(batch))
        remote.run(units)
        return rows, writes

    rows, writes = runner(tmp_path / "slow", 0.3, 1, 3)  # 6 answers, 2 at a time
    assert len(rows) == 6 and most == 2
    assert writes[0][1] < 6 and len(writes) >= 3, writes  # stored before the run ended
    most = served = 0
    rows, writes = runner(tmp_path / "fast", 0.0, 3, 120)
    assert len(rows) == 240 and len({(r["prompt_id"], r["sample_index"]) for r in rows}) == 240
    assert len(writes) <= 240 // 4, writes  # transactions of many rows
    assert most <= 6


class Loopback(BaseHTTPRequestHandler):
    """Three endpoints on one port, told apart by their path: /slow answers after 3 s,
    /bad answers 200 with HTML, /good answers at once."""

    def do_GET(self):  # noqa: N802
        self.reply(200, json.dumps({"data": [{"id": "m", "owned_by": "vllm"}]}).encode())

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["content-length"]))
        if self.path.startswith("/slow"):
            time.sleep(3)
        if self.path.startswith("/bad"):
            return self.reply(200, b"<html>502 bad gateway</html>")
        request = httpx.Request("POST", "http://x/v1/chat/completions", content=body)
        return self.reply(200, answer(request).content)

    def reply(self, status, data):
        self.send_response(status)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        with contextlib.suppress(OSError):  # a timed-out client has gone
            self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_the_http_transport_retries_a_slow_and_a_malformed_endpoint(tmp_path):
    """The real transport (aiohttp) over loopback: a request that times out and a 200
    that is not JSON each go to the endpoint that answers; every row is stored once."""
    from muestra.experiments.remote import RemoteRunner
    from muestra.experiments.runner import Runner

    server = ThreadingHTTPServer(("127.0.0.1", 0), Loopback)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    urls = [f"{base}/slow/v1", f"{base}/bad/v1", f"{base}/good/v1"]
    try:
        spec = load_spec(write_spec(
            tmp_path, "loop",
            f'[model]\nid = "m"\nendpoint = {json.dumps(urls)}\ntimeout = 1.0\n'
            'sampling_fallback = "neutral"\nconcurrency = 1',
            samples=3,
        ))  # fmt: skip
        runner = Runner(spec, tmp_path / "loop.db")
        runner.open()
        rows = []
        remote = RemoteRunner(spec, spec.spec.model, 21, runner.row, rows.extend)
        remote.run(runner.plan())
    finally:
        server.shutdown()
    assert len(rows) == 6 and len({(r["prompt_id"], r["sample_index"]) for r in rows}) == 6
    assert {r["endpoint"] for r in rows} == {urls[2]} and all(r["error"] is None for r in rows)
    assert remote.pool.failures[urls[0]] >= 1 and remote.pool.failures[urls[1]] >= 1


# ---- what a remote run leaves behind -------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed with the socket: nothing listens there


def dead_spec(tmp_path: Path, name: str = "dead") -> Path:
    urls = [f"http://127.0.0.1:{closed_port()}/v1" for _ in range(2)]
    return write_spec(
        tmp_path,
        name,
        f'[model]\nid = "m"\nendpoint = {json.dumps(urls)}\nretries = 0\n'
        'sampling_fallback = "neutral"',
    )


def runs_in(store: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(store) as db:
        return db.execute("SELECT id, status FROM runs ORDER BY id").fetchall()


def test_a_run_whose_endpoints_never_answer_leaves_no_run(cli, tmp_path):
    """As a local model that does not load: the store this run created is removed; in a
    store that already held a run, only the new run is deleted."""
    from muestra.experiments.runner import Runner

    spec = dead_spec(tmp_path)
    store = tmp_path / "dead.db"
    result = cli("run", str(spec), "--out", str(store))
    assert result.code == 2 and "no endpoint answers" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("dead.db*"))
    with Runner(load_spec(spec), store) as first:  # a store holding one run already
        first.open()
    result = cli("run", str(spec), "--out", str(store), "--force-new")
    assert result.code == 2 and "no endpoint answers" in result.stderr
    assert [run_id for run_id, _ in runs_in(store)] == [1]


def test_a_run_whose_endpoints_refuse_every_request_leaves_no_run(tmp_path, monkeypatch):
    """The endpoints passed the start's checks, then refused the first request (400): no
    sample was stored, so the run this command created goes, as it does for a local model
    refused on its first batch — one rule for every backend."""
    import muestra.experiments.remote as remote_module
    from muestra.experiments.remote import RemoteError, RemoteRunner
    from muestra.experiments.runner import Runner

    transport, _ = fake_server(
        lambda request, attempt: httpx.Response(400, json={"error": {"message": "no"}})
    )

    class Faked(RemoteRunner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs, transport=transport)

    monkeypatch.setattr(remote_module, "RemoteRunner", Faked)
    spec = write_spec(
        tmp_path,
        "refused",
        '[model]\nid = "m"\nendpoint = "http://a.test/v1"\nsampling_fallback = "neutral"',
    )
    store = tmp_path / "refused.db"
    with Runner(load_spec(spec), store) as runner, pytest.raises(RemoteError, match="400: no"):
        runner.open()
        runner.run()
    assert not list(tmp_path.glob("refused.db*"))


# ---- the think mode on an endpoint ---------------------------------------------------------


def test_auto_mode_without_a_local_tokenizer_is_refused_by_name(cli, tmp_path):
    """examples/characters.toml (mode "auto") pointed at an endpoint, with no tokenizer of
    the served model on this machine: refused before the store or any request, saying how
    to pass the tokenizer or the mode — never a silent "tags"."""
    body = (EXAMPLES / "characters.toml").read_text()
    local_id = 'id = "~/.cache/muestra/kit/smollm2-135m-instruct"'
    assert local_id in body and "[think]" in body and "mode" not in body.split("[think]")[1]
    spec = tmp_path / "characters.toml"
    spec.write_text(body.replace(local_id, 'id = "smollm2"\nendpoint = "http://127.0.0.1:9/v1"'))
    (tmp_path / "character.schema.json").write_text(
        (EXAMPLES / "character.schema.json").read_text()
    )
    store = tmp_path / "c.db"
    result = cli("run", str(spec), "--out", str(store))
    assert result.code == 2 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    for words in ('mode = "auto"', "tokenizer", "generation_config", 'mode = "tags"',
                  'mode = "text"', "'smollm2'", str(spec)):  # fmt: skip
        assert words in line, (words, line)
    assert not store.exists()
    # a folder with only the generation config settles the sampling, not the mode
    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "generation_config.json").write_text('{"do_sample": true, "top_p": 0.9}')
    spec.write_text(spec.read_text().replace('endpoint = "', f'generation_config = "{folder}"\n'
                                             'endpoint = "'))  # fmt: skip
    from muestra.experiments.sampling import resolve_think

    with pytest.raises(InputError, match=r"beside .*config-only.*generation_config\.json"):
        resolve_think(load_spec(spec), load_spec(spec).spec.model)


def test_a_tokenizer_beside_the_config_settles_auto(tiny_kit, tmp_path):
    from muestra.experiments.sampling import resolve_think

    spec = write_spec(
        tmp_path,
        "kit",
        f'[model]\nid = "tiny"\nendpoint = "http://h/v1"\ngeneration_config = "{tiny_kit}"',
        mode=None,
    )
    (think,) = resolve_think(load_spec(spec), load_spec(spec).spec.model).values()
    assert (think.mode, think.mode_source) == ("tags", "tokenizer")  # a Qwen3 tokenizer


def test_a_think_phase_answered_without_reasoning_stops_the_run(tmp_path):
    """A server that returns no reasoning field (a model without think tags, or no
    reasoning parser) to a think condition: the run stops after 8 such answers, naming
    both causes, instead of storing every row without reasoning."""
    from muestra.experiments.remote import NO_REASONING_LIMIT, RemoteError

    def bare(request, attempt):
        response = answer(request)
        body = json.loads(response.content)
        del body["choices"][0]["message"]["reasoning"]
        return httpx.Response(200, json=body)

    transport, calls = fake_server(bare)
    remote, units, rows, _ = remote_runner(
        tmp_path, transport, 'sampling_fallback = "neutral"\nconcurrency = 1'
    )
    for unit in units:
        object.__setattr__(unit, "missing", tuple(range(10)))
    with pytest.raises(RemoteError, match='no reasoning.*mode = "text".*--reasoning-parser'):
        remote.run(units)
    assert NO_REASONING_LIMIT - 2 <= len(rows) < NO_REASONING_LIMIT + 2  # 2 in flight
    # an empty reasoning field is a reasoning (the model closed its think block at once)
    (tmp_path / "empty").mkdir()

    def empty(request, attempt):
        body = json.loads(answer(request).content)
        body["choices"][0]["message"]["reasoning"] = ""
        return httpx.Response(200, json=body)

    transport, _ = fake_server(empty)
    remote, units, rows, _ = remote_runner(tmp_path / "empty", transport)
    for unit in units:
        object.__setattr__(unit, "missing", tuple(range(10)))
    remote.run(units)
    assert len(rows) == 20


# ---- notes ---------------------------------------------------------------------------------


def notes_for(tmp_path, served_by, think="", answer="", name="n"):
    from muestra.experiments.remote import endpoint_notes
    from muestra.experiments.sampling import resolve_think

    (tmp_path / "p.schema.json").write_text(json.dumps({"type": "object"}))
    spec = tmp_path / f"{name}.toml"
    spec.write_text(f"""
name = "n"
samples = 1
[model]
id = "m"
endpoint = "http://h/v1"
sampling_fallback = "neutral"
[prompt]
user = "hola {{x}}"
[[prompt.items]]
id = "a"
x = "1"
{think}
[answer]
schema = "p.schema.json"
{answer}
""")
    loaded = load_spec(spec)
    model = loaded.spec.model
    return endpoint_notes(loaded, model, resolve_think(loaded, model), served_by)


def test_each_note_only_when_it_applies(tmp_path):
    think = '[think]\nmode = "tags"\nbudget = 8\ntemperature = 0.7\ntop_p = 0.9'
    same = "temperature = 0.7\ntop_p = 0.9\ntop_k = 0\nmin_p = 0.0\nfield_probs = false"
    # no think phase: the answer's own settings are sent, nothing to say about them
    notes = notes_for(tmp_path, {"vllm"}, answer="field_probs = false", name="a")
    assert not any("think settings" in n for n in notes)
    assert any("not muestra serve (vllm)" in n for n in notes)
    assert not any("field_probs" in n for n in notes)
    # a think phase and a greedy answer: the server samples the answer at T 0.7
    notes = notes_for(tmp_path, {"vllm"}, think, "field_probs = false", name="b")
    assert any("think settings" in n and "default" in n for n in notes)
    # the same settings in both phases: nothing differs
    notes = notes_for(tmp_path, {"vllm"}, think, same, name="c")
    assert not any("think settings" in n for n in notes)
    # field_probs asked for: not stored, on any server
    for served_by in ({"vllm"}, {"muestra"}):
        notes = notes_for(tmp_path, served_by, think, "", name="d")
        assert any("field_probs" in n for n in notes)
    assert not any("not muestra serve" in n for n in notes)  # the last: muestra serve
