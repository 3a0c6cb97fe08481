"""The llama.cpp runtime on the real SmolLM2 GGUF: llama.cpp's own greedy as the oracle,
the χ² fit of sampled tokens to llama.cpp's logits, batch invariance (the contract the
README states), closeness to the torch runtime on the same weights, and the engine's
promises (seeds, stops, logprobs, beams, drafts, field_probs, echo) on this runtime."""

from __future__ import annotations

import ctypes
import json
import platform
import time

import numpy as np
import pytest
import torch
from scipy import stats

import helpers
from conftest import ROOT
from helpers import chat_ids
from muestra.answers.generation import TextGenerator
from muestra.answers.grammar import GrammarSpec
from muestra.answers.phases import AnswerConfig
from muestra.answers.structured import StructuredGenerator
from muestra.engine import Engine, GenerationRequest, SamplingParams
from muestra.engine.beam import BeamParams, beam_search
from muestra.engine.lookup import lookup_greedy
from muestra.engine.speculative import speculative_decode
from muestra.errors import InputError, MuestraError

pytest.importorskip("llama_cpp", reason="the llama.cpp runtime needs llama-cpp-python")

from muestra.models.runtime.llamacpp_runtime import PORTABLE_X86  # noqa: E402

GREEDY = SamplingParams(temperature=0)
CHAT = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three names for a dragon.",
    "Explain what a prime number is, briefly.",
    "Tell me a short story about a knight.",
]


@pytest.fixture(scope="module")
def cpp(smol_kit):
    """SmolLM2's GGUF (the kit's copy) on the llama.cpp runtime."""
    from muestra.models.loading import load_model

    return load_model(str(smol_kit), runtime="llamacpp")


@pytest.fixture(scope="module")
def cpp_engine(cpp):
    return Engine.from_loaded(cpp)


def own_greedy(gguf: str, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """llama.cpp's own greedy generation, as its `simple` example decodes: the prompt in one
    `llama_decode`, then one token a call, each picked by llama.cpp's greedy sampler (the
    default context; only the AMX weight layout is off, as in muestra: it crashes here).
    Returns the tokens and the logits each was picked from."""
    import llama_cpp as lc

    params = lc.llama_model_default_params()
    params.use_extra_bufts = False
    model = lc.llama_model_load_from_file(gguf.encode(), params)
    from muestra.models.runtime.llamacpp_runtime import default_threads

    context = lc.llama_context_default_params()
    context.n_ctx = 1024
    context.n_threads = context.n_threads_batch = default_threads()  # its default is 4
    ctx = lc.llama_init_from_model(model, context)
    sampler = lc.llama_sampler_init_greedy()
    vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    tokens, logits = [], []
    array = (lc.llama_token * len(prompt))(*prompt)
    batch = lc.llama_batch_get_one(array, len(prompt))
    try:
        for _ in range(steps):
            assert lc.llama_decode(ctx, batch) == 0
            row = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, -1), shape=(vocab,))
            logits.append(row.copy())
            token = lc.llama_sampler_sample(sampler, ctx, -1)
            tokens.append(int(token))
            one = (lc.llama_token * 1)(token)
            batch = lc.llama_batch_get_one(one, 1)
            ctypes.pointer(one)  # keep it alive for the next decode
    finally:
        lc.llama_sampler_free(sampler)
        lc.llama_free(ctx)
        lc.llama_model_free(model)
    return tokens, np.stack(logits)


def test_greedy_equals_llama_cpps_own_greedy(cpp, cpp_engine):
    """Token for token, on five chat prompts (48 tokens each, EOS not a stop)."""
    gguf = cpp.provenance.path
    for text in CHAT:
        prompt = chat_ids(cpp, text)
        want, _ = own_greedy(gguf, prompt, 48)
        request = GenerationRequest(prompt, params=GREEDY, max_new_tokens=48, ignore_eos=True)
        (sample,) = cpp_engine.generate([request])[0]
        assert sample.token_ids == want, text


def test_sampled_first_tokens_fit_llama_cpps_softmax(cpp, cpp_engine):
    """400 first tokens at temperature 1 against the softmax of llama.cpp's own logits
    (χ² over the tokens expected at least 5 times, the rest pooled)."""
    prompt = chat_ids(cpp, "Name a colour.")
    _, logits = own_greedy(cpp.provenance.path, prompt, 1)
    probs = torch.softmax(torch.from_numpy(logits[0]).double(), -1).numpy()
    request = GenerationRequest(
        prompt, n=400, params=SamplingParams(temperature=1.0), max_new_tokens=1, seed=11
    )
    counts: dict[int, int] = {}
    for sample in cpp_engine.generate([request])[0]:
        counts[sample.token_ids[0]] = counts.get(sample.token_ids[0], 0) + 1
    big = [t for t in np.argsort(-probs) if probs[t] * 400 >= 5]
    observed = [counts.get(int(t), 0) for t in big]
    expected = [probs[t] * 400 for t in big]
    observed.append(400 - sum(observed))
    expected.append(400 - sum(expected))
    assert len(big) >= 3  # the test has categories to compare
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def _raw(samples) -> list[list[float]]:
    return [[lp.raw_logprob for lp in s.logprobs] for s in samples]


@pytest.mark.long
def test_a_sample_is_bit_identical_alone_and_in_any_batch(cpp, cpp_engine):
    """The contract of batch invariance: a request's tokens and raw log-probabilities are
    the same bits alone, beside 1 to 40 other rows of other prompts (prefilled together,
    micro-batches of every size), and beside rows that finish early."""
    params = SamplingParams(temperature=0.9, top_p=0.95)
    mine = GenerationRequest(chat_ids(cpp, CHAT[4]), n=2, params=params, max_new_tokens=40,
                             seed=3, logprobs=1)  # fmt: skip
    alone = cpp_engine.generate([mine])[0]
    for others in (1, 9, 40):
        crowd = [
            GenerationRequest(
                chat_ids(cpp, CHAT[i % 4] + " " * (i // 4)),
                n=1,
                params=params,
                max_new_tokens=5 + 3 * (i % 7),  # rows leave at different steps
                seed=i,
                prompt_index=i + 1,
            )
            for i in range(others)
        ]
        together = cpp_engine.generate([crowd[0], mine, *crowd[1:]])[1]
        assert [s.token_ids for s in together] == [s.token_ids for s in alone], others
        assert _raw(together) == _raw(alone), others
    assert cpp.runtime.stats["cells_reused"] == 0


def test_jump_forward_drafts_change_forwards_not_bits(cpp):
    """A schema answer with jump-forward (drafts fed several a forward) equals the answer
    decoded one token a forward: same tokens, same field_probs, bit for bit."""
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12},
                       "class": {"enum": ["warrior", "mage", "rogue"]}},
        "required": ["name", "class"],
    }  # fmt: skip
    prompt = chat_ids(cpp, "Create an RPG character as JSON.")
    runs = {}
    for jump in (True, False):
        generator = StructuredGenerator(cpp)
        generator.jump_forward = jump
        before = dict(cpp.runtime.stats)
        samples = generator.run(
            [prompt],
            n=6,
            seed=2,
            answer=AnswerConfig(params=SamplingParams(temperature=1.0), max_tokens=40),
            grammar=GrammarSpec.json_schema(schema),
        )
        runs[jump] = (samples, cpp.runtime.stats["decodes"] - before["decodes"])
    (drafted, forwards_drafted), (plain, forwards_plain) = runs[True], runs[False]
    assert forwards_drafted < forwards_plain
    for a, b in zip(drafted, plain, strict=True):
        assert a.token_ids == b.token_ids
        assert a.field_probs == b.field_probs  # exact: the same bits
        assert a.error is None and a.answer is not None


def test_field_probs_in_the_loop_equal_post_hoc(cpp, monkeypatch):
    prompt = chat_ids(cpp, "Pick a colour and answer in JSON.")
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}},
              "required": ["colour"]}  # fmt: skip
    generator = StructuredGenerator(cpp)

    def run(in_loop: bool):
        monkeypatch.setattr(generator, "live_field_probs", in_loop)
        return generator.run(
            [prompt], n=4, seed=1, answer=AnswerConfig(max_tokens=20),
            grammar=GrammarSpec.json_schema(schema),
        )  # fmt: skip

    loop, post = run(True), run(False)
    for a, b in zip(loop, post, strict=True):
        assert a.token_ids == b.token_ids
        for name, values in a.field_probs.items():
            assert values == pytest.approx(b.field_probs[name], abs=1e-5)
            assert sum(values.values()) == pytest.approx(1.0)


def test_field_probs_release_a_waves_kept_rows_before_the_next(cpp, monkeypatch):
    """More samples than rows at once: the finished rows whose untaken branches wait are
    expanded when their wave ends, before the next wave is booked into the cache they tag
    (they waited for 64 rows: 72 samples by 8 at once failed with "llama.cpp holds at most
    254 rows", and without batch invariance with a full cache)."""
    waiting = helpers.count_pending(monkeypatch)
    prompt = chat_ids(cpp, "Pick an animal: caballo, caballero or caballería?")
    samples = StructuredGenerator(cpp, max_batch=4).run(
        [prompt], n=16, seed=1, answer=AnswerConfig(max_tokens=8),
        grammar=GrammarSpec.choice(["caballo", "caballero", "caballería"]),
    )  # fmt: skip
    assert all(s.field_probs and sum(s.field_probs["answer"].values()) == pytest.approx(1.0)
               for s in samples)  # fmt: skip
    assert max(waiting) == 4 and len(waiting) >= 4, waiting  # each wave's rows, not 16


def test_seeds_stops_and_logprobs(cpp, cpp_engine):
    prompt = chat_ids(cpp, CHAT[2])
    params = SamplingParams(temperature=0.8)
    request = GenerationRequest(prompt, n=3, params=params, max_new_tokens=12, seed=5)
    first, again = cpp_engine.generate([request])[0], cpp_engine.generate([request])[0]
    assert [s.token_ids for s in first] == [s.token_ids for s in again]
    assert len({tuple(s.token_ids) for s in first}) > 1
    assert all(s.num_tokens <= 12 for s in first)
    text = TextGenerator(cpp)
    (stopped,) = text.generate(text.requests([prompt], params=GREEDY, stop=["\n"], logprobs=2))
    assert "\n" not in stopped.text and stopped.finish_reason in ("stop", "length")
    assert all(len(lp["top"]) == 2 for lp in stopped.logprobs)
    assert stopped.logprobs[0]["raw_logprob"] <= 0


def test_beam_search_keeps_its_rules(cpp, cpp_engine):
    """Beams on llama.cpp: the best hypothesis' summed log-probability is the model's own
    (teacher-forced through the runtime), and it is at least greedy's."""
    prompt = chat_ids(cpp, CHAT[0])
    request = GenerationRequest(prompt, max_new_tokens=8)
    ((best, *_),) = beam_search(cpp_engine, [request], BeamParams(num_beams=4))
    rows, fed = cpp.runtime.prefill([prompt + best.token_ids[:-1]], 1, "all")
    rows.close()
    logprobs = torch.log_softmax(fed.ahead[0][len(prompt) - 1 :], -1)
    total = float(sum(logprobs[i, t] for i, t in enumerate(best.token_ids)))
    assert best.sum_logprob == pytest.approx(total, abs=1e-3)
    greedy = cpp_engine.generate([GenerationRequest(prompt, params=GREEDY, max_new_tokens=8)])
    rows, fed = cpp.runtime.prefill([prompt + greedy[0][0].token_ids[:-1]], 1, "all")
    rows.close()
    logprobs = torch.log_softmax(fed.ahead[0][len(prompt) - 1 :], -1)
    greedy_total = float(sum(logprobs[i, t] for i, t in enumerate(greedy[0][0].token_ids)))
    assert best.sum_logprob >= greedy_total - 1e-4


def test_prompt_lookup_and_speculative_equal_greedy(cpp, cpp_engine):
    prompt = chat_ids(cpp, "Repeat exactly: the quick brown fox jumps over the lazy dog.")
    request = GenerationRequest(prompt, params=GREEDY, max_new_tokens=24)
    plain = cpp_engine.generate([request])[0][0].token_ids
    looked = lookup_greedy(cpp_engine, request, num_tokens=8)
    assert looked.token_ids == plain
    assert looked.accepted > 0  # it copied from the prompt
    ((spec,),) = speculative_decode(cpp_engine, cpp.runtime, [request], 4)  # its own draft
    assert spec.token_ids == plain and spec.acceptance_rate == 1.0


def test_dola_is_refused_by_name_before_any_work(cpp_engine):
    before = dict(cpp_engine.runtime.stats)
    request = GenerationRequest([1, 2, 3], params=SamplingParams(dola_layers="high"))
    with pytest.raises(InputError, match="DoLa.*llamacpp.*--runtime torch"):
        cpp_engine.generate([request])
    assert cpp_engine.runtime.stats == before


def test_loglik_on_llama_cpp_equals_one_forward_per_option(cpp):
    """lm-eval's log-likelihood through the runtime's rows (a context copied to each
    option) equals one teacher-forced forward per (context, option)."""
    from muestra.evaluation.loglik import loglikelihoods

    encode = lambda t: cpp.tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    questions = [("The capital of France is", [" Paris", " Rome", " a large city"]),
                 ("2 + 2 =", [" 4", " five"])]  # fmt: skip
    got = loglikelihoods(cpp.runtime, encode, questions)
    for (context, conts), scored in zip(questions, got, strict=True):
        for cont, s in zip(conts, scored, strict=True):
            ctx = encode(context)
            whole = encode(context + cont)
            rows, fed = cpp.runtime.prefill([whole], 1, "all")
            rows.close()
            logprobs = torch.log_softmax(fed.ahead[0], -1)
            want = sum(float(logprobs[j - 1, whole[j]]) for j in range(len(ctx), len(whole)))
            assert s.loglik == pytest.approx(want, abs=1e-5)


def test_torch_and_llama_cpp_agree_on_the_same_weights(cpp, smol):
    """The dequantized kit (torch, fp32) and its GGUF (llama.cpp, 4-bit kernels, 8-bit
    activations) teacher-forced over ~300 positions: top-1 agreement and KL(torch‖cpp)."""
    texts = [
        "The history of the Roman Empire spans many centuries, from its founding to its fall.",
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) +",
        "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    ]
    agree, kls = [], []
    for text in [*texts, *CHAT]:
        ids = smol.tokenizer(text)["input_ids"]
        with torch.no_grad():
            ref = torch.log_softmax(smol.model(torch.tensor([ids])).logits[0].float(), -1)
        rows, fed = cpp.runtime.prefill([ids], 1, "all")
        rows.close()
        got = torch.log_softmax(fed.ahead[0], -1)
        agree += (ref.argmax(-1) == got.argmax(-1)).tolist()
        kls += (ref.exp() * (ref - got)).sum(-1).tolist()
    assert len(agree) >= 100
    assert np.mean(agree) >= 0.9
    assert np.mean(kls) < 0.05 and max(kls) < 1.0


def test_the_store_records_the_runtime(cpp, smol_kit, tmp_path, cli):
    store = tmp_path / "r.db"
    spec = tmp_path / "s.toml"
    spec.write_text(
        f'name = "r"\nsamples = 2\nseed = 1\n[model]\nid = "{smol_kit}"\n'
        'runtime = "llamacpp"\n[prompt]\nuser = "Say hi."\nitems = [{id = "a"}]\n'
        "[answer]\nmax_tokens = 4\n"
    )
    result = cli("run", str(spec), "--out", str(store))
    assert result.code == 0, result.stderr
    from muestra.experiments.store import reading

    with reading(store) as db:
        (provenance,) = db.execute("SELECT provenance_json FROM models").fetchone()
    runtime = json.loads(provenance)["runtime"]
    assert runtime["runtime"] == "llamacpp" and runtime["exact"] is True
    assert (
        runtime["gguf_sha256"]
        == json.loads((smol_kit / "muestra-kit.json").read_text())["gguf_sha256"]
    )
    assert runtime["llama_cpp_python"] and runtime["threads"] >= 1
    # the instruction set its kernels were built for: the same bits need the same set
    assert isinstance(runtime["cpu_features"], list) and runtime["cpu_features"]
    if platform.machine() == "x86_64":  # make install builds the portable set (Makefile)
        assert set(runtime["cpu_features"]) <= set(PORTABLE_X86), runtime["cpu_features"]
    # a resume on another runtime would mix samples: refused
    spec.write_text(spec.read_text().replace('"llamacpp"', '"torch"'))
    again = cli("run", str(spec), "--out", str(store), "--samples", "3")
    assert again.code == 2 and "different spec" in again.stderr
    mixed = cli("run", str(spec), "--out", str(tmp_path / "r2.db"))
    assert mixed.code == 0


def test_make_install_refuses_a_native_build_pip_had_cached(monkeypatch, capsys):
    """pip reuses a wheel it built earlier whatever CMAKE_ARGS says: a build for AVX-512
    found after `make install` is an error that says how to rebuild."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("llama_build", ROOT / "tools/llama_build.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    monkeypatch.setattr(check.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(check, "cpu_features", lambda: [*PORTABLE_X86])
    assert check.main([]) == 0
    monkeypatch.setattr(check, "cpu_features", lambda: [*PORTABLE_X86, "AVX512", "AVX512_VNNI"])
    assert check.main([]) == 1
    err = capsys.readouterr().err
    assert "AVX512 AVX512_VNNI" in err and "pip cache remove llama_cpp_python" in err
    assert check.main(["--native"]) == 0  # LLAMA_CMAKE_ARGS asked for it


# ---- choosing the runtime --------------------------------------------------------------


def test_the_runtime_follows_the_weights_and_refuses_what_it_cannot_honour(smol_kit, tiny_kit):
    from muestra.models.loading import check_model, choose_runtime, load_model

    (gguf,) = smol_kit.glob("*.gguf")
    assert choose_runtime("x", check_model(str(gguf)), "auto") == "llamacpp"
    assert choose_runtime("x", check_model(str(smol_kit)), "auto") == "torch"  # has weights
    assert choose_runtime("x", check_model(str(smol_kit)), "llamacpp") == "llamacpp"
    with pytest.raises(InputError, match="runs GGUF files.*has none.*--runtime torch"):
        choose_runtime("tiny", check_model(str(tiny_kit)), "llamacpp")
    with pytest.raises(InputError, match="runtime 'onnx' is not one of"):
        choose_runtime("x", check_model(str(gguf)), "onnx")
    with pytest.raises(InputError, match="dtype 'bfloat16' applies to the torch runtime"):
        load_model(str(gguf), runtime="llamacpp", dtype="bfloat16")
    with pytest.raises(InputError, match="device cuda"):
        load_model(str(gguf), runtime="llamacpp", device="cuda")
    with pytest.raises(InputError, match="batch_invariant=false.*torch runtime has no"):
        load_model(str(tiny_kit), batch_invariant=False)


def test_without_llama_cpp_python_the_error_says_how_to_install_it(smol_kit, monkeypatch):
    import builtins

    from muestra.models.loading import check_model, choose_runtime

    real_import = builtins.__import__

    def no_llama(name, *args, **kwargs):
        if name == "llama_cpp" or name.startswith("llama_cpp."):
            raise ImportError("No module named 'llama_cpp'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama)
    (gguf,) = smol_kit.glob("*.gguf")
    files = check_model(str(gguf))
    assert choose_runtime("x", files, "auto") == "torch"  # dequantized instead
    with pytest.raises(MuestraError, match=r"pip install 'muestra\[llamacpp\]'.*cmake"):
        choose_runtime("x", files, "llamacpp")


def test_the_cli_runs_a_gguf_and_refuses_dola_by_name(smol_kit, cli):
    (gguf,) = smol_kit.glob("*.gguf")
    result = cli("generate", str(gguf), "--prompt", "The capital of France is", "--raw",
                 "--temperature", "0", "--max-new-tokens", "4")  # fmt: skip
    assert result.code == 0, result.stderr
    assert "Paris" in result.json_lines()[0]["text"]
    refused = cli("generate", str(gguf), "--prompt", "Hi", "--dola-layers", "high")
    assert refused.code == 2
    assert "DoLa" in refused.stderr and "--runtime torch" in refused.stderr
    same = cli("next", str(smol_kit), "The capital of France is", "--raw", "--runtime",
               "llamacpp", "--json")  # fmt: skip
    assert same.code == 0, same.stderr
    assert same.json()["candidates"][0]["token"].strip("Ġ ") == "Paris"


# ---- continuous batching and the server -----------------------------------------------


def test_the_scheduler_keeps_every_request_bit_identical(cpp, cpp_engine):
    """Requests that arrive while others decode (continuous batching on llama.cpp) give
    the bits they give alone."""
    import threading

    from muestra.engine.scheduler import Scheduler

    params = SamplingParams(temperature=0.8)
    requests = [
        GenerationRequest(chat_ids(cpp, text), n=2, params=params, max_new_tokens=10 + 6 * i,
                          seed=i, logprobs=0)
        for i, text in enumerate(CHAT)
    ]  # fmt: skip
    alone = [cpp_engine.generate([r])[0] for r in requests]
    scheduler = Scheduler(cpp_engine)
    got: dict[int, list] = {}
    done = threading.Event()

    def deliver(index):
        def receive(update):
            got.setdefault(index, []).extend(update.finished)
            if len(got) == len(requests) and all(len(v) == 2 for v in got.values()):
                done.set()

        return receive

    try:
        for index, request in enumerate(requests):
            scheduler.submit([request], deliver(index))
            time.sleep(0.05 * index)  # later requests join a running batch
        assert done.wait(120)
    finally:
        scheduler.close()
    assert scheduler.stats["admissions"] >= 2
    for index, samples in enumerate(alone):
        mine = sorted(got[index], key=lambda s: s.sample_index)
        assert [s.token_ids for s in mine] == [s.token_ids for s in samples]
        assert _raw(mine) == _raw(samples)


def test_muestra_serve_on_llama_cpp(cpp):
    from fastapi.testclient import TestClient

    from muestra.server.app import create_app
    from muestra.server.service import ServedModel

    with TestClient(create_app(ServedModel(cpp, "smol"))) as http:
        body = {
            "model": "smol",
            "messages": [{"role": "user", "content": CHAT[0]}],
            "max_tokens": 12,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 2,
        }
        reply = http.post("/v1/chat/completions", json=body).json()
        text = reply["choices"][0]["message"]["content"]
        generator = TextGenerator(cpp)
        request = generator.requests([chat_ids(cpp, CHAT[0])], params=GREEDY, max_new_tokens=12)
        assert text == generator.generate(request)[0].text  # the engine's greedy, served
        assert len(reply["choices"][0]["logprobs"]["content"]) >= 1
        echo = http.post(
            "/v1/completions",
            json={"model": "smol", "prompt": "The capital of France is Paris", "echo": True,
                  "max_tokens": 0, "logprobs": 1},
        ).json()  # fmt: skip
        assert echo["choices"][0]["logprobs"]["token_logprobs"][-1] > -3


# ---- a server muestra did not write: llama.cpp's llama-server ------------------------


@pytest.fixture(scope="module")
def llama_server(smol_kit, tmp_path_factory):
    """llama.cpp's `llama-server` (built by `make peers` from the llama.cpp that
    llama-cpp-python vendors) on the same GGUF, on loopback."""
    import subprocess

    import httpx
    from benchmarks.peers import build_peers

    from test_server import free_port

    (gguf,) = smol_kit.glob("*.gguf")
    port = free_port()
    log = tmp_path_factory.mktemp("llama-server") / "log.txt"
    with open(log, "w") as handle:  # a pipe nobody reads would fill and block the server
        process = subprocess.Popen(
            [str(build_peers()["llama-server"]), "-m", str(gguf), "--host", "127.0.0.1",
             "--port", str(port), "-np", "4", "-c", "4096", "-t", "1", "-nr", "--alias",
             "smol"],
            stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if process.poll() is not None:
                raise AssertionError(f"llama-server exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        process.wait(30)


@pytest.mark.long
@pytest.mark.peers
def test_the_same_spec_samples_the_same_distribution_on_llama_cpps_server(
    llama_server, smol_kit, tmp_path, cli
):
    """One spec, 120 samples of an enum answer at T 1: muestra's llama.cpp runtime and
    llama.cpp's own server (its own grammar and sampler, every setting sent explicitly)
    give answer distributions a χ² test cannot tell apart."""
    from muestra.experiments.store import reading

    (gguf,) = smol_kit.glob("*.gguf")
    schema = tmp_path / "s.json"
    schema.write_text(
        json.dumps(
            {
                "type": "object",
                "required": ["colour"],
                "properties": {"colour": {"enum": ["red", "green", "blue"]}},
            }
        )
    )
    top = 'name = "colours"\nseed = 5\nsamples = 60\n'
    common = (
        '[prompt]\nuser = "Pick a colour for a {thing}. Answer in JSON."\n'
        'items = [{id = "car", thing = "car"}, {id = "dress", thing = "dress"}]\n'
        '[answer]\ntemperature = 1.0\nmax_tokens = 40\nschema = "s.json"\n'
    )
    local = tmp_path / "local.toml"
    local.write_text(top + f'[model]\nid = "{gguf}"\nruntime = "llamacpp"\n' + common)
    remote = tmp_path / "remote.toml"
    remote.write_text(top + f'[model]\nid = "smol"\nendpoint = "{llama_server}/v1"\n'
                      "concurrency = 4\n" + common)  # fmt: skip
    counts = {}
    for name, spec in (("local", local), ("remote", remote)):
        store = tmp_path / f"{name}.db"
        result = cli("run", str(spec), "--out", str(store))
        assert result.code == 0, result.stderr
        with reading(store) as db:
            answers = [json.loads(a)["colour"] for (a,) in db.execute(
                "SELECT answer_json FROM samples WHERE answer_json IS NOT NULL")]  # fmt: skip
        assert len(answers) >= 110, name
        counts[name] = [answers.count(c) for c in ("red", "green", "blue")]
    table = np.array([counts["local"], counts["remote"]])
    table = table[:, table.sum(0) > 0]
    assert table.shape[1] >= 2  # more than one colour: the test compares something
    assert stats.chi2_contingency(table).pvalue > 1e-3, counts


def test_plain_text_reasoning_then_an_answer_sample_by_sample(cpp):
    """Think (plain text: SmolLM2 has no think tags) then a schema answer, on llama.cpp:
    every answer valid, and sample k of a batch of 6 is the same bits as sample k alone
    (its own seed, its own phase switches)."""
    from muestra.answers.phases import ThinkConfig

    schema = {"type": "object", "required": ["gender"],
              "properties": {"gender": {"enum": ["male", "female"]}}}  # fmt: skip
    generator = StructuredGenerator(cpp)
    prompt = chat_ids(cpp, "Create an RPG character for a friendly player, as JSON.")
    think = generator.resolve_think(
        ThinkConfig(params=SamplingParams(temperature=1.0), budget=24, mode="text")
    )

    def run(first: int, count: int):
        return generator.run(
            [prompt], counts=[count], first_samples=[first], seed=9, think=think,
            answer=AnswerConfig(max_tokens=20), grammar=GrammarSpec.json_schema(schema),
        )  # fmt: skip

    batch = run(0, 6)
    assert all(s.error is None and s.answer["gender"] in ("male", "female") for s in batch)
    assert len({s.reasoning for s in batch}) > 1
    for k in (0, 4):
        (alone,) = run(k, 1)
        assert alone.token_ids == batch[k].token_ids
        assert alone.field_probs == batch[k].field_probs
