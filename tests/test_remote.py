"""The remote backend: an experiment run against `muestra serve` on loopback, killed and
resumed, stores the same rows as a local run; retries and refusals with a fake server."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest

from muestra.errors import InputError
from muestra.experiments.spec import load_spec
from test_server import start_server, stop_server

KEY = "sk-remote-test"
SCHEMA = {
    "type": "object",
    "properties": {
        "sexo": {"enum": ["masculino", "femenino"]},
        "edad": {"type": "integer", "minimum": 18, "maximum": 99},
    },
    "required": ["sexo", "edad"],
}


def write_spec(folder, name, model_table, samples=6, extra=""):
    (folder / "p.schema.json").write_text(json.dumps(SCHEMA))
    spec = folder / f"{name}.toml"
    spec.write_text(f"""
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

[answer]
max_tokens = 40
schema = "p.schema.json"
field_probs = false
{extra}""")
    return spec


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


def test_remote_run_killed_and_resumed_equals_a_local_run(tiny_kit, tmp_path):
    import muestra

    local_dir, remote_dir = tmp_path / "local", tmp_path / "remote"
    local_dir.mkdir()
    remote_dir.mkdir()
    local = write_spec(local_dir, "local", f'[model]\nid = "{tiny_kit}"\ndtype = "float32"')
    muestra.run(local, local_dir / "local.db")

    process, base = start_server(tiny_kit, "--served-model-name", "tiny", "--api-key", KEY)
    try:
        remote = write_spec(
            remote_dir,
            "remote",
            f'[model]\nid = "tiny"\nendpoint = "{base}/v1"\napi_key_env = "REMOTE_KEY"\n'
            "concurrency = 2",
        )
        env = {**os.environ, "REMOTE_KEY": KEY}
        store = remote_dir / "remote.db"
        command = [sys.executable, "-m", "muestra", "run", str(remote), "--out", str(store)]
        first = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while count(store) < 3 and time.time() < deadline and first.poll() is None:
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()
        stored = count(store)
        assert 0 < stored < 12, "the kill should land mid-run"
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stderr
        assert f"{stored} stored, {12 - stored} to run" in second.stderr
    finally:
        stop_server(process)
    remote_rows, local_rows = rows_of(store), rows_of(local_dir / "local.db")
    assert len(remote_rows) == 12 and len({(r[0], r[1]) for r in remote_rows}) == 12
    assert remote_rows == local_rows
    assert any(r[6] for r in remote_rows) and any(r[10] for r in remote_rows)
    with sqlite3.connect(store) as db:
        provenance = json.loads(db.execute("SELECT provenance_json FROM models").fetchone()[0])
    assert provenance["served_by"] == ["muestra"] and provenance["endpoints"] == [f"{base}/v1"]


def fake_server(script):
    """An httpx transport answering from `script(request, attempt)`."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "m", "owned_by": "vllm"}]})
        return script(request, len(calls))

    return httpx.MockTransport(handler), calls


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


def remote_runner(tmp_path, transport, extra_model="", retries=3):
    from muestra.experiments.remote import RemoteRunner
    from muestra.experiments.runner import Runner

    spec = write_spec(
        tmp_path,
        "fake",
        f'[model]\nid = "m"\nendpoint = ["http://a.test/v1", "http://b.test/v1"]\n'
        f"retries = {retries}\n{extra_model}",
        samples=2,
    )
    loaded = load_spec(spec)
    runner = Runner(loaded, tmp_path / "fake.db")
    runner.open()
    rows, notes = [], []
    remote = RemoteRunner(
        loaded, loaded.spec.model, 21, runner._row, rows.extend, notes.append, transport=transport
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
