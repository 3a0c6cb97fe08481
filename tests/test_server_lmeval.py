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


def test_a_request_without_model_is_for_the_served_model(http):
    """As llama-server and vLLM serving one model: no `model` means the served one (chat
    and completions); a wrong name is still a 404."""
    chat = {"messages": [{"role": "user", "content": "Hola"}], "max_tokens": 2}
    text = {"prompt": "El cielo es", "max_tokens": 2, "temperature": 0}
    for route, body in (("/v1/chat/completions", chat), ("/v1/completions", text)):
        response = http.post(route, json=body)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "t"
        wrong = http.post(route, json={**body, "model": "otro"})
        assert wrong.status_code == 404 and wrong.json()["error"]["param"] == "model"


# ---- lm-eval's `gguf` model type ------------------------------------------------------------
# lm_eval/models/gguf.py (0.4.13), used as is when lm_eval is installed, else these copies:
# it posts text prompts to /v1/completions with no `model` (llama-server's habit), finds
# the continuation by `text_offset` and reads `top_logprobs` as dicts of token → logprob.


def _gguf_get_result(logprobs, context_length):
    is_greedy = True
    offsets = logprobs["text_offset"]
    tokens = logprobs["tokens"]
    tokens_logprobs = logprobs["token_logprobs"]
    idx = 0
    while offsets[idx] < context_length:
        idx += 1
    continuation_logprobs = sum(tokens_logprobs[idx:-1])
    for i in range(idx, len(tokens)):
        token = tokens[i]
        top_tokens = logprobs["top_logprobs"][i]
        top_token = max(top_tokens.keys(), key=lambda x: top_tokens[x])
        if top_token != token:
            is_greedy = False
            break
    return continuation_logprobs, is_greedy


class _GGUFCopy:
    """GGUFLM's requests and parsing, without lm_eval's registry."""

    def __init__(self, base_url):
        self.base_url = base_url

    def _completion(self, context, continuation=None, stop=None):
        import requests

        request = {"prompt": context, "logprobs": 10, "temperature": 0.0}
        if continuation:
            request.update({"prompt": context + continuation, "max_tokens": 1, "echo": True})
        if stop is not None:
            request["stop"] = stop
        response = requests.post(f"{self.base_url}/v1/completions", json=request)
        response.raise_for_status()
        return response.json()

    def loglikelihood(self, requests):
        out = []
        for context, continuation in [r.args for r in requests]:
            choice = self._completion(context, continuation)["choices"][0]
            out.append(_gguf_get_result(choice["logprobs"], len(context)))
        return out

    def generate_until(self, requests):
        out = []
        for context, options in [r.args for r in requests]:
            choice = self._completion(context, stop=options.get("until", ["</s>"]))["choices"][0]
            out.append(choice["text"].strip())
        return out


class _Request:
    def __init__(self, *args):
        self.args = args


@pytest.mark.slow
def test_lm_eval_gguf_client_against_muestra_serve(smol_kit, smol):
    """`lm_eval --model gguf --model_args base_url=…` against `muestra serve`: its
    requests carry no `model` (served as the one model), its log-likelihoods equal a
    forward pass of the model (text prompts, the continuation found by `text_offset`), and
    its greedy generation (no max_tokens: the server's limit) answers."""
    from test_server import start_server, stop_server

    try:
        from lm_eval.models.gguf import GGUFLM as client_class
    except ImportError:
        client_class = _GGUFCopy
    pairs = [
        ("Question: What is the capital of France?\nAnswer:", " Paris"),
        ("Question: What is the capital of France?\nAnswer:", " a big old town"),
        ("El cielo es", " azul"),
    ]
    process, base = start_server(smol_kit, "--served-model-name", "smol",
                                 "--max-tokens-limit", "8")  # fmt: skip
    try:
        client = client_class(base_url=base)
        got = client.loglikelihood([_Request(c, x) for c, x in pairs])
        texts = client.generate_until([_Request("Question: 2+2?\nAnswer:", {"until": ["\n"]})])
    finally:
        stop_server(process)
    for (context, continuation), (value, greedy) in zip(pairs, got, strict=True):
        encoded = smol.tokenizer(context + continuation, return_offsets_mapping=True,
                                 add_special_tokens=False)  # fmt: skip
        ids, spans = encoded["input_ids"], encoded["offset_mapping"]
        start = next(i for i, (begin, _) in enumerate(spans) if begin >= len(context))
        expected, _ = _reference(smol.model, ids[:start], ids[start:])
        assert value == pytest.approx(expected, abs=2e-4), (context, continuation)
        assert isinstance(greedy, bool)
    assert len(texts) == 1 and isinstance(texts[0], str)
