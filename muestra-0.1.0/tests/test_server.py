"""`muestra serve` as clients meet it: the official `openai` SDK against a real server
process on loopback (tiny kit model, random weights)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import jsonschema
import openai
import pytest

KEY = "sk-muestra-test"
MODEL = "tiny"
SCHEMA = {
    "type": "object",
    "properties": {
        "sexo": {"enum": ["masculino", "femenino"]},
        "clase": {"enum": ["guerrero", "mago", "soporte"]},
        "edad": {"type": "integer", "minimum": 18, "maximum": 99},
    },
    "required": ["sexo", "clase", "edad"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Crea un personaje de rol."}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    # the server's log goes to a file: a pipe nobody reads would block a server that logs
    # much (many tracebacks) and hang the test
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (open as long as the server)
    process = subprocess.Popen(
        [sys.executable, "-m", "muestra", "serve", str(model_dir), "--port", str(port),
         "--dtype", "float32", *extra],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise AssertionError(f"the server exited: {log.read()}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return process, base
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("the server did not start in 120 s")


def stop_server(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


@pytest.fixture(scope="module")
def server(tiny_kit):
    process, base = start_server(
        tiny_kit,
        "--api-key", KEY,
        "--served-model-name", MODEL,
        "--max-tokens-limit", "600",
        "--max-body-bytes", "65536",
        "--max-batch", "32",
    )  # fmt: skip
    yield base
    stop_server(process)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(api_key=KEY, base_url=f"{server}/v1", max_retries=0, timeout=120)


def health(server) -> dict:
    return httpx.get(f"{server}/health", timeout=5).json()


def test_plain_chat_keeps_reasoning_apart(client):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=60,
        seed=3,
        extra_body={"thinking_token_budget": 8},
    )
    choice = reply.choices[0]
    message = choice.model_dump()["message"]
    assert reply.object == "chat.completion" and reply.model == MODEL
    assert isinstance(message["reasoning_content"], str) and message["reasoning_content"]
    assert "<think>" not in message["content"] and "</think>" not in message["content"]
    assert "</think>" not in message["reasoning_content"]
    usage = reply.usage
    assert usage.completion_tokens_details.reasoning_tokens == 8  # the budget was hit
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.completion_tokens <= 60 and choice.finish_reason in ("stop", "length")
    ids = choice.model_dump()["muestra"]["token_ids"]  # every generated token, in order
    assert len(ids) == usage.completion_tokens and all(isinstance(i, int) for i in ids)


def test_streaming_with_usage_equals_the_whole_answer(client):
    kwargs = dict(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=50,
        seed=11,
        temperature=1.0,
        extra_body={"thinking_token_budget": 6},
    )
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    reasoning = "".join(
        (c.choices[0].delta.model_dump().get("reasoning_content") or "")
        for c in chunks
        if c.choices
    )
    content = "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)
    message = whole.choices[0].model_dump()["message"]
    assert content == message["content"] and reasoning == message["reasoning_content"]
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == [whole.choices[0].finish_reason]
    last = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert last.choices[0].model_dump()["muestra"] == whole.choices[0].model_dump()["muestra"]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_a_streamed_json_answer_equals_the_whole_one(client):
    """Jump-forward feeds a row several tokens in one step (the last, the closing brace
    and the EOS): the stream labels each token by its own phase, so it carries the
    same JSON as the whole answer."""
    kwargs = dict(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=120,
        seed=4,
        n=3,
        response_format={"type": "json_schema", "json_schema": {"name": "P", "schema": SCHEMA}},
        extra_body={"thinking_token_budget": 4},
    )
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        content = "".join(c.delta.content or "" for c in mine)
        reasoning = "".join(c.delta.model_dump().get("reasoning_content") or "" for c in mine)
        assert content == choice.message.content, (content, choice.message.content)
        assert reasoning == choice.model_dump()["message"]["reasoning_content"]
        jsonschema.validate(json.loads(content), SCHEMA)


def test_streamed_logprobs_equal_the_whole_ones_in_both_apis(client):
    """Each token's logprobs come with its text, none past a stop string: the chunks of
    /v1/completions and /v1/chat/completions carry, joined, the whole reply's logprobs."""
    whole = client.completions.create(
        model=MODEL, prompt="Hola", max_tokens=30, seed=5, n=2, logprobs=2, stop=["e"]
    )
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="Hola", max_tokens=30, seed=5, n=2, logprobs=2, stop=["e"],
            stream=True,
        )
    )  # fmt: skip
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        joined = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for c in mine:
            if c.logprobs is not None:
                for key in joined:
                    joined[key] += getattr(c.logprobs, key)
        assert choice.logprobs.tokens, "a reply with no token"
        assert joined == choice.logprobs.model_dump(), choice.index
    chat = dict(model=MODEL, messages=MESSAGES, max_tokens=30, seed=5, logprobs=True,
                top_logprobs=2, stop=["e"], extra_body={"thinking_token_budget": 4})  # fmt: skip
    reply = client.chat.completions.create(**chat)
    streamed = [
        entry.model_dump()
        for c in client.chat.completions.create(**chat, stream=True)
        if c.choices and c.choices[0].logprobs is not None
        for entry in c.choices[0].logprobs.content
    ]
    assert streamed == [entry.model_dump() for entry in reply.choices[0].logprobs.content]


def test_n_samples_and_seeds(client):
    def ask(seed, n=1):
        return client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=24,
            seed=seed,
            n=n,
            temperature=1.0,
            extra_body={"thinking_token_budget": 4},
        )

    several = ask(5, n=4)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    texts = [c.model_dump()["message"]["reasoning_content"] for c in several.choices]
    assert len(set(texts)) > 1  # four different samples
    again = ask(5, n=4)
    assert [c.model_dump()["message"] for c in again.choices] == [
        c.model_dump()["message"] for c in several.choices
    ]  # same seed → same answers
    # sample i of a request is sample i of the same seed whatever n is
    assert ask(5).choices[0].model_dump()["message"] == several.choices[0].model_dump()["message"]
    assert ask(6).choices[0].model_dump()["message"] != several.choices[0].model_dump()["message"]


def test_json_schema_answers_validate(client):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=120,
        seed=2,
        n=4,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "Personaje", "schema": SCHEMA, "strict": True},
        },
        extra_body={"thinking_token_budget": 5},
    )
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        assert choice.model_dump()["message"]["reasoning_content"]
    loose = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=80,
        seed=2,
        response_format={"type": "json_object"},
        extra_body={"thinking_token_budget": 0, "top_k": 5},
    )
    assert loose.choices[0].model_dump()["message"]["reasoning_content"] == ""
    if loose.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(loose.choices[0].message.content), dict)
    else:  # random weights may ramble inside the object until max_tokens
        assert loose.choices[0].message.content.startswith("{")


def test_logprobs_with_top_alternatives(client):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=40,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"thinking_token_budget": 2},
    )
    content = reply.choices[0].logprobs.content
    assert content, "no content tokens"
    text = reply.choices[0].message.content
    assert "".join(t.token for t in content).startswith(text[:5])
    for token in content:
        tops = token.top_logprobs
        assert len(tops) == 3 and token.logprob <= 0
        assert [t.logprob for t in tops] == sorted((t.logprob for t in tops), reverse=True)
        assert token.token == tops[0].token  # greedy picks the most likely token
        assert token.logprob == pytest.approx(tops[0].logprob)
        assert bytes(token.bytes).decode("utf-8", "replace") == token.token
    streamed = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=40,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        stream=True,
        extra_body={"thinking_token_budget": 2},
    )
    pieces = [
        t
        for c in streamed
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content
    ]
    assert [(t.token, t.logprob) for t in pieces] == [(t.token, t.logprob) for t in content]


def test_text_completions_with_stop_and_logprobs(client, server):
    reply = client.completions.create(
        model=MODEL, prompt=["Hola", "Adiós"], max_tokens=12, n=2, seed=4, logprobs=2
    )
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    first = reply.choices[0]
    assert len(first.logprobs.tokens) == len(first.logprobs.token_logprobs) <= 12
    assert all(len(top) <= 2 for top in first.logprobs.top_logprobs)
    # a stop string taken from the text itself: the answer ends right before it
    full = (
        client.completions.create(
            model=MODEL,
            prompt="Hola",
            max_tokens=30,
            seed=9,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
    )
    stop = full[8:11]
    assert len(stop) == 3
    cut = client.completions.create(
        model=MODEL, prompt="Hola", max_tokens=30, seed=9, temperature=0, stop=[stop],
        extra_body={"ignore_eos": True},
    ).choices[0]  # fmt: skip
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)]
    streamed = client.completions.create(
        model=MODEL, prompt="Hola", max_tokens=30, seed=9, temperature=0, stop=[stop],
        stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.text


def test_error_statuses_in_openai_shape(client, server):
    def error_of(call):
        with pytest.raises(openai.APIStatusError) as caught:
            call()
        return caught.value

    anonymous = openai.OpenAI(api_key="wrong", base_url=f"{server}/v1", max_retries=0)
    err = error_of(lambda: anonymous.models.list())
    assert err.status_code == 401 and err.body["code"] == "invalid_api_key"
    plain = httpx.get(f"{server}/v1/models")
    assert plain.status_code == 401 and set(plain.json()["error"]) == {
        "message", "type", "param", "code"
    }  # fmt: skip
    assert client.models.list().data[0].id == MODEL
    assert health(server)["status"] == "ok"  # no key needed

    err = error_of(lambda: client.chat.completions.create(model="gpt-9", messages=MESSAGES))
    assert err.status_code == 404 and err.body["param"] == "model"
    err = error_of(
        lambda: client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=7)
    )
    assert err.status_code == 400 and err.body["param"] == "temperature"
    assert "temperature" in err.body["message"] and "7" in err.body["message"]
    err = error_of(
        lambda: client.chat.completions.create(
            model=MODEL, messages=MESSAGES, tools=[{"type": "function", "function": {"name": "f"}}]
        )
    )
    assert err.status_code == 400 and err.body["param"] == "tools"
    err = error_of(
        lambda: client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
            },
        )
    )
    assert err.status_code == 400 and "uniqueItems" in err.body["message"]
    err = error_of(
        lambda: client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=601)
    )
    assert err.status_code == 413 and err.body["code"] == "max_tokens_exceeded"
    err = error_of(
        lambda: client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x" * 70_000}]
        )
    )
    assert err.status_code == 413 and err.body["code"] == "body_too_large"
    err = error_of(
        lambda: client.chat.completions.create(
            model=MODEL, messages=MESSAGES, logit_bias={"99999999": 5}
        )
    )
    assert err.status_code == 400 and err.body["param"] == "logit_bias"
    headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    broken = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", headers=headers)
    assert broken.status_code == 400 and "JSON" in broken.json()["error"]["message"]
    missing = httpx.post(f"{server}/v1/chat/completions", json={"model": MODEL}, headers=headers)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
    nowhere = httpx.get(f"{server}/v1/nothing", headers=headers)
    assert nowhere.status_code == 404 and "error" in nowhere.json()


def test_32_concurrent_clients_share_batches(client, server):
    def one(i):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Personaje número {i}"}],
            max_tokens=40,
            seed=i,
            extra_body={"thinking_token_budget": 10},
        )
        return reply.choices[0].finish_reason, reply.usage.completion_tokens

    before = health(server)["steps"]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert len(results) == 32 and all(r[0] in ("stop", "length") and r[1] > 0 for r in results)
    state = health(server)
    assert state["max_rows_in_a_step"] > 8  # requests really decoded together
    assert state["steps"] - before < sum(r[1] for r in results) / 4
    assert state["rows_running"] == 0 and state["rows_waiting"] == 0


def test_a_client_that_leaves_frees_its_rows(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 600,
        "n": 4,
        "stream": True,
        "extra": 1,
        "ignore_eos": True,
        "thinking_token_budget": 500,
    }
    with httpx.stream(
        "POST", f"{server}/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as response:
        lines = response.iter_lines()
        for _ in range(12):
            next(lines)
        assert health(server)["rows_running"] == 4
    deadline = time.time() + 10
    while health(server)["rows_running"] and time.time() < deadline:
        time.sleep(0.05)
    assert health(server)["rows_running"] == 0  # freed long before 600 tokens
    # the same for a request that does not stream
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server}/v1/chat/completions",
            json={**body, "stream": False},
            headers=headers,
            timeout=1.5,
        )
    deadline = time.time() + 10
    while health(server)["rows_running"] and time.time() < deadline:
        time.sleep(0.05)
    assert health(server)["rows_running"] == 0


def in_process(kit, name):
    from fastapi.testclient import TestClient

    from muestra.models.loading import load_model
    from muestra.server.app import create_app
    from muestra.server.service import ServedModel

    served = ServedModel(load_model(str(kit), dtype="float32"), name)
    return TestClient(create_app(served))


def test_chat_template_kwargs_turn_thinking_off(hybrid_kit):
    body = {"model": "h", "messages": MESSAGES, "max_tokens": 40, "seed": 1}
    with in_process(hybrid_kit, "h") as http:
        on = http.post("/v1/chat/completions", json={**body, "thinking_token_budget": 4}).json()
        off = http.post(
            "/v1/chat/completions",
            json={**body, "chat_template_kwargs": {"enable_thinking": False}},
        ).json()
    assert on["choices"][0]["message"]["reasoning_content"]
    assert on["usage"]["completion_tokens_details"]["reasoning_tokens"] == 4
    assert off["choices"][0]["message"]["reasoning_content"] == ""
    assert off["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0


def test_a_base_model_serves_text_completions_only(gpt2_kit):
    with in_process(gpt2_kit, "g") as http:
        text = http.post("/v1/completions", json={"model": "g", "prompt": "Hola", "max_tokens": 5})
        chat = http.post("/v1/chat/completions", json={"model": "g", "messages": MESSAGES})
    assert text.status_code == 200 and text.json()["usage"]["completion_tokens"] <= 5
    assert "reasoning_content" not in text.json()["choices"][0]
    assert chat.status_code == 400 and "/v1/completions" in chat.json()["error"]["message"]


def test_reasoning_content_goes_back_into_the_prompt(tiny_kit):
    from muestra.models.loading import load_model
    from muestra.server.protocol import ChatRequest
    from muestra.server.service import ServedModel

    served = ServedModel(load_model(str(tiny_kit), dtype="float32"), "t")
    try:
        for name in ("reasoning_content", "reasoning"):  # vLLM's old and new names
            turn = [
                {"role": "user", "content": "Hola"},
                {"role": "assistant", "content": "¡Hola!", name: "el usuario saluda"},
            ]
            ids = served.chat_prompt(ChatRequest(model="t", messages=turn))
            text = served.tokenizer.decode(ids)
            assert "<think>\nel usuario saluda\n</think>" in text and "¡Hola!" in text
    finally:
        served.close()


def test_the_real_model_answers_the_openai_sdk(smol_kit):
    """SmolLM2-135M-Instruct behind `muestra serve`, asked through the official SDK: a real
    greedy answer, and a schema answer with its exact value in the JSON."""
    process, base = start_server(smol_kit, "--served-model-name", "smol", "--api-key", KEY)
    try:
        client = openai.OpenAI(api_key=KEY, base_url=f"{base}/v1", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="smol",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0,
            seed=1,
        )
        assert "Paris" in reply.choices[0].message.content
        assert reply.choices[0].finish_reason in ("stop", "length")
        schema = {
            "type": "object",
            "properties": {"capital": {"enum": ["Paris", "Lyon", "Marseille"]}},
            "required": ["capital"],
        }
        structured = client.chat.completions.create(
            model="smol",
            messages=[{"role": "user", "content": "The capital of France, as JSON."}],
            max_tokens=30,
            temperature=0,
            seed=1,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "capital", "schema": schema, "strict": True},
            },
        )
        assert json.loads(structured.choices[0].message.content) == {"capital": "Paris"}
    finally:
        stop_server(process)
