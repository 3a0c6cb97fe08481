"""The remote backend: an experiment run against `muestra serve` on loopback, killed and
resumed, stores the same rows as a local run; retries and refusals with a fake server."""

from __future__ import annotations

import inspect
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import helpers
from muestra.errors import InputError
from muestra.experiments.spec import load_spec
from test_server import start_server, stop_server

KEY = "sk-remote-test"
SAMPLING = ("temperature", "top_p", "top_k", "min_p")
SCHEMA = {
    "type": "object",
    "properties": {
        "sexo": {"enum": ["masculino", "femenino"]},
        "edad": {"type": "integer", "minimum": 18, "maximum": 99},
    },
    "required": ["sexo", "edad"],
}


def write_spec(folder, name, model_table, samples=6, extra="", mode="tags"):
    return helpers.write_spec(
        folder,
        name,
        "",
        schema=SCHEMA,
        text=f"""
name = "remoto"
seed = 21
samples = {samples}

{model_table}

[prompt]
system = "Responde en JSON."
user = "Personaje para: <{{descripcion}}>"

[[prompt.items]]
id = "a"
descripcion = "Soy fuerte."

[[prompt.items]]
id = "b"
descripcion = "Soy amable."
think_budget = 3

[think]
budget = 6
temperature = 1.0
{f'mode = "{mode}"' if mode else ""}

[answer]
max_tokens = 40
schema = "p.schema.json"
field_probs = false
{extra}""",
    )


COLUMNS = (
    "p.prompt_key, s.sample_index, s.seed, s.think_budget, s.reasoning, s.think_tokens, "
    "s.budget_hit, s.answer_text, s.answer_json, s.finish_reason, s.error IS NULL, "
    "s.prompt_tokens, s.completion_tokens"
)


def rows_of(path):
    with sqlite3.connect(path) as db:
        return db.execute(
            f"SELECT {COLUMNS} FROM samples s JOIN prompts p ON p.id = s.prompt_id "
            "ORDER BY p.prompt_key, s.sample_index"
        ).fetchall()


def count(path):
    try:
        with sqlite3.connect(path, timeout=5) as db:
            return db.execute("SELECT count(*) FROM samples").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def endpoints_of(path):
    with sqlite3.connect(path, timeout=5) as db:
        return [r[0] for r in db.execute("SELECT endpoint FROM samples ORDER BY id")]


@pytest.mark.long
def test_a_run_over_two_endpoints_survives_one_stopping_and_a_kill(tiny_kit, tmp_path):
    """Two `muestra serve` processes share a run; one is killed mid-run, then the run
    itself is killed (SIGKILL) and resumed on the same two URLs, one of them dead: every
    row is stored once, equal to a local run's, and records the endpoint that made it."""
    import muestra

    local_dir, remote_dir = tmp_path / "local", tmp_path / "remote"
    local_dir.mkdir()
    remote_dir.mkdir()
    local = write_spec(local_dir, "local", f'[model]\nid = "{tiny_kit}"\ndtype = "float32"')
    muestra.run(local, local_dir / "local.db")

    serve = ("--served-model-name", "tiny", "--api-key", KEY)
    first_server, base_a = start_server(tiny_kit, *serve)
    second_server, base_b = start_server(tiny_kit, *serve)
    urls = [f"{base_a}/v1", f"{base_b}/v1"]
    try:
        remote = write_spec(
            remote_dir,
            "remote",
            f'[model]\nid = "tiny"\nendpoint = {json.dumps(urls)}\napi_key_env = "REMOTE_KEY"\n'
            f'concurrency = 1\ngeneration_config = "{tiny_kit}"',
        )
        env = {**os.environ, "REMOTE_KEY": KEY}
        store = remote_dir / "remote.db"
        command = [sys.executable, "-m", "muestra", "run", str(remote), "--out", str(store)]
        first = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None:
            if count(store) and urls[1] in endpoints_of(store):
                break
            time.sleep(0.02)
        os.killpg(second_server.pid, signal.SIGKILL)  # the second endpoint stops mid-run
        second_server.wait()
        died_at = count(store)
        while count(store) < died_at + 2 and time.time() < deadline and first.poll() is None:
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()
        stored = count(store)
        assert 0 < died_at < stored < 12, f"the kills should land mid-run: {died_at}, {stored}"
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stderr
        assert f"{stored} stored, {12 - stored} to run" in second.stderr
    finally:
        stop_server(first_server)
        if second_server.poll() is None:
            stop_server(second_server)
    remote_rows, local_rows = rows_of(store), rows_of(local_dir / "local.db")
    assert len(remote_rows) == 12 and len({(r[0], r[1]) for r in remote_rows}) == 12
    assert remote_rows == local_rows  # row for row, whichever endpoint computed it
    assert any(r[6] for r in remote_rows) and any(r[10] for r in remote_rows)
    made_by = endpoints_of(store)
    assert set(made_by) == set(urls) and made_by[died_at + 1 :].count(urls[1]) <= 1
    assert made_by[stored:] == [urls[0]] * (12 - stored)  # the resume: only the live one
    with sqlite3.connect(store) as db:
        provenance = json.loads(db.execute("SELECT provenance_json FROM models").fetchone()[0])
    assert provenance["served_by"] == ["muestra"] and provenance["endpoints"] == urls
    # the think fields the spec leaves unset came from the kit's generation config, as locally
    sent = stored_think(store)["remote"]["tiny"]
    assert sent["source"] == {
        "temperature": "spec",
        "top_p": "generation_config",
        "top_k": "generation_config",
        "min_p": "generation_config",
        "typical_p": "generation_config",
    }
    kit = json.loads((tiny_kit / "generation_config.json").read_text())
    assert (sent["top_p"], sent["top_k"]) == (kit["top_p"], kit["top_k"]) and sent["min_p"] == 0


def stored_think(path):
    with sqlite3.connect(path) as db:
        return json.loads(db.execute("SELECT think_json FROM conditions").fetchone()[0])


class MockEndpoints:
    """A remote runner's transport answering from `handler(httpx.Request)` (sync or async),
    an `httpx.Response` or an `httpx.TransportError` (no answer), without a network."""

    def __init__(self, handler):
        self.handler = handler

    async def request(self, method, url, body, headers):
        from muestra.experiments.endpoints import Answer, Unreachable

        request = httpx.Request(method, url, content=body, headers=headers)
        try:
            response = self.handler(request)
            if inspect.isawaitable(response):
                response = await response
        except httpx.TransportError as err:
            raise Unreachable(f"{type(err).__name__}: {err}") from err
        return Answer(response.status_code, response.headers, response.read())

    async def aclose(self):
        pass


def fake_server(script):
    """A transport answering from `script(request, attempt)`; `calls` records every
    request it receives."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "m", "owned_by": "vllm"}]})
        return script(request, len(calls))

    return MockEndpoints(handler), calls


def answer(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    return httpx.Response(
        200,
        json={
            "choices": [
                {
                    "message": {
                        "content": json.dumps({"sexo": "femenino", "edad": 30}),
                        "reasoning": "ella",
                    },
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 7, "completion_tokens": body["seed"] % 50 + 1},
        },
    )


def remote_runner(
    tmp_path, transport, extra_model='sampling_fallback = "neutral"', retries=3, mode="tags"
):
    from muestra.experiments.remote import RemoteRunner
    from muestra.experiments.runner import Runner

    spec = write_spec(
        tmp_path,
        "fake",
        f'[model]\nid = "m"\nendpoint = ["http://a.test/v1", "http://b.test/v1"]\n'
        f"retries = {retries}\n{extra_model}",
        samples=2,
        mode=mode,
    )
    loaded = load_spec(spec)
    runner = Runner(loaded, tmp_path / "fake.db")
    runner.open()
    rows, notes = [], []
    remote = RemoteRunner(
        loaded, loaded.spec.model, 21, runner.row, rows.extend, notes.append, transport=transport
    )
    return remote, runner.plan(), rows, notes


def test_retries_on_429_and_5xx_spread_over_endpoints(tmp_path):
    tries: dict[int, int] = {}

    def flaky(request, attempt):  # every sample: a 429, then a 503, then the answer
        seed = json.loads(request.content)["seed"]
        tries[seed] = tries.get(seed, 0) + 1
        if tries[seed] == 1:
            return httpx.Response(429, headers={"retry-after": "0"}, json={"error": "slow down"})
        if tries[seed] == 2:
            return httpx.Response(503, text="overloaded")
        return answer(request)

    transport, calls = fake_server(flaky)
    remote, units, rows, notes = remote_runner(tmp_path, transport)
    remote.run(units)
    assert len(rows) == 4 and all(r["error"] is None for r in rows)
    assert set(tries.values()) == {3}
    assert {r["reasoning"] for r in rows} == {"ella"}  # vLLM's newer `reasoning` field
    assert {r["field_probs_json"] for r in rows} == {None}
    hosts = {c.url.host for c in calls if c.url.path.endswith("/chat/completions")}
    assert hosts == {"a.test", "b.test"}
    assert "not muestra serve" in notes[0]
    sent = json.loads(next(c for c in calls if c.method == "POST").content)
    assert sent["thinking_token_budget"] in (6, 3) and sent["response_format"]["type"] == (
        "json_schema"
    )
    assert sent["n"] == 1 and sent["seed"] in {r["seed"] for r in rows}
    # sampling_fallback = "neutral": top_k off goes out as -1, which every server reads as off
    assert {k: sent[k] for k in SAMPLING} == {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": -1,
        "min_p": 0.0,
    }


def test_a_refusal_stops_the_run_and_lost_endpoints_give_up(tmp_path):
    from muestra.experiments.remote import RemoteError

    transport, _ = fake_server(
        lambda request, attempt: httpx.Response(400, json={"error": {"message": "bad schema"}})
    )
    remote, units, rows, _ = (
        remote_runner(tmp_path / "a", transport) if ((tmp_path / "a").mkdir() or True) else None
    )
    with pytest.raises(RemoteError, match="400: bad schema"):
        remote.run(units)
    assert rows == []

    def unreachable(request, attempt):
        raise httpx.ConnectError("connection refused", request=request)

    transport, calls = fake_server(unreachable)
    (tmp_path / "b").mkdir()
    remote, units, _, _ = remote_runner(tmp_path / "b", transport, retries=1)
    with pytest.raises(RemoteError, match="gave up after 1 retries.*ConnectError"):
        remote.run(units)


def test_remote_spec_errors(tmp_path, monkeypatch):
    from muestra.experiments.sampling import resolve_think

    spec = write_spec(
        tmp_path, "bad", '[model]\nid = "m"\nendpoint = "http://h/v1"', extra='regex = "a+"'
    )
    with pytest.raises(InputError, match="answer.schema|one of schema"):
        load_spec(spec)
    spec = write_spec(tmp_path, "bad2", '[model]\nid = "m"\nendpoint = "h:80/v1"')
    with pytest.raises(InputError, match="must start with http"):
        load_spec(spec)
    from muestra.experiments.remote import Endpoints

    monkeypatch.delenv("NOPE", raising=False)
    spec = write_spec(
        tmp_path, "bad3", '[model]\nid = "m"\nendpoint = "http://h/v1"\napi_key_env = "NOPE"'
    )
    with pytest.raises(InputError, match="NOPE"):
        Endpoints.from_spec(load_spec(spec).spec.model)
    spec = write_spec(tmp_path, "bad4", '[model]\nid = "m"\nsampling_fallback = "server"')
    with pytest.raises(InputError, match="endpoint models only"):
        load_spec(spec)
    spec = write_spec(
        tmp_path, "bad5", '[model]\nid = "m"\nendpoint = "http://h/v1"\nsampling_fallback = "servr"'
    )
    with pytest.raises(InputError, match="sampling_fallback"):
        load_spec(spec)
    spec = write_spec(
        tmp_path,
        "bad6",
        f'[model]\nid = "m"\nendpoint = "http://h/v1"\ngeneration_config = "{tmp_path / "nope"}"',
    )
    with pytest.raises(InputError, match="generation_config .*nope"):
        resolve_think(load_spec(spec), load_spec(spec).spec.model)


def test_local_only_flags_on_an_endpoint_run_are_refused_by_name(cli, tmp_path):
    """--threads, --runtime, --batch-invariant, --trust-remote-code and --batch change how
    this machine computes: on a spec whose every model is an endpoint they are refused
    (exit 2, before any request or store), not dropped."""
    spec = write_spec(tmp_path, "far", '[model]\nid = "m"\nendpoint = "http://127.0.0.1:9/v1"')
    store = tmp_path / "far.db"
    for flags in (["--threads", "2"], ["--batch", "8"], ["--trust-remote-code", "--runtime",
                                                          "torch"]):  # fmt: skip
        result = cli("run", str(spec), "--out", str(store), *flags)
        assert result.code == 2, result.stderr
        assert all(f in result.stderr for f in flags if f.startswith("--")), result.stderr
        assert "every model of" in result.stderr and not store.exists()
    for field in ('dtype = "float32"', 'device = "cpu"', "trust_remote_code = true"):
        table = f'[model]\nid = "m"\nendpoint = "http://127.0.0.1:9/v1"\n{field}'
        with pytest.raises(InputError, match=f"{field.split()[0]} apply to local models"):
            load_spec(write_spec(tmp_path, "far2", table))


def posted(calls):
    return [json.loads(c.content) for c in calls if c.method == "POST"]


def test_unset_think_fields_come_from_the_generation_config(tmp_path):
    folder = tmp_path / "modelo"
    folder.mkdir()
    config = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}
    (folder / "generation_config.json").write_text(json.dumps(config))
    transport, calls = fake_server(lambda request, attempt: answer(request))
    remote, units, rows, _ = remote_runner(tmp_path, transport, f'generation_config = "{folder}"')
    remote.run(units)
    bodies = posted(calls)
    assert len(bodies) == len(rows) == 4
    expected = {"temperature": 1.0, "top_p": 0.95, "top_k": 20, "min_p": 0.0}  # T: the spec's
    assert all({k: body[k] for k in SAMPLING} == expected for body in bodies)
    assert stored_think(tmp_path / "fake.db")["remote"]["m"] == {
        **expected,
        "typical_p": 1.0,  # the config sets none: off, as HF reads it
        "source": {
            "temperature": "spec",
            "top_p": "generation_config",
            "top_k": "generation_config",
            "min_p": "generation_config",
            "typical_p": "generation_config",
        },
        "generation_config": str(folder / "generation_config.json"),
        "sampling_fallback": None,
        "mode": "tags",
        "mode_source": "spec",
    }


def test_nothing_resolvable_stops_before_any_request(cli, tmp_path):
    from muestra.experiments.remote import RemoteRunner

    spec = write_spec(tmp_path, "none", '[model]\nid = "m"\nendpoint = "http://a.test/v1"')
    transport, calls = fake_server(lambda request, attempt: answer(request))
    with pytest.raises(InputError) as raised:
        RemoteRunner(
            load_spec(spec), load_spec(spec).spec.model, 21, dict, list, transport=transport
        )
    message = str(raised.value)
    assert "think top_p, top_k, min_p" in message and "'m'" in message
    assert "[think]" in message and 'sampling_fallback = "neutral"' in message
    assert calls == []
    # as a user types it: exit 2, nothing stored, not even the store file
    store = tmp_path / "none.db"
    result = cli("run", str(spec), "--out", str(store))
    assert result.code == 2 and "top_p, top_k, min_p" in result.stderr
    assert "Traceback" not in result.stderr and not store.exists()


def test_server_defaults_opt_in_leaves_fields_out_and_is_recorded(tmp_path):
    transport, calls = fake_server(lambda request, attempt: answer(request))
    remote, units, rows, _ = remote_runner(tmp_path, transport, 'sampling_fallback = "server"')
    provenance = []
    remote.on_provenance = provenance.append
    remote.run(units)
    assert len(rows) == 4
    for body in posted(calls):
        assert body["temperature"] == 1.0 and not {"top_p", "top_k", "min_p"} & set(body)
    recorded = stored_think(tmp_path / "fake.db")["remote"]["m"]
    assert recorded["sampling_fallback"] == "server"
    assert recorded["source"]["top_k"] == "server" and recorded["top_k"] is None
    assert provenance[0]["sampling_fallback"] == "server"


def hub_cache(root, repo_id, config):
    """A Hugging Face cache holding only `repo_id`'s generation_config.json."""
    folder = root / f"models--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    (folder / "snapshots" / "abc123").mkdir(parents=True)
    (folder / "snapshots" / "abc123" / "generation_config.json").write_text(json.dumps(config))


def test_hub_cache_config_and_a_changed_resolution_on_resume(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from muestra.experiments.runner import Runner
    from muestra.experiments.sampling import resolve_think

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = load_spec(
        write_spec(
            tmp_path,
            "hub",
            '[model]\nid = "org/m"\nendpoint = "http://a.test/v1"\nsampling_fallback = "neutral"',
        )
    )
    store = tmp_path / "hub.db"
    Runner(spec, store).open()
    assert stored_think(store)["remote"]["org/m"]["source"]["top_p"] == "neutral"
    # the model reaches the cache: the same spec now resolves otherwise, and resuming
    # would mix two distributions
    hub_cache(tmp_path / "hub", "org/m", {"top_p": 0.8})
    (think,) = resolve_think(spec, spec.spec.model).values()
    assert (think.top_p.value, think.top_p.source, think.top_k.value) == (
        0.8,
        "generation_config",
        0,
    )
    with pytest.raises(InputError, match="now resolves.*--force-new"):
        Runner(spec, store).open()
    assert Runner(spec, store, force_new=True).open() == 2


def test_the_pool_spreads_by_free_slots_and_rests_a_failing_endpoint():
    import asyncio

    from muestra.experiments.remote import EndpointPool

    async def scenario() -> None:
        pool = EndpointPool(["a", "b"], 2)
        assert {await pool.acquire(), await pool.acquire()} == {"a", "b"}  # spread
        await pool.release("b", failed=True)  # b rests: everything goes to a
        assert pool.healthy() == ["a"]
        assert await pool.acquire() == "a"
        blocked = asyncio.ensure_future(pool.acquire())  # a is full, b rests
        await asyncio.sleep(0.05)
        assert not blocked.done()
        await pool.release("a", failed=False)
        assert await asyncio.wait_for(blocked, 1) == "a"
        pool.rest("a")  # every endpoint resting: still served, never a deadlock
        await pool.release("a", failed=False)
        assert await asyncio.wait_for(pool.acquire(avoid="a"), 1) in ("a", "b")

    asyncio.run(scenario())


def test_a_dead_endpoint_is_left_and_rows_record_the_live_one(tmp_path):
    def half_dead(request, attempt):
        if request.url.host == "b.test":
            raise httpx.ConnectError("connection refused", request=request)
        return answer(request)

    transport, calls = fake_server(half_dead)
    remote, units, rows, notes = remote_runner(tmp_path, transport)
    remote.run(units)
    assert len(rows) == 4 and all(r["error"] is None for r in rows)
    assert {r["endpoint"] for r in rows} == {"http://a.test/v1"}
    tried_b = [c for c in calls if c.url.host == "b.test" and c.method == "POST"]
    assert len(tried_b) <= 2  # then it rests, and the run moves to a.test


@pytest.mark.long
def test_plain_text_reasoning_through_muestra_serve_equals_a_local_run(smol_kit, tmp_path):
    """SmolLM2 has no think tags: a spec with a think budget reasons in plain text. The
    same spec through `muestra serve` (muestra.think_mode "text", settled by the local
    tokenizer beside the generation config) stores the rows of a local run."""
    import muestra

    body = (Path(__file__).parents[1] / "examples/characters.toml").read_text()
    body = body.replace("samples = 30", "samples = 3").replace("budget = 96", "budget = 24")
    assert "budget = 24" in body and "samples = 3" in body
    local = tmp_path / "local.toml"
    local.write_text(body.replace('id = "~/.cache/muestra/kit/smollm2-135m-instruct"',
                                  f'id = "{smol_kit}"'))  # fmt: skip
    (tmp_path / "character.schema.json").write_text(
        (Path(__file__).parents[1] / "examples/character.schema.json").read_text()
    )
    muestra.run(local, tmp_path / "local.db")
    process, base = start_server(smol_kit, "--served-model-name", "smol")
    try:
        remote = tmp_path / "remote.toml"
        remote.write_text(body.replace(
            'id = "~/.cache/muestra/kit/smollm2-135m-instruct"',
            f'id = "smol"\nendpoint = "{base}/v1"\ngeneration_config = "{smol_kit}"',
        ))  # fmt: skip
        muestra.run(remote, tmp_path / "remote.db")
    finally:
        stop_server(process)
    local_rows, remote_rows = rows_of(tmp_path / "local.db"), rows_of(tmp_path / "remote.db")
    assert len(local_rows) == 6 and remote_rows == local_rows
    assert all(r[4] for r in remote_rows)  # every row reasoned, in plain text
    sent = stored_think(tmp_path / "remote.db")["remote"]["smol"]
    assert (sent["mode"], sent["mode_source"]) == ("text", "tokenizer")


def test_plain_text_reasoning_on_another_server_is_refused_by_name(smol_kit, tmp_path):
    from muestra.experiments.remote import RemoteError

    transport, calls = fake_server(lambda request, attempt: answer(request))
    remote, units, rows, _ = remote_runner(
        tmp_path, transport, f'generation_config = "{smol_kit}"', mode=None
    )
    with pytest.raises(RemoteError, match="plain text.*vllm.*muestra serve"):
        remote.run(units)
    assert rows == [] and not [c for c in calls if c.method == "POST"]
