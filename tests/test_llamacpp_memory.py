"""The llama.cpp runtime's KV cache under overlapping requests (issue 47-F), on the real
SmolLM2 GGUF: a row keeps its whole budget (prompt + max_new_tokens) booked until it
ends, rows that would not fit beside the running ones wait, and the cache never grows
past its budget (`max_cells`), whatever a request without `max_tokens` asks for."""

from __future__ import annotations

import threading

import pytest

from helpers import chat_ids
from muestra.engine import Engine, GenerationRequest, SamplingParams
from muestra.engine.batch import MAX_DRAFT
from muestra.errors import ContextLengthError, InputError
from muestra.models.runtime import llamacpp_runtime

pytest.importorskip("llama_cpp", reason="the llama.cpp runtime needs llama-cpp-python")


@pytest.fixture
def small(smol_kit, monkeypatch):
    """SmolLM2 on llama.cpp whose cache starts at 256 cells (a fresh runtime per test;
    one thread, so that a busy machine does not stall it)."""
    from muestra.models.loading import load_model

    monkeypatch.setattr(llamacpp_runtime, "FIRST_CELLS", 256)
    return load_model(str(smol_kit), runtime="llamacpp", threads=1)


def _run_overlapping(engine: Engine, requests: list[GenerationRequest], head_start: int):
    """Submit the first request, the others once it has `head_start` tokens; every
    submission's finished samples and error."""
    from muestra.engine.scheduler import Scheduler

    scheduler = Scheduler(engine)
    results: dict[int, dict] = {i: {"samples": [], "error": None} for i in range(len(requests))}
    started, done = threading.Event(), threading.Event()

    def deliver(index: int):
        def receive(update) -> None:
            mine = results[index]
            mine["samples"] += update.finished
            mine["error"] = mine["error"] or update.error
            mine["tokens"] = mine.get("tokens", 0) + len(update.tokens)
            if index == 0 and (mine["tokens"] >= head_start or update.error):
                started.set()
            over = [r["error"] or len(r["samples"]) == q.n for r, q in
                    zip(results.values(), requests, strict=True)]  # fmt: skip
            if all(over):
                done.set()

        return receive

    try:
        scheduler.submit([requests[0]], deliver(0))
        assert started.wait(60), "the first request never started"
        for index, request in enumerate(requests[1:], 1):
            scheduler.submit([request], deliver(index))
        assert done.wait(180), "the requests never finished"
    finally:
        scheduler.close()
    return results, scheduler


@pytest.mark.parametrize(("cells", "budgets"), [(256, (150, 150)), (512, (400, 300))])
def test_overlapping_rows_wait_instead_of_overfilling_the_cache(small, monkeypatch, cells, budgets):
    """Two rows, the second arriving when the first has 10 tokens: together they need
    more than the cache holds, so the second waits for the first. Before the fix it was
    admitted against the cells already decoded: with (150, 150) in 256 cells its prefill
    was then refused (a request failed that only had to wait); with (400, 300) in 512
    cells both rows decoded until the cache was full and both requests failed."""
    monkeypatch.setattr(llamacpp_runtime, "FIRST_CELLS", cells)
    engine = Engine.from_loaded(small)
    prompt = chat_ids(small, "Tell me a story.")
    requests = [
        GenerationRequest(prompt, n=1, params=SamplingParams(temperature=1.0),
                          max_new_tokens=budget, seed=seed, ignore_eos=True)
        for seed, budget in zip((1, 2), budgets, strict=True)
    ]  # fmt: skip
    results, scheduler = _run_overlapping(engine, requests, head_start=10)
    errors = [r["error"] for r in results.values() if r["error"] is not None]
    assert not errors, errors
    assert [len(r["samples"][0].token_ids) for r in results.values()] == list(budgets)
    assert engine.runtime.cells == cells  # one row at a time fit; the cache did not grow
    assert scheduler.stats["max_rows"] == 1  # the second row waited
    assert engine.runtime.booked == 0  # every booking was given back
    alone = engine.generate([requests[1]])[0][0]
    assert results[1]["samples"][0].token_ids == alone.token_ids


def test_rows_that_fit_together_still_share_a_step(small):
    """The booking does not serialize what fits: two 40-token rows run side by side."""
    engine = Engine.from_loaded(small)
    prompt = chat_ids(small, "Tell me a story.")
    requests = [
        GenerationRequest(prompt, n=1, params=SamplingParams(temperature=1.0),
                          max_new_tokens=40, seed=seed, ignore_eos=True)
        for seed in (1, 2)
    ]  # fmt: skip
    results, scheduler = _run_overlapping(engine, requests, head_start=3)
    assert all(r["error"] is None for r in results.values())
    assert scheduler.stats["max_rows"] == 2


def test_a_row_larger_than_the_budget_is_refused_at_submit_with_the_numbers(small):
    engine = Engine.from_loaded(small)
    runtime = engine.runtime
    runtime.max_cells = 512
    prompt = chat_ids(small, "Hi")
    request = GenerationRequest(prompt, n=1, max_new_tokens=600)
    with pytest.raises(ContextLengthError, match=r"512 cells.*lower max_new_tokens"):
        engine.validate(0, request)


def test_a_request_without_max_tokens_stays_within_the_cache_budget(small):
    """n=8 without max_tokens: each row books the model's remaining context (8,192 −
    prompt cells), so a 32,768-cell budget admits four at a time and the rest wait;
    the cache never grows past the budget (before the fix it grew to 65,536 cells; with
    n=64, 2^19 cells, ~12 GB)."""
    from fastapi.testclient import TestClient

    from muestra.server.app import create_app
    from muestra.server.service import ServedModel

    runtime = small.runtime
    runtime.max_cells = 32768
    served = ServedModel(small, "smol")
    with TestClient(create_app(served)) as http:
        body = {"messages": [{"role": "user", "content": "Name a colour."}], "n": 8,
                "temperature": 0.7, "seed": 3, "stop": ["."]}  # fmt: skip
        reply = http.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        choices = reply.json()["choices"]
        health = http.get("/health").json()
    assert len(choices) == 8
    assert runtime.cells <= 32768
    prompt = len(chat_ids(small, "Name a colour."))
    row = 8192 - prompt + MAX_DRAFT  # the remaining context, and the drafts' room
    at_once = max(k for k in range(1, 9) if prompt + k * row + llamacpp_runtime.SLACK <= 32768)
    assert at_once == 4 and served.scheduler.stats["max_rows"] == at_once
    assert health["kv_cells"] == runtime.cells and health["kv_cells_budget"] == 32768


# ---- `muestra serve --max-memory`: the cache's budget from a memory budget -------------------

SMOL_BYTES_PER_CELL = 30 * 3 * (64 + 64) * 2  # layers × KV heads × (key + value) × f16


@pytest.fixture
def smol_gguf(smol_kit):
    (gguf,) = smol_kit.glob("*.gguf")
    return gguf


@pytest.fixture
def no_load(monkeypatch):
    """`muestra serve` may not load the model: a refusal must come first."""
    from muestra.models import loading

    def load_model(*args, **kwargs):
        raise AssertionError("the model loaded before the refusal")

    monkeypatch.setattr(loading, "load_model", load_model)


def test_serve_max_memory_sets_the_cells_left_after_the_weights(cli, smol_gguf, monkeypatch):
    """350 MB less the GGUF's weights and llama.cpp's buffers, in 23,040-byte cells,
    rounded down to llama.cpp's 256-cell contexts: the runtime's budget, shown at start
    and by /health, and what a request's rows are held to."""
    import uvicorn
    from fastapi.testclient import TestClient

    from muestra.models.gguf_header import read_gguf_header
    from muestra.models.memory import gguf_weights_bytes, llama_buffers_from_gguf

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: apps.append(app))
    result = cli("serve", str(smol_gguf), "--threads", "1", "--port", "0",
                 "--max-memory", "350MB")  # fmt: skip
    assert result.code == 0, result.stderr
    header = read_gguf_header(smol_gguf)
    weights = gguf_weights_bytes(header)
    assert 80 * 2**20 < weights < 100 * 2**20  # the Q4_1 GGUF's tensors, ~92 MiB
    buffers = llama_buffers_from_gguf(header).bytes(0, 63, 256, True)  # exact: any context
    assert 95 * 2**20 < buffers < 100 * 2**20  # 2 × 256 rows of logits, 49,152 floats each
    cells = (350 * 10**6 - weights - buffers) // SMOL_BYTES_PER_CELL // 256 * 256
    assert 4096 < cells < 8192  # below the model's context: a request can ask for more
    assert (
        f"muestra serve: --max-memory 350MB (334 MiB): KV cache budget of {cells:,} cells at "
        "23,040 bytes a cell"
    ) in result.stderr and "and llama.cpp's buffers (97.4 MiB)" in result.stderr
    (app,) = apps
    with TestClient(app) as http:
        health = http.get("/health").json()
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": cells}
        refused = http.post("/v1/chat/completions", json=body)
    assert health["kv_cells_budget"] == cells
    assert refused.status_code == 400 and f"cache budget of {cells} cells" in refused.text


@pytest.mark.parametrize("exact", [True, False])
def test_the_default_cache_budget_leaves_room_for_llama_cpp_s_buffers(smol_gguf, monkeypatch,
                                                                      exact):  # fmt: skip
    """Without --max-memory the cache may take half the memory available, buffers
    included: without flash attention (free batching) the attention scores grow with the
    cells (a 512-token micro-batch × 10 floats a cell on SmolLM2), so the default holds
    about half the cells exact batching does, not a cache plus as much again."""
    from muestra.models.gguf_header import read_gguf_header
    from muestra.models.runtime.llamacpp_runtime import KV_SHARE, LlamaCppRuntime

    available = 4 * 2**30
    monkeypatch.setattr(llamacpp_runtime, "available_memory", lambda: available)
    runtime = LlamaCppRuntime(smol_gguf, threads=1, exact=exact)
    buffers = llamacpp_runtime.llama_buffers_from_gguf(read_gguf_header(smol_gguf))

    def taken(cells: int) -> int:
        return cells * SMOL_BYTES_PER_CELL + buffers.bytes(cells, runtime.ubatch,
                                                            runtime.outputs, exact)  # fmt: skip

    cells = runtime.max_cells
    assert cells % 256 == 0 and taken(cells) <= KV_SHARE * available < taken(cells + 256)
    cache_alone = int(KV_SHARE * available) // SMOL_BYTES_PER_CELL
    if exact:  # the buffers do not grow: ~97 MiB less cache
        assert 0.9 * cache_alone < cells < cache_alone
    else:  # 23,040 bytes of cache and 20,480 of scores a cell
        assert 0.45 * cache_alone < cells < 0.6 * cache_alone


def test_serve_refuses_a_budget_without_room_for_the_weights_and_a_first_cache(
    cli, smol_gguf, no_load
):
    """~92 MiB of weights, 4,096 cells × 23,040 bytes (90 MiB) and llama.cpp's buffers
    (97.4 MiB) do not fit 250 MB."""
    result = cli("serve", str(smol_gguf), "--port", "0", "--max-memory", "250MB")
    assert result.code == 2
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("error: --max-memory 250MB: 238 MiB does not hold")
    assert "4,096 cells" in line and "buffers (97.4 MiB)" in line
    assert "raise --max-memory to at least 280MiB" in line


def test_serve_refuses_a_bad_size_before_the_model_loads(cli, smol_gguf, monkeypatch, no_load):
    from muestra.models import loading

    def resolve_model(*args, **kwargs):
        raise AssertionError("the model was looked up before the size was read")

    monkeypatch.setattr(loading, "resolve_model", resolve_model)
    result = cli("serve", str(smol_gguf), "--port", "0", "--max-memory", "lots")
    assert result.code == 2
    assert "error: --max-memory: 'lots' is not a size such as" in result.stderr


def test_serve_refuses_max_memory_on_torch_by_name(cli, smol_kit, no_load):
    """The kit's folder runs on torch (auto): its KV cache has no budget to set."""
    result = cli("serve", str(smol_kit), "--port", "0", "--max-memory", "4GiB")
    assert result.code == 2
    assert "--max-memory is applied on the llama.cpp runtime only; on torch" in result.stderr


def test_mn_serve_passes_max_memory_to_the_command(tmp_path, monkeypatch):
    import muestra.notebook as mn
    from muestra.errors import InputError
    from muestra.notebook import serving

    started = []

    class Exited:
        returncode = 2

        def poll(self):
            return 2

    def popen(args, **kwargs):
        started.append(args)
        return Exited()

    monkeypatch.setattr(serving.subprocess, "Popen", popen)
    with pytest.raises(InputError, match="exited with 2"):
        mn.serve(str(tmp_path), max_memory="6GiB")
    (args,) = started
    assert args[args.index("--max-memory") + 1] == "6GiB"


# ---- a run's memory plan caps llama.cpp's cache (issue 42) ---------------------------------


def test_a_runs_llama_cpp_cache_never_outgrows_its_memory_plan(
    cli, smol_gguf, tmp_path, monkeypatch
):
    """The cache grows by doubling: 12 rows whose plan counts ~1,400 cells took a 2,048-
    cell context (the first context made 256 here). Capped at the plan, it never holds
    more than the rows counted; the samples are those of an uncapped runtime."""
    import json
    import sqlite3

    from helpers import write_spec

    monkeypatch.setattr(llamacpp_runtime, "FIRST_CELLS", 256)
    sizes: list[int] = []
    new_context = llamacpp_runtime.LlamaCppRuntime._new_context

    def recording(self, cells):
        sizes.append(cells)
        return new_context(self, cells)

    monkeypatch.setattr(llamacpp_runtime.LlamaCppRuntime, "_new_context", recording)
    model = f'[model]\nid = "{smol_gguf}"\nruntime = "llamacpp"\nthreads = 1\n'
    spec = write_spec(tmp_path, "cap", model, "[answer]\nmax_tokens = 72\ntemperature = 1.0\n",
                      samples=6)  # fmt: skip
    stores = {}
    for name, cap in (("capped", True), ("free", False)):
        if not cap:
            monkeypatch.setattr(llamacpp_runtime.LlamaCppRuntime, "cap_cells", lambda s, c: None)
        sizes.clear()
        stores[name] = tmp_path / f"{name}.db"
        result = cli("run", str(spec), "--out", str(stores[name]), "--batch", "12")
        assert result.code == 0, result.stderr
        with sqlite3.connect(stores[name]) as db:
            (plan,) = [json.loads(r[0]) for r in db.execute("SELECT plan_json FROM memory_plans")]
            samples = db.execute("SELECT prompt_id, sample_index, answer_text FROM samples "
                                 "ORDER BY 1, 2").fetchall()  # fmt: skip
        stores[name] = (samples, list(sizes))
        counted = plan["rows"] * (plan["tokens_per_row"] + MAX_DRAFT) + llamacpp_runtime.SLACK
        if cap:
            assert plan["rows"] == 12 and max(sizes) <= counted + 255, (sizes, counted)
        else:
            assert max(sizes) > counted + 255, (sizes, counted)  # what the cap prevents
    assert stores["capped"][0] == stores["free"][0]


# ---- exactness under sustained load (issue 47, item 7) ---------------------------------------

TOPICS = ("a dragon", "the sea", "a lost key", "two friends")


def _sustained(engine: Engine, requests_per_client: list[list[GenerationRequest]]):
    """Each client submits its requests one after another (the next as soon as the last
    finished), all clients at once: the scheduler never idles until the end. The finished
    samples of every request, by (client, k)."""
    from muestra.engine.scheduler import Scheduler

    scheduler = Scheduler(engine, max_batch=8)
    results: dict[tuple[int, int], list] = {}
    errors: list[BaseException] = []

    def client(c: int) -> None:
        for k, request in enumerate(requests_per_client[c]):
            done, samples = threading.Event(), []

            def receive(update, samples=samples, done=done, n=request.n) -> None:
                samples.extend(update.finished)
                if update.error is not None:
                    errors.append(update.error)
                    done.set()
                if len(samples) == n:
                    done.set()

            scheduler.submit([request], receive)
            if not done.wait(240):
                errors.append(TimeoutError(f"client {c} request {k}"))
                return
            results[(c, k)] = samples

    threads = [threading.Thread(target=client, args=(c,)) for c in range(len(requests_per_client))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        scheduler.close()
    return results, errors, scheduler


@pytest.mark.parametrize("budget", [512, 8192])
def test_sustained_overlapping_load_keeps_every_sample_exact(small, monkeypatch, budget):
    """Four clients each send four seeded 60-token requests back to back, so rows start
    while others run and the scheduler never idles. In exact mode no cell may be reused
    under a live row: before the fix, the cells finished rows left behind filled the
    512-cell cache and were freed under the running rows (`cells_reused` > 0). Now rows
    wait until the cache empties (with a 512-cell budget) or the cache grows when it does
    (8,192), and every request's tokens and raw log-probabilities are the bits of the
    same request alone."""
    monkeypatch.setattr(llamacpp_runtime, "FIRST_CELLS", 512)
    engine = Engine.from_loaded(small)
    runtime = engine.runtime
    runtime.max_cells = budget
    params = SamplingParams(temperature=1.0)
    clients = [
        [GenerationRequest(chat_ids(small, f"Tell me a story about {topic}."), n=1,
                           params=params, max_new_tokens=60, seed=100 * c + k,
                           ignore_eos=True, logprobs=1)
         for k in range(4)]
        for c, topic in enumerate(TOPICS)
    ]  # fmt: skip
    results, errors, scheduler = _sustained(engine, clients)
    assert not errors, errors
    assert scheduler.stats["max_rows"] >= 2  # rows did overlap
    assert runtime.stats["cells_reused"] == 0
    if budget == 512:
        assert runtime.cells == 512
    else:
        assert runtime.cells > 512  # the pauses made the next contexts larger
        # … up to about DRAIN_ROOM times what the rows booked together, not the budget
        assert runtime.cells < 2 * llamacpp_runtime.DRAIN_ROOM * runtime._peak_booked
    for (c, k), samples in results.items():
        alone = engine.generate([clients[c][k]])[0][0]
        assert samples[0].token_ids == alone.token_ids, (c, k)
        assert _raw(samples) == _raw([alone]), (c, k)


def _raw(samples) -> list[list[float]]:
    return [[lp.raw_logprob for lp in s.logprobs] for s in samples]


def test_a_lone_long_row_takes_one_cell_a_token(small, monkeypatch):
    """A row decoding alone gets a companion token each step (exact mode): its cell is
    freed at once, so a 190-token row fits a 256-cell cache without reusing a cell (it
    took ~2 cells a token before the fix, and cells were reused under it) and its bits
    are those of the same row beside another."""
    monkeypatch.setattr(llamacpp_runtime, "FIRST_CELLS", 256)
    engine = Engine.from_loaded(small)
    runtime = engine.runtime
    runtime.max_cells = 256
    prompt = chat_ids(small, "Tell me a story.")
    mine = GenerationRequest(prompt, n=1, params=SamplingParams(temperature=1.0),
                             max_new_tokens=190, seed=5, ignore_eos=True, logprobs=1)  # fmt: skip
    assert runtime.fits_alone(len(prompt) + 190 + MAX_DRAFT)
    alone = engine.generate([mine])[0][0]
    assert runtime.stats["companions"] > 150
    assert runtime.stats["cells_reused"] == 0
    runtime.max_cells = 4096
    other = GenerationRequest(chat_ids(small, "Name a colour."), n=1, max_new_tokens=200,
                              params=SamplingParams(temperature=1.0), seed=6,
                              ignore_eos=True, prompt_index=1)  # fmt: skip
    beside = engine.generate([other, mine])[1][0]
    assert beside.token_ids == alone.token_ids
    assert _raw([beside]) == _raw([alone])


# ---- the KV cache's type: f16 or q8_0 (issue 42) --------------------------------------------


@pytest.fixture(scope="module")
def q8(smol_kit):
    """SmolLM2 on llama.cpp with a q8_0 KV cache."""
    from muestra.models.loading import load_model

    return load_model(str(smol_kit), runtime="llamacpp", kv_cache="q8_0")


def test_a_q8_0_cache_takes_what_llama_cpp_allocates(q8, monkeypatch, capsys):
    """The runtime's bytes per cell (and so the plan's and --max-memory's) are llama.cpp's
    own: its log of the context's K and V buffers, for a 4,096-cell context, is the
    runtime's arithmetic (34 bytes per block of 32 values: 0.53x the f16 cache)."""
    import re

    runtime = q8.runtime
    assert runtime.kv_bytes_per_cell == SMOL_BYTES_PER_CELL * 34 // 64
    assert runtime.info()["kv_cache"] == "q8_0"
    monkeypatch.setenv("MUESTRA_LLAMA_LOG", "1")
    runtime._new_context(4096)
    logged = capsys.readouterr().err
    sizes = re.search(r"K \(q8_0\):\s+([\d.]+) MiB, V \(q8_0\):\s+([\d.]+) MiB", logged)
    assert sizes, logged[-2000:]
    mib = float(sizes.group(1)) + float(sizes.group(2))
    assert mib == pytest.approx(4096 * runtime.kv_bytes_per_cell / 2**20, abs=0.02)


def test_a_q8_0_cache_keeps_a_sample_the_same_alone_and_in_a_batch(q8, cpp_f16):
    """With q8_0 keys and values a request's tokens and raw log-probabilities are still
    the same bits alone and beside other rows (exact batching); and the cache type is
    applied, not dropped: the log-probabilities differ from the f16 cache's."""
    params = SamplingParams(temperature=0.9, top_p=0.95)
    mine = GenerationRequest(chat_ids(q8, "Write a haiku about the sea."), n=2, params=params,
                             max_new_tokens=30, seed=3, logprobs=1)  # fmt: skip
    engine = Engine.from_loaded(q8)
    alone = engine.generate([mine])[0]
    crowd = [
        GenerationRequest(chat_ids(q8, f"Give me {k} names for a dragon."), n=1, params=params,
                          max_new_tokens=5 + 4 * k, seed=k, prompt_index=k + 1)
        for k in range(6)
    ]  # fmt: skip
    together = engine.generate([crowd[0], mine, *crowd[1:]])[1]
    assert [s.token_ids for s in together] == [s.token_ids for s in alone]
    assert _raw(together) == _raw(alone)
    assert q8.runtime.stats["cells_reused"] == 0
    f16 = Engine.from_loaded(cpp_f16).generate([mine])[0]
    first = [s.logprobs[0].raw_logprob for s in alone]
    assert first != [s.logprobs[0].raw_logprob for s in f16]


@pytest.fixture(scope="module")
def cpp_f16(smol_kit):
    from muestra.models.loading import load_model

    return load_model(str(smol_kit), runtime="llamacpp")


def test_q8_0_is_refused_by_name_where_it_cannot_apply(smol_kit):
    import typing

    from muestra.experiments.spec import ModelSpec
    from muestra.models.loading import load_model
    from muestra.models.memory import RUNTIME_KV_CACHES

    # the spec's choices are the runtime's (and the flag's)
    annotation = ModelSpec.model_fields["kv_cache"].annotation
    assert typing.get_args(typing.get_args(annotation)[0]) == RUNTIME_KV_CACHES

    with pytest.raises(InputError, match=r"kv_cache 'q8_0' needs llama.cpp's flash attention"):
        load_model(str(smol_kit), runtime="llamacpp", kv_cache="q8_0", batch_invariant=False)
    with pytest.raises(InputError, match=r"kv_cache 'q8_0' sets llama.cpp's KV cache type"):
        load_model(str(smol_kit), runtime="torch", kv_cache="q8_0")


def test_the_kv_cache_flag_reaches_the_plan_and_the_store(cli, smol_kit, tmp_path):
    """`muestra run --kv-cache q8_0`: the printed plan is read for a q8_0 cache, and the
    run's provenance records the cache type the runtime made; an unknown type is refused
    by name."""
    import json
    import sqlite3

    from helpers import write_spec

    table = f'[model]\nid = "{smol_kit}"\nruntime = "llamacpp"'
    spec = write_spec(tmp_path, "q8", table, "[think]\nbudget = 6\n[answer]\nmax_tokens = 8",
                      samples=2)  # fmt: skip
    out = tmp_path / "q8.db"
    result = cli("run", str(spec), "--out", str(out), "--kv-cache", "q8_0")
    assert result.code == 0, result.stderr
    assert "read from GGUF metadata, q8_0 KV cache" in " ".join(result.stderr.split())
    with sqlite3.connect(out) as db:
        (provenance,) = db.execute("SELECT provenance_json FROM models").fetchone()
    assert json.loads(provenance)["runtime"]["kv_cache"] == "q8_0"
    refused = cli("run", str(spec), "--out", str(out), "--kv-cache", "q4_0")
    assert refused.code == 2 and "'q4_0' is not one of f16, q8_0" in refused.stderr
    # more samples into the same run with an f16 cache would mix two distributions
    mixed = cli("run", str(spec), "--out", str(out), "--samples", "3")
    assert mixed.code != 0 and "'kv_cache': 'f16'" in mixed.stderr, mixed.stderr


def test_a_dropped_runtime_frees_llama_cpp_s_model_and_context(smol_kit, monkeypatch):
    """llama.cpp's model and context are C memory: a runtime frees them when it is dropped
    (a notebook running experiments one after another held every model it had loaded:
    +260 MiB a SmolLM2 run, measured before the fix) or closed, each once."""
    import gc

    from muestra.models.loading import load_model

    lc = llamacpp_runtime.llama_cpp_module()
    freed: list[str] = []
    real_free, real_model_free = lc.llama_free, lc.llama_model_free
    monkeypatch.setattr(lc, "llama_free", lambda ctx: (freed.append("ctx"), real_free(ctx)))
    monkeypatch.setattr(
        lc, "llama_model_free", lambda m: (freed.append("model"), real_model_free(m))
    )
    loaded = load_model(str(smol_kit), runtime="llamacpp", threads=1)
    engine = Engine.from_loaded(loaded)
    engine.generate([GenerationRequest(chat_ids(loaded, "Hi"), n=1, max_new_tokens=4)])
    assert loaded.runtime._ctx is not None  # a context was made
    del engine, loaded
    gc.collect()
    assert freed == ["ctx", "model"]
    # closed by hand: freed at once, and not again when dropped
    runtime = load_model(str(smol_kit), runtime="llamacpp", threads=1).runtime
    freed.clear()
    runtime.close()
    assert freed == ["model"]  # no context was made yet
    del runtime
    gc.collect()
    assert freed == ["model"]
