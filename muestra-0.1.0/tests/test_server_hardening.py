"""`muestra serve` against a hostile client: bad parameters are refused at the edge with
a 4xx in OpenAI's shape, and a request that still breaks a decoding step fails alone,
leaving the requests that share its batch exactly as they would have been."""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import json
import os
import threading
import time

import pytest

from muestra.engine import Engine, GenerationRequest, SamplingParams
from muestra.engine.engine import NoHook
from muestra.engine.scheduler import Scheduler, Update
from muestra.errors import InputError
from test_server import in_process

KEY = "sk-hardening"
MESSAGES = [{"role": "user", "content": "Hola"}]
CHAT = {"model": "t", "messages": MESSAGES, "max_tokens": 1, "seed": 1}
TEXT = {"model": "t", "prompt": "Hola", "max_tokens": 1, "seed": 1}


def served_app(kit, **options):
    from fastapi.testclient import TestClient

    from muestra.models.loading import load_model
    from muestra.server.app import create_app
    from muestra.server.service import ServedModel

    app_options = {k: options.pop(k) for k in ("api_key",) if k in options}
    served = ServedModel(load_model(str(kit), dtype="float32"), "t", **options)
    return TestClient(create_app(served, **app_options))


@pytest.fixture(scope="module")
def http(tiny_kit):
    with served_app(tiny_kit, max_rows_per_request=8) as client:
        yield client


def assert_openai_error(response, status: int | None = None) -> dict:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    if status is not None:
        assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# ---- 1. shared fate ---------------------------------------------------------------------


def test_a_poisoned_request_leaves_its_neighbours_byte_identical(tiny_kit):
    good = [
        {"model": "tiny", "prompt": f"Había una vez {i}", "max_tokens": 24, "seed": 10 + i,
         "temperature": 1.0, "top_k": 40, "ignore_eos": True}
        for i in range(4)
    ]  # fmt: skip
    poisoned = {**good[0], "prompt": "veneno", "top_k": 200000, "seed": 99}
    with in_process(tiny_kit, "tiny") as http:

        def run(bodies):
            with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
                return list(pool.map(lambda b: http.post("/v1/completions", json=b), bodies))

        clean = run(good)
        mixed = run([*good[:2], poisoned, *good[2:]])
        shared = http.get("/health").json()["max_rows_in_a_step"]
    assert all(r.status_code == 200 for r in clean)
    assert [r.status_code for r in mixed] == [200] * 5, [r.text[:200] for r in mixed]
    texts = [r.json()["choices"][0]["text"] for r in clean]
    assert [r.json()["choices"][0]["text"] for r in mixed[:2] + mixed[3:]] == texts
    assert shared == 5  # the poisoned request did share a step with the good ones


def test_huge_integers_are_refused_by_name(http):
    for field in ("top_k", "max_tokens", "n", "seed"):
        error = assert_openai_error(http.post("/v1/completions", json={**TEXT, field: 2**64}), 400)
        assert error["param"] == field


@pytest.mark.parametrize(
    "bias", [{"99999999": 1}, {"-1": 1}, {"1" * 5001: 1}, {"1": 101}, {"²": 1}]
)
def test_logit_bias_ids_in_range_and_values_bounded(http, bias):
    error = assert_openai_error(http.post("/v1/completions", json={**TEXT, "logit_bias": bias}))
    assert error["param"] == "logit_bias"


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN", "1e999"])
def test_non_finite_numbers_are_refused(http, value):
    for field in ("repetition_penalty", "temperature", "logit_bias"):
        given = value if field != "logit_bias" else f'{{"1": {value}}}'
        body = json.dumps(TEXT)[:-1] + f', "{field}": {given}}}'
        response = http.post(
            "/v1/completions", content=body, headers={"content-type": "application/json"}
        )
        assert assert_openai_error(response, 400)["param"].startswith(field)


# ---- 1b. defence in depth: the scheduler pins a fault on its own submission ------------


@pytest.fixture(scope="module")
def engine(tiny_kit):
    from muestra.models.loading import load_model

    return Engine.from_loaded(load_model(str(tiny_kit), dtype="float32"), max_batch=64)


class Collect:
    def __init__(self, expected: int) -> None:
        self.samples, self.error, self.expected = [], None, expected
        self.done = threading.Event()

    def __call__(self, update: Update) -> None:
        self.samples += update.finished
        self.error = self.error or update.error
        if self.error or len(self.samples) == self.expected:
            self.done.set()


class RaisingHook:
    def before_step(self, rows) -> None:
        pass

    def mask_logits(self, logits, rows) -> None:
        raise RuntimeError("a broken grammar")

    def after_token(self, row, token_id, forced) -> None:
        pass


class BadParamsHook(NoHook):
    """Switches its rows to parameters the sampler cannot build, mid-run."""

    def before_step(self, rows) -> None:
        for row in rows:
            if len(row.tokens) == 3:
                row.params = SamplingParams(logit_bias={10**7: 1.0})


def wait_until(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def run_scheduler(engine, poison):
    good = [
        GenerationRequest([1, 2, 3 + i], n=2, params=SamplingParams(top_k=20),
                          max_new_tokens=24, seed=5 + i, ignore_eos=True)
        for i in range(4)
    ]  # fmt: skip
    scheduler = Scheduler(engine, max_batch=64)
    try:
        collectors = [Collect(2) for _ in good]
        with scheduler._lock:  # everything is admitted in one batch
            for request, collect in zip(good[:2], collectors[:2], strict=True):
                scheduler.submit([request], collect)
            bad = Collect(1)
            if poison is not None:
                request, hook = poison
                scheduler.submit([request], bad, hook)
            for request, collect in zip(good[2:], collectors[2:], strict=True):
                scheduler.submit([request], collect)
        for collect in collectors:
            assert collect.done.wait(60)
        if poison is not None:
            assert bad.done.wait(60) and bad.error is not None
        assert all(c.error is None for c in collectors), [c.error for c in collectors]
        assert wait_until(lambda: scheduler.open_rows == 0), scheduler.open_rows
        return [[s.token_ids for s in c.samples] for c in collectors]
    finally:
        scheduler.close()


@pytest.mark.parametrize("fault", ["hook raises", "params break the step", "prefill fails"])
def test_a_fault_ends_only_its_own_submission(engine, fault):
    request = GenerationRequest([4, 5, 6], max_new_tokens=24, seed=1, ignore_eos=True)
    poison = {
        "hook raises": (request, RaisingHook()),
        "params break the step": (request, BadParamsHook()),
        "prefill fails": (
            GenerationRequest([4, 5], params=SamplingParams(logit_bias={10**7: 1.0})),
            None,
        ),
    }[fault]
    assert run_scheduler(engine, poison) == run_scheduler(engine, None)


# ---- 2. 500s where a 4xx is promised ---------------------------------------------------


def test_a_non_ascii_bearer_token_is_a_401(tiny_kit):
    with served_app(tiny_kit, api_key=KEY) as http:
        for token in ("clé-ñ", "\u00ff" * 40, KEY + "é"):
            response = http.get(
                "/v1/models", headers={"authorization": f"Bearer {token}".encode("latin-1")}
            )
            assert assert_openai_error(response, 401)["code"] == "invalid_api_key"
        response = http.get("/v1/models", headers={"authorization": "Bearer " + KEY})
        assert response.status_code == 200
        assert http.get("/openapi.json").status_code == 404  # the schema stays behind the key
        assert (
            http.get("/openapi.json", headers={"authorization": "Bearer " + KEY}).status_code == 404
        )


@pytest.mark.parametrize("key", ["clé", "a b", "", "tab\tkey"])
def test_a_key_no_header_can_carry_is_refused_at_start(tiny_kit, key):
    from muestra.server.app import create_app

    with pytest.raises(InputError, match="--api-key"):
        create_app(object(), api_key=key)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "route,body,param",
    [
        ("/v1/chat/completions", {**CHAT, "stream": "yes"}, "stream"),
        ("/v1/chat/completions", {**CHAT, "temperature": True}, "temperature"),
        ("/v1/chat/completions", {**CHAT, "n": True}, "n"),
        ("/v1/chat/completions", {**CHAT, "logprobs": 1}, "logprobs"),
        ("/v1/completions", {**TEXT, "prompt": []}, "prompt"),
        ("/v1/completions", {**TEXT, "logit_bias": {"1" * 5001: 1}}, "logit_bias"),
    ],
)
def test_coercions_and_empty_prompts_are_refused(http, route, body, param):
    assert assert_openai_error(http.post(route, json=body), 400)["param"] == param


def test_a_lone_surrogate_anywhere_is_a_400(http):
    cases = [
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "a\ud800"}]}),
        ("/v1/chat/completions", {**CHAT, "stop": ["\udfff"]}),
        ("/v1/chat/completions", {**CHAT, "model": "\ud800"}),
        ("/v1/completions", {**TEXT, "prompt": ["ok", "\ud800"]}),
        ("/v1/completions", {**TEXT, "user": {"\ud800": 1}}),
    ]
    for route, body in cases:
        raw = json.dumps(body)  # ASCII escapes: "\\ud800" reaches the server as JSON
        response = http.post(route, content=raw, headers={"content-type": "application/json"})
        assert "surrogate" in assert_openai_error(response, 400)["message"]


def test_the_context_error_of_a_text_completion_names_prompt(http):
    context = http.get("/v1/models").json()["data"][0]["max_model_len"]
    response = http.post("/v1/completions", json={**TEXT, "prompt": [1] * context})
    assert assert_openai_error(response, 413)["param"] == "prompt"


def test_top_k_above_the_vocabulary_keeps_all_of_it(http):
    whole = {**TEXT, "max_tokens": 6, "temperature": 1.0}
    clamped = http.post("/v1/completions", json={**whole, "top_k": 200000}).json()
    off = http.post("/v1/completions", json={**whole, "top_k": 0}).json()
    assert clamped["choices"][0]["text"] == off["choices"][0]["text"]


# ---- 3. limits ----------------------------------------------------------------------------


def test_rows_per_request_are_limited(http):
    response = http.post("/v1/completions", json={**TEXT, "prompt": ["a"] * 4000, "n": 128})
    error = assert_openai_error(response, 413)
    assert error["code"] == "too_many_rows" and "--max-rows-per-request" in error["message"]
    response = http.post("/v1/chat/completions", json={**CHAT, "n": 9})
    assert assert_openai_error(response, 413)["param"] == "n"
    ok = http.post("/v1/completions", json={**TEXT, "prompt": ["a", "b"], "n": 4})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 8


def test_grammars_above_the_size_limit_are_a_413(tiny_kit):
    props = {f"field_{i}": {"type": "integer"} for i in range(2000)}  # ~77 KB, as reported
    schema = {"type": "object", "properties": props, "required": list(props)}
    body = {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"schema": schema}}}
    with served_app(tiny_kit, max_grammar_bytes=64 * 1024) as client:
        error = assert_openai_error(client.post("/v1/chat/completions", json=body), 413)
        assert error["code"] == "grammar_too_large" and "--max-grammar-bytes" in error["message"]
        assert error["param"] == "response_format"
        small = {**body, "response_format": {"type": "json_object"}}
        assert client.post("/v1/chat/completions", json=small).status_code == 200
        assert client.get("/health").json()["grammar_cache_bytes"] > 0


def test_a_full_queue_is_a_503_and_frees_as_rows_finish(tiny_kit):
    import asyncio

    from muestra.models.loading import load_model
    from muestra.server.protocol import ApiError, CompletionRequest
    from muestra.server.service import ServedModel

    served = ServedModel(
        load_model(str(tiny_kit), dtype="float32"), "t", max_rows_per_request=8, max_queued_rows=8
    )
    long = {**TEXT, "max_tokens": 400, "ignore_eos": True}

    async def scenario():
        first = await served.completion_job(CompletionRequest(**{**long, "n": 6}))
        assert served.scheduler.open_rows == 6
        with pytest.raises(ApiError) as refused:
            await served.completion_job(CompletionRequest(**{**long, "n": 3}))
        assert refused.value.status == 503 and refused.value.code == "server_busy"
        assert "--max-queued-rows" in refused.value.message
        second = await served.completion_job(CompletionRequest(**{**long, "n": 2}))  # fits
        first.cancel()
        second.cancel()
        assert wait_until(lambda: served.scheduler.open_rows == 0)
        again = await served.completion_job(CompletionRequest(**{**TEXT, "n": 8}))
        async for _ in again.records():
            pass

    try:
        asyncio.run(scenario())
        assert wait_until(lambda: served.scheduler.open_rows == 0)
    finally:
        served.close()
    with pytest.raises(InputError, match="--max-queued-rows"):
        ServedModel(served.loaded, "t", max_rows_per_request=8, max_queued_rows=4)


class SlowBackend:
    """A grammar backend whose cold compiles hang until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.compiled: set[str] = set()

    def cached(self, spec) -> bool:
        return spec.key in self.compiled

    def compile(self, spec):
        if spec.key not in self.compiled:
            self.release.wait(30)
            self.compiled.add(spec.key)
        return f"compiled {spec.key[:6]}"


def test_a_slow_grammar_times_out_without_blocking_the_loop_or_cached_grammars():
    import asyncio

    from muestra.answers.grammar import GrammarSpec
    from muestra.server.grammars import GrammarGate
    from muestra.server.protocol import ApiError

    backend = SlowBackend()
    gate = GrammarGate(lambda: backend, timeout=0.3)
    known, slow = GrammarSpec.choice(["a", "b"]), GrammarSpec.choice(["c", "d"])
    backend.compiled.add(known.key)

    async def ticker(ticks: list[float]) -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    async def scenario():
        ticks: list[float] = []
        beat = asyncio.create_task(ticker(ticks))
        with pytest.raises(ApiError) as late:
            await gate.compile(slow, "response_format")
        # the worker is still stuck on the slow grammar: a cached one does not wait for it
        started = time.monotonic()
        assert (await gate.compile(known, "response_format"))[1].startswith("compiled")
        assert time.monotonic() - started < 0.2
        beat.cancel()
        return late.value, ticks

    try:
        error, ticks = asyncio.run(scenario())
    finally:
        backend.release.set()
        gate.close()
    assert error.status == 400 and error.code == "grammar_timeout"
    assert "--grammar-timeout" in error.message
    assert len(ticks) >= 10 and max(b - a for a, b in itertools.pairwise(ticks)) < 0.2


# ---- 4. fuzz ------------------------------------------------------------------------------

NOT_NUMBERS = ["1", True, False, [], {}, [1], "\ud800", "NaN"]
HUGE = [2**64, -(2**64), 2**31, 10**400]
NOT_INTS = [*NOT_NUMBERS, 1.5, *HUGE, -5]
NOT_FLAGS = ["yes", "true", 1, 0, 1.0, [], {}, "\ud800"]
FIELDS = {
    "temperature": [*NOT_NUMBERS, -0.1, 2.5, *HUGE],
    "top_p": [*NOT_NUMBERS, 0, -1, 1.5, *HUGE],
    "top_k": [*NOT_INTS, -2],
    "min_p": [*NOT_NUMBERS, -0.1, 1, *HUGE],
    "repetition_penalty": [*NOT_NUMBERS, 0, -1, *HUGE],
    "presence_penalty": [*NOT_NUMBERS, 3, -3],
    "frequency_penalty": [*NOT_NUMBERS, 2.01, *HUGE],
    "max_tokens": [*NOT_INTS, 0, 10**6],
    "n": [*NOT_INTS, 0, 129, 1.0],
    "seed": [*NOT_NUMBERS, 1.5, -5, 2**63, 2**64, 10**400],  # 2**31 is a fine seed
    "stream": NOT_FLAGS,
    "ignore_eos": NOT_FLAGS,
    "stop": [1, [1], [""], "", ["a"] * 17, {}, True, ["\ud800"]],
    "logit_bias": [
        [], "x", 1, {"a": 1}, {"1.5": 1}, {"-1": 1}, {"99999999": 1}, {"1" * 5001: 1},
        {"1": 1000}, {"1": "x"}, {"1": True}, {"1": None}, {"٣": 1}, {"\ud800": 1},
    ],
    "stream_options": ["x", 1, [], {"include_usage": "yes"}],
    "model": [1, None, [], {}, True, "", "otro", "\ud800"],
    **{name: [1, "x", [], {}] for name in ("tools", "audio", "best_of", "echo", "suffix")},
}  # fmt: skip
CHAT_FIELDS = {
    "messages": [
        [], "hola", None, 1, {}, [{}], [1], [[]], [{"role": "x", "content": "a"}],
        [{"role": "user", "content": 1}], [{"role": "user", "content": [{"type": "image"}]}],
        [{"role": "user", "content": [{"type": "text"}]}], [{"role": "user", "content": "\ud800"}],
        [{"role": "user", "content": "a", "name": "\udc00"}], [{"content": "a"}],
    ],
    "max_completion_tokens": [*NOT_INTS, 0],
    "logprobs": NOT_FLAGS,
    "top_logprobs": [*NOT_INTS, 21],
    "response_format": [
        "json", 1, {}, {"type": "xml"}, {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"schema": 1}},
        {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}},
    ],
    "thinking_token_budget": [*NOT_INTS, -1],
    "chat_template_kwargs": [1, "x", [], {"\ud800": 1}],
    "muestra": [1, "x", {"extra": 1}, {"think": "no"}, {"answer": {"top_k": -1}},
                {"answer": {"max_tokens": 0}}, {"answer": {"temperature": True}}],
}  # fmt: skip
TEXT_FIELDS = {
    "prompt": [
        [], "", None, 1, True, {}, [[]], [-1], [2**64], [1.5], [[1], "a"], [""], [None],
        ["\ud800"], [[1, -1]], ["a"] * 300,
    ],
    "logprobs": [*NOT_INTS, 21],
}  # fmt: skip


def _required_integers(count: int) -> dict:
    props = {f"p{i}": {"type": "integer"} for i in range(count)}
    return {"type": "object", "properties": props, "required": list(props)}


# grammars that cost the most as reported (1,000 required properties took 4 GB when the
# compiled grammar was serialized to a disk cache), or are refused by size or depth
HEAVY_FORMATS = [
    {"type": "json_schema", "json_schema": {"schema": schema}}
    for schema in (
        _required_integers(1000),
        _required_integers(2000),
        {"anyOf": [{"type": "object", "properties": {f"k{i}": {"type": "string"}},
                    "required": [f"k{i}"]} for i in range(500)]},
        {"type": "string", "maxLength": 10**9},
        {"type": "array", "items": {"type": "string", "maxLength": 1000}, "minItems": 10**7},
        {"type": "string", "pattern": "[a-z]{0,10000000}"},
        functools.reduce(lambda inner, _: {"type": "array", "items": inner}, range(900), {}),
    )
]  # fmt: skip
WHOLE_BODIES = [[], "x", 1, None, {}, {"model": "t"}, {"messages": MESSAGES}, {"prompt": "a"}]
RAW_BODIES = ["{", "", "[" * 100000, '{"model": "t",}', "\xff\xfe", '{"a": NaN']


def fuzz_cases() -> list[tuple[str, str]]:
    """(route, raw JSON body): every field of each route given each hostile value."""
    cases = []
    for route, base, own in (
        ("/v1/chat/completions", CHAT, CHAT_FIELDS),
        ("/v1/completions", TEXT, TEXT_FIELDS),
    ):
        for field, values in itertools.chain(FIELDS.items(), own.items()):
            for value in values:
                cases.append((route, json.dumps({**base, field: value})))
        for field in ("model", "messages" if route.endswith("chat/completions") else "prompt"):
            cases.append((route, json.dumps({k: v for k, v in base.items() if k != field})))
        cases += [(route, json.dumps(body)) for body in WHOLE_BODIES]
        cases += [(route, body) for body in RAW_BODIES]
    # heavy grammars that are valid requests: answered (200) or refused (4xx), within memory
    heavy = [("/v1/chat/completions", json.dumps({**CHAT, "response_format": f}))
             for f in HEAVY_FORMATS]  # fmt: skip
    return cases, heavy


MEMORY_BOUND_MB = 64  # measured growth: ~15 MB (see the note of issue #12)


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_fuzz_every_hostile_body_is_a_4xx_in_openai_shape(http):
    cases, heavy = fuzz_cases()
    assert len(cases) >= 300
    failures = []
    # the grammar backend is built once (~135 MB for a 151k vocabulary): not counted
    warm = {**CHAT, "response_format": {"type": "json_object"}}
    assert http.post("/v1/chat/completions", json=warm).status_code == 200
    before = rss_mb()
    statuses = []
    for route, body in heavy:
        response = http.post(
            route, content=body.encode(), headers={"content-type": "application/json"}
        )
        statuses.append(response.status_code)
        if response.status_code != 200:
            assert_openai_error(response)
    assert statuses == [200, 413, 200, 200, 200, 200, 400], statuses
    for route, body in cases:
        response = http.post(
            route, content=body.encode("utf-8", "surrogatepass"),
            headers={"content-type": "application/json"},
        )  # fmt: skip
        try:
            assert_openai_error(response)
        except (AssertionError, ValueError, KeyError) as err:
            failures.append((route, body[-90:], response.status_code, str(err)[:80]))
    assert not failures, failures[:10]
    health = http.get("/health")
    assert health.status_code == 200 and health.json()["rows_running"] == 0
    grown = rss_mb() - before
    print(f"fuzz: {len(cases)} hostile + {len(heavy)} heavy bodies, RSS grew {grown:.0f} MB")
    assert grown < MEMORY_BOUND_MB


def test_valid_but_odd_unicode_never_breaks_the_server(http):
    for text in ("\x00", "\uffff", "‮abc", "🧪" * 50, "e\u0301" * 30, "\U0010ffff"):
        response = http.post("/v1/completions", json={**TEXT, "prompt": text, "stop": [text]})
        assert response.status_code == 200, response.text[:300]
        chat = {**CHAT, "messages": [{"role": "user", "content": text}]}
        assert http.post("/v1/chat/completions", json=chat).status_code == 200


@pytest.mark.long
def test_a_beam_search_whose_client_leaves_stops_and_frees_the_next(tiny_kit):
    """A long beam search (thousands of steps) whose client disconnects stops at its next
    step: `/health` counts it cancelled and the search slot is free long before the search
    would have ended, and the next search is answered."""
    import httpx

    from test_server import start_server, stop_server

    process, base = start_server(tiny_kit, "--served-model-name", "t")
    try:
        long = {"model": "t", "prompt": "Hola", "max_tokens": 3000, "n": 4,
                "use_beam_search": True, "ignore_eos": True}  # fmt: skip
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{base}/v1/completions", json=long, timeout=1.5)
        left = time.perf_counter()
        deadline = left + 60
        health = httpx.get(f"{base}/health").json()
        while (health["searches_cancelled"] < 1 or health["search_running"]) and (
            time.perf_counter() < deadline
        ):
            time.sleep(0.05)
            health = httpx.get(f"{base}/health").json()
        freed = time.perf_counter() - left
        assert health["searches_cancelled"] == 1 and not health["search_running"], health
        short = {**long, "max_tokens": 4, "ignore_eos": False}
        answered = httpx.post(f"{base}/v1/completions", json=short, timeout=60)
        assert answered.status_code == 200 and len(answered.json()["choices"]) == 4
        print(f"beam search cancelled: the slot was free {freed:.2f} s after the client left")
    finally:
        stop_server(process)
