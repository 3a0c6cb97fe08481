"""Chat templates sent by clients: refused unless the server trusts them, bounded when it
does, and prompts prepared off the event loop so `/health` keeps answering."""

from __future__ import annotations

import threading
import time

import pytest

from test_server import MESSAGES, in_process

TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[respuesta] "
BODY = {"model": "t", "messages": MESSAGES, "max_tokens": 3, "seed": 1}


def trusted(kit, **limits):
    from fastapi.testclient import TestClient

    from muestra.models.loading import load_model
    from muestra.server.app import create_app
    from muestra.server.service import ServedModel
    from muestra.server.templates import TemplateLimits

    served = ServedModel(
        load_model(str(kit), dtype="float32"),
        "t",
        trust_request_chat_template=True,
        template_limits=TemplateLimits(**limits),
    )
    return TestClient(create_app(served))


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"chat_template": TEMPLATE}, "chat_template"),
        (
            {"chat_template_kwargs": {"chat_template": TEMPLATE}},
            "chat_template_kwargs.chat_template",
        ),
    ],
)
def test_a_request_chat_template_is_refused_by_default(tiny_kit, extra, param):
    with in_process(tiny_kit, "t") as http:
        reply = http.post("/v1/chat/completions", json={**BODY, **extra})
        plain = http.post("/v1/chat/completions", json=BODY)
    error = reply.json()["error"]
    assert reply.status_code == 400
    assert error["param"] == param and error["code"] == "chat_template_not_allowed"
    assert "--trust-request-chat-template" in error["message"]
    assert plain.status_code == 200


@pytest.mark.parametrize("where", ["top", "kwargs"])
def test_a_trusted_request_chat_template_is_used(tiny_kit, where):
    extra = (
        {"chat_template": TEMPLATE}
        if where == "top"
        else {"chat_template_kwargs": {"chat_template": TEMPLATE}}
    )
    with trusted(tiny_kit) as http:
        served = http.app.state.served
        expected = served.text.encode_text(f"[user] {MESSAGES[0]['content']}\n[respuesta] ")
        own = http.post("/v1/chat/completions", json={**BODY, **extra}).json()
        model = http.post("/v1/chat/completions", json=BODY).json()
    assert own["usage"]["prompt_tokens"] == len(expected)
    assert model["usage"]["prompt_tokens"] != len(expected)


def test_a_runaway_request_template_stops_at_the_time_limit(tiny_kit):
    loops = "{% for i in range(25000) %}{% for j in range(25000) %}{% endfor %}{% endfor %}"
    with trusted(tiny_kit, seconds=0.5) as http:
        start = time.monotonic()
        reply = http.post("/v1/chat/completions", json={**BODY, "chat_template": loops})
        took = time.monotonic() - start
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["code"] == "chat_template_timeout"
    assert "0.5 s" in reply.json()["error"]["message"]
    assert took < 10  # unbounded, the loops run for tens of seconds


def test_a_huge_rendered_prompt_is_refused(tiny_kit):
    with trusted(tiny_kit, max_chars=10_000) as http:
        reply = http.post(
            "/v1/chat/completions", json={**BODY, "chat_template": "{{ 'hola ' * 4000000 }}"}
        )
    assert reply.status_code == 413
    error = reply.json()["error"]
    assert error["code"] == "prompt_too_long" and "10000" in error["message"]


@pytest.mark.long
def test_health_answers_while_a_big_prompt_is_prepared(tiny_kit):
    """A 5 MB message takes seconds to tokenize; on the event loop it froze /health."""
    big = {**BODY, "messages": [{"role": "user", "content": "hola mundo " * 500_000}]}
    with in_process(tiny_kit, "t") as http:
        done = threading.Event()
        replies = []

        def send_big() -> None:
            replies.append(http.post("/v1/chat/completions", json=big))
            done.set()

        sender = threading.Thread(target=send_big)
        sender.start()
        answered = 0
        while not done.is_set():
            if http.get("/health").status_code == 200 and not done.is_set():
                answered += 1
            time.sleep(0.02)
        sender.join(60)
    assert replies and replies[0].status_code == 413  # far above the tiny model's context
    assert answered >= 3, f"/health answered {answered} times while the prompt was prepared"
