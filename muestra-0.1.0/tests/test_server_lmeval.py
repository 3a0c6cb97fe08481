"""`muestra serve` as lm-evaluation-harness meets it: the request bodies its
`local-completions` and `local-chat-completions` models send (copied from
lm_eval/models/openai_completions.py, 0.4.x) and the fields it parses back."""

from __future__ import annotations

import pytest
import torch
from tests.test_server_hardening import served_app


@pytest.fixture(scope="module")
def http(smol_kit):
    with served_app(smol_kit) as client:
        yield client


def _parse_logprobs(out: dict, ctxlens: list[int]) -> list[tuple[float, bool]]:
    """lm-eval's `LocalCompletionsAPI.parse_logprobs`, as it reads a response."""
    res = []
    for choice, ctxlen in zip(
        sorted(out["choices"], key=lambda c: c["index"]), ctxlens, strict=False
    ):
        tokens_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        is_greedy = all(
            tok == max(top.values())
            for tok, top in zip(tokens_logprobs, top_logprobs, strict=False)
        )
        res.append((sum(tokens_logprobs), is_greedy))
    return res


def _reference(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0], -1)
    picked = [logprobs[len(ctx) - 1 + j, t] for j, t in enumerate(cont)]
    greedy = all(logprobs[len(ctx) - 1 + j].argmax() == t for j, t in enumerate(cont))
    return float(sum(picked)), bool(greedy)


@pytest.mark.slow
def test_loglikelihood_requests_as_lm_eval_sends_them(http, smol):
    encode = lambda t: smol.tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    pairs = [
        ("Question: What is the capital of France?\nAnswer:", " Paris"),
        ("Question: What is the capital of France?\nAnswer:", " a big old town"),
        ("El cielo es", " azul"),
    ]
    prompts, ctxlens = [], []
    for context, continuation in pairs:
        ctx = encode(context)
        prompts.append(ctx + encode(context + continuation)[len(ctx) :])
        ctxlens.append(len(ctx))
    body = {
        "model": "t",
        "prompt": prompts,
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    out = response.json()
    got = _parse_logprobs(out, ctxlens)
    for (value, greedy), ids, ctxlen in zip(got, prompts, ctxlens, strict=True):
        expected, expected_greedy = _reference(smol.model, ids[:ctxlen], ids[ctxlen:])
        assert value == pytest.approx(expected, abs=2e-4) and greedy == expected_greedy
    choice = out["choices"][0]
    assert len(choice["logprobs"]["tokens"]) == len(prompts[0]) + 1  # the prompt, one token
    assert choice["logprobs"]["token_logprobs"][0] is None
    assert out["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)
    # prompts as text, and max_tokens 0: the prompt alone
    text = http.post(
        "/v1/completions",
        json={**body, "prompt": "El cielo es azul", "max_tokens": 0, "logprobs": 2},
    )
    assert text.status_code == 200, text.text
    only = text.json()["choices"][0]
    assert only["text"] == "El cielo es azul" and only["finish_reason"] == "length"
    assert all(t is None or len(t) <= 2 for t in only["logprobs"]["top_logprobs"])


def test_echo_refusals_and_the_remote_tokenizer(http, smol):
    base = {"model": "t", "prompt": "Hola", "echo": True, "max_tokens": 1}
    for extra, param in (
        ({"stream": True}, "echo"),
        ({"n": 2}, "n"),
        ({"max_tokens": 5}, "max_tokens"),
        ({"temperature": 0.7}, "max_tokens"),
    ):
        response = http.post("/v1/completions", json={**base, **extra})
        assert response.status_code == 400 and response.json()["error"]["param"] == param
    zero = http.post("/v1/completions", json={"model": "t", "prompt": "Hola", "max_tokens": 0})
    assert zero.status_code == 400 and "echo" in zero.text
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == smol.tokenizer.eos_token and "im_start" in info["chat_template"]
    tokens = http.post(
        "/tokenize", json={"prompt": "El cielo es azul", "add_special_tokens": False}
    ).json()["tokens"]
    assert tokens == smol.tokenizer("El cielo es azul", add_special_tokens=False)["input_ids"]
    back = http.post("/detokenize", json={"tokens": tokens}).json()
    assert back == {"prompt": "El cielo es azul"}
    assert http.post("/detokenize", json={"tokens": [10**9]}).status_code == 400


def test_generation_requests_as_lm_eval_sends_them(http):
    chat = {
        "messages": [{"role": "user", "content": "¿Cuál es la capital de Francia?"}],
        "model": "t",
        "max_tokens": 8,
        "temperature": 0,
        "stop": ["\n\n"],
        "seed": 1234,
    }
    response = http.post("/v1/chat/completions", json=chat)
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["choices"][0]["message"]["content"], str)
    text = {
        "prompt": ["Question: 2+2?\nAnswer:"],
        "model": "t",
        "max_tokens": 4,
        "temperature": 0,
        "stop": ["\n"],
        "seed": 1234,
    }
    response = http.post("/v1/completions", json=text)
    assert response.status_code == 200 and isinstance(response.json()["choices"][0]["text"], str)
