"""The newer surfaces as a careless or hostile user meets them: `muestra eval`, `probe`,
`pairs`, `reward train|score`, `align dpo|rloo`, the server's lm-eval routes
(`/tokenize`, `/detokenize`, echo) and crafted GGUF headers. Every bad input is a one-line
error before any work (exit 2), or a 4xx in OpenAI's shape — never a traceback, a 5xx or a
silent acceptance."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from gguf_mutations import base_gguf, mutations
from test_server_hardening import TEXT, assert_openai_error, served_app

GOOD_QUESTION = {"id": "q1", "question": "¿2 + 2?", "options": ["4", "5"], "answer": "A"}
BAD_QUESTIONS = [
    ({**GOOD_QUESTION, "options": ["Blue", "Blue"]}, "same text"),
    ({**GOOD_QUESTION, "options": ["", "b"]}, "option A is empty"),
    ({**GOOD_QUESTION, "options": ["a", "  "]}, "option B is empty"),
    ({**GOOD_QUESTION, "options": ["a"]}, "2–"),
    ({**GOOD_QUESTION, "options": [1, 2]}, "options"),
    ({**GOOD_QUESTION, "options": "abc"}, "options"),
    ({**GOOD_QUESTION, "options": {"a": 1}}, "options"),
    ({**GOOD_QUESTION, "options": ["a", "b"] * 20}, "options"),
    ({**GOOD_QUESTION, "answer": "C"}, "answer"),
    ({**GOOD_QUESTION, "answer": 1}, "answer"),
    ({**GOOD_QUESTION, "answer": None}, "answer"),
    ({**GOOD_QUESTION, "answer": ""}, "answer"),
    ({**GOOD_QUESTION, "question": ""}, "question"),
    ({**GOOD_QUESTION, "question": None}, "question"),
    ({**GOOD_QUESTION, "question": 7}, "question"),
    ({**GOOD_QUESTION, "question": "  "}, "question"),
    ({k: v for k, v in GOOD_QUESTION.items() if k != "id"}, "id"),
    ({**GOOD_QUESTION, "id": ""}, "id"),
    ({**GOOD_QUESTION, "answer_index": 9, "answer": None}, "answer_index"),
    ({"frage": "x", "optionen": ["a", "b"]}, "columns found are frage, optionen"),
    ({**GOOD_QUESTION, "question": "x" * 1_000_001}, "over the limit"),
]
BAD_TASK_FILES = [
    ("empty.jsonl", "", "no questions"),
    ("notjson.jsonl", "{nope\n", "not JSON"),
    ("list.json", '{"a": 1}', "JSON list"),
    ("twice.jsonl", json.dumps(GOOD_QUESTION) + "\n" + json.dumps(GOOD_QUESTION), "unique"),
    ("bytes.jsonl", b"\xff\xfe\x00", "UTF-8"),
    ("task.txt", "question", "unknown task format"),
    ("scalar.jsonl", "3\n", "expected an object"),
    ("cols.csv", "frage,optionen\nx,y\n", "columns found are frage, optionen"),
]


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def assert_refused(result, *words: str) -> None:
    assert result.code == 2, (result.code, result.stderr[-500:])
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-500:]
    for word in words:
        assert word in lines[0], (word, lines[0][:300])


# ---- eval --------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "case"), list(itertools.product(
    ["choice", "loglik"], range(len(BAD_QUESTIONS))
)))  # fmt: skip
def test_eval_refuses_each_bad_question_by_file_and_row(cli, tiny_kit, tmp_path, method, case):
    row, words = BAD_QUESTIONS[case]
    task = write(tmp_path / "t.jsonl", json.dumps(row) + "\n")
    store = tmp_path / "e.db"
    result = cli("eval", str(tiny_kit), str(task), "--method", method, "--out", str(store))
    assert_refused(result, str(task), words)
    assert not store.exists() and not list(tmp_path.glob("e.db*"))


@pytest.mark.parametrize("case", range(len(BAD_TASK_FILES)))
def test_eval_refuses_each_unreadable_task_file(cli, tiny_kit, tmp_path, case):
    name, content, words = BAD_TASK_FILES[case]
    task = write(tmp_path / name, content)
    assert_refused(cli("eval", str(tiny_kit), str(task), "--out", str(tmp_path / "e.db")), words)


def test_eval_names_folders_missing_models_and_too_long_questions(cli, tiny_kit, tmp_path):
    good = write(tmp_path / "ok.jsonl", json.dumps(GOOD_QUESTION) + "\n")
    folder = tmp_path / "dir"
    folder.mkdir()
    out = ["--out", str(tmp_path / "e.db")]
    assert_refused(cli("eval", str(tiny_kit), str(folder), *out), "is a folder")
    assert_refused(
        cli("eval", str(tiny_kit), str(good), "--dev", str(folder), *out), "--dev", "folder"
    )
    missing = cli("eval", str(tmp_path / "nomodel"), str(good), *out)
    assert_refused(missing, "nomodel")
    assert "--model" not in missing.stderr  # the model is the positional MODEL here
    long = write(
        tmp_path / "long.jsonl", json.dumps({**GOOD_QUESTION, "question": "palabra " * 5000})
    )
    for method in ("loglik", "choice"):
        result = cli(
            "eval",
            str(tiny_kit),
            str(long),
            "--method",
            method,
            "--out",
            str(tmp_path / f"{method}.db"),
        )
        assert_refused(result, str(long), "'q1'", "context")
        assert "prompt.max_chars" not in result.stderr
    # refused before any sample: the run (and the store this command made) is not kept
    assert not (tmp_path / "loglik.db").exists() and not (tmp_path / "choice.db").exists()


# ---- probe -------------------------------------------------------------------------------

PROBE = """
name = "p"
seed = 1
samples = 2
groups = [{ id = "man", who = "man" }, { id = "woman", who = "woman" }]
templates = ["The {who} worked as"]
[decoding]
max_tokens = 4
"""
BAD_PROBES = [
    (PROBE.replace("samples = 2", "samples = 1000000000"), "MUESTRA_MAX_SAMPLES"),
    (PROBE.replace("samples = 2", "samples = 0"), "samples"),
    (PROBE.replace("samples = 2", "samples = -1"), "samples"),
    (PROBE.replace("samples = 2", "samples = 2.5"), "samples"),
    (PROBE.replace("seed = 1", 'seed = "x"'), "seed"),
    (PROBE.replace('"The {who} worked as"', '"The person worked as"'), "no slot"),
    (PROBE.replace('"The {who} worked as"', '"The {whom} worked"'), "whom"),
    (PROBE.replace("templates = [", "templates = []\nx = ["), "templates"),
    (
        PROBE.replace(
            'groups = [{ id = "man", who = "man" }, { id = "woman", who = "woman" }]', "groups = []"
        ),
        "groups",
    ),
    (PROBE + '[lexicon]\nfiles = ["empty.txt"]\n', "holds no words"),
    (PROBE + '[lexicon]\nfiles = ["comments.txt"]\n', "holds no words"),
    (PROBE + '[lexicon]\nfiles = ["nowhere.txt"]\n', "nowhere.txt"),
    (PROBE + '[lexicon]\nfiles = ["bad.toml"]\n', "bad.toml"),
    (PROBE + '[judge]\nuser = "{text}"\nschema = "bad.schema.json"\n', "[judge] schema"),
    (PROBE + '[judge]\nuser = "{text}"\nschema = "missing.json"\n', "missing.json"),
    (PROBE + '[judge]\nuser = "{text}"\nschema = "array.json"\n', "[judge] schema"),
    (PROBE + '[judge]\nuser = "{other}"\nschema = "ok.schema.json"\n', "other"),
    (PROBE.replace("max_tokens = 4", "max_tokens = 0"), "max_tokens"),
    (PROBE.replace("max_tokens = 4", "temperature = -1\nmax_tokens = 4"), "temperature"),
    (PROBE + "unknown_key = 1\n", "unknown_key"),
    ("name = \n", "TOML"),
    (PROBE.replace("[decoding]", "[decodng]"), "decodng"),
]


@pytest.mark.parametrize("case", range(len(BAD_PROBES)))
def test_probe_refuses_each_bad_probe_before_sampling(cli, tiny_kit, tmp_path, case):
    body, words = BAD_PROBES[case]
    write(tmp_path / "empty.txt", "")
    write(tmp_path / "comments.txt", "# only\n# comments\n")
    write(tmp_path / "bad.toml", "care = 3\n")
    write(
        tmp_path / "bad.schema.json", '{"type": "object", "properties": {"a": {"type": "strin"}}}'
    )
    write(tmp_path / "array.json", "[1, 2]")
    write(
        tmp_path / "ok.schema.json", '{"type": "object", "properties": {"a": {"type": "string"}}}'
    )
    probe = write(tmp_path / "p.toml", body)
    store = tmp_path / "p.db"
    result = cli("probe", str(probe), "--model", str(tiny_kit), "--out", str(store))
    assert_refused(result, words)
    assert not store.exists()


# ---- pairs, reward, align ----------------------------------------------------------------

GOOD_PAIR = {
    "prompt": [{"role": "user", "content": "Hi"}],
    "chosen": [{"role": "assistant", "content": "Hello!"}],
    "rejected": [{"role": "assistant", "content": "Go away."}],
}
BAD_PAIR_FILES = [
    "",
    "{nope\n",
    "[]",
    json.dumps({**GOOD_PAIR, "chosen": None}) + "\n",
    json.dumps({**GOOD_PAIR, "chosen": 3}) + "\n",
    json.dumps({k: v for k, v in GOOD_PAIR.items() if k != "rejected"}) + "\n",
    json.dumps({**GOOD_PAIR, "chosen": [{"role": "assistant"}]}) + "\n",
    json.dumps({**GOOD_PAIR, "chosen": [{"role": "wizard", "content": "x"}]}) + "\n",
    json.dumps({**GOOD_PAIR, "prompt": 5}) + "\n",
    "3\n",
    json.dumps(GOOD_PAIR) + "\n" + "{broken\n",
    json.dumps({**GOOD_PAIR, "chosen": GOOD_PAIR["rejected"]}) + "\n",
]
TRAINING = [
    ["reward", "train"],
    ["align", "dpo"],
]


@pytest.mark.parametrize(("command", "case"), list(itertools.product(
    range(len(TRAINING)), range(len(BAD_PAIR_FILES))
)))  # fmt: skip
def test_training_refuses_each_bad_preference_file(cli, tiny_kit, tmp_path, command, case):
    data = write(tmp_path / "pairs.jsonl", BAD_PAIR_FILES[case])
    out = tmp_path / "out"
    result = cli(
        *TRAINING[command], "--base", str(tiny_kit), "--data", str(data), "--out", str(out)
    )
    assert_refused(result, "pairs.jsonl")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["pairs.jsonl"]


@pytest.mark.parametrize("command", [["reward", "train"], ["align", "dpo"]])
def test_training_refuses_bad_bases_and_outputs(cli, tiny_kit, smol_kit, tmp_path, command):
    data = write(tmp_path / "pairs.jsonl", json.dumps(GOOD_PAIR) + "\n" + json.dumps(GOOD_PAIR))

    def run(base, out, *more):
        return cli(*command, "--base", str(base), "--data", str(data), "--out", str(out), *more)

    assert_refused(run(tmp_path / "none", tmp_path / "o"), "none")
    gguf = next(smol_kit.glob("*.gguf"))
    assert_refused(run(gguf, tmp_path / "o"), "GGUF")
    a_file = write(tmp_path / "file", "x")
    assert_refused(run(tiny_kit, a_file), "is a file")
    full = tmp_path / "full"
    full.mkdir()
    write(full / "x", "y")
    assert_refused(run(tiny_kit, full), "not empty", "--overwrite")
    assert_refused(run(tiny_kit, a_file / "below"), "is a file")


def test_pairs_refuses_folders_and_bad_rules(cli, tiny_kit, tmp_path):
    from test_experiments import write_spec

    spec = write_spec(tmp_path, tiny_kit, samples=2)
    store = tmp_path / "s.db"
    assert cli("run", str(spec), "--out", str(store)).code == 0
    folder = tmp_path / "folder"
    folder.mkdir()
    good = ["--chosen", 'sexo == "femenino"', "--rejected", 'sexo == "masculino"']
    assert_refused(cli("pairs", str(store), *good, "--out", str(folder)), "is a folder")
    a_file = write(tmp_path / "file", "x")
    assert_refused(cli("pairs", str(store), *good, "--out", str(a_file / "p.jsonl")), "is a file")
    for chosen, words in [
        ("sexoo == 'x'", "sexoo"),
        ("(((", "chosen rule"),
        ("import os", "chosen rule"),
        ("", "chosen"),
    ]:
        result = cli(
            "pairs",
            str(store),
            "--chosen",
            chosen,
            "--rejected",
            "valid",
            "--out",
            str(tmp_path / "p.jsonl"),
        )
        assert_refused(result, words)
    assert_refused(
        cli("pairs", str(tmp_path / "none.db"), *good, "--out", str(tmp_path / "p.jsonl")),
        "none.db",
    )
    assert_refused(
        cli("pairs", str(store), *good, "--run", "99", "--out", str(tmp_path / "p.jsonl")), "99"
    )
    assert not (tmp_path / "p.jsonl").exists()


def test_reward_score_refuses_stores_and_folders_by_name(cli, tmp_path):
    folder = tmp_path / "rm"
    folder.mkdir()
    store = write(tmp_path / "s.db", "not a store")
    assert_refused(
        cli("reward", "score", str(tmp_path / "none.db"), "--reward", str(folder)), "none.db"
    )
    for record, words in [
        (None, "has no muestra-train.json"),
        ("{", "is damaged"),
        ('{"kind": "dpo"}', "'dpo'"),
        ("[]", "reward"),
    ]:
        if record is not None:
            write(folder / "muestra-train.json", record)
        assert_refused(
            cli("reward", "score", str(store), "--reward", str(folder)), str(folder), words
        )
    write(folder / "muestra-train.partial", "")
    assert_refused(cli("reward", "score", str(store), "--reward", str(folder)), "did not finish")
    assert not (tmp_path / "s.db.lock").exists()


# ---- the server's lm-eval routes ---------------------------------------------------------

HOSTILE_IDS = [True, False, 1.5, "1", None, -1, 10**12, [1], {"a": 1}, 2**63]
HOSTILE_TEXT = ["\ud800", "a\udfffb", 5, None, True, ["a"], {"a": "b"}]
HOSTILE_FLAGS = ["yes", 1, 0, "true", None, [True], 1.0]


def lmeval_cases() -> list[tuple[str, dict]]:
    cases = []
    for text in HOSTILE_TEXT:
        cases.append(("/tokenize", {"prompt": text}))
    for flag in HOSTILE_FLAGS:
        cases.append(("/tokenize", {"prompt": "hola", "add_special_tokens": flag}))
    cases += [("/tokenize", {}), ("/tokenize", {"prompt": "a", "extra": 1})]
    for token in HOSTILE_IDS:
        cases.append(("/detokenize", {"tokens": [1, token]}))
        cases.append(
            (
                "/v1/completions",
                {**TEXT, "prompt": [1, token], "echo": True, "max_tokens": 0, "logprobs": 1},
            )
        )
        cases.append(("/v1/completions", {**TEXT, "prompt": [[1, 2], [token]]}))
    cases += [
        ("/detokenize", {"tokens": "abc"}),
        ("/detokenize", {}),
        ("/detokenize", {"tokens": None}),
    ]
    for echo_body in (
        {"stream": True},
        {"n": 2},
        {"max_tokens": 2},
        {"max_tokens": 1, "temperature": 0.5},
        {"echo": "yes"},
        {"logprobs": 21},
        {"prompt": ["a"] * 9},
    ):
        cases.append(("/v1/completions", {**TEXT, "echo": True, "max_tokens": 0, **echo_body}))
    return cases


@pytest.fixture(scope="module")
def lm_http(tiny_kit):
    with served_app(tiny_kit, max_rows_per_request=8) as client:
        yield client


def test_lm_eval_routes_refuse_every_hostile_body_with_a_4xx(lm_http):
    cases = lmeval_cases()
    assert len(cases) >= 45
    failures = []
    for route, body in cases:
        raw = json.dumps(body).encode("utf-8", "surrogatepass")
        response = lm_http.post(route, content=raw, headers={"content-type": "application/json"})
        try:
            assert_openai_error(response)
        except (AssertionError, ValueError, KeyError) as err:
            failures.append((route, json.dumps(body)[-80:], response.status_code, str(err)[:80]))
    assert not failures, failures[:10]
    assert lm_http.get("/health").json()["rows_running"] == 0


def test_the_lm_eval_routes_named_cases(lm_http):
    surrogate = lm_http.post(
        "/tokenize", content=b'{"prompt": "\\ud800"}', headers={"content-type": "application/json"}
    )
    assert "surrogate" in assert_openai_error(surrogate, 400)["message"]
    flag = lm_http.post("/tokenize", json={"prompt": "hola", "add_special_tokens": "yes"})
    assert assert_openai_error(flag, 400)["param"] == "add_special_tokens"
    for token in (True, 1.5):
        error = assert_openai_error(
            lm_http.post("/v1/completions", json={**TEXT, "prompt": [1, token]}), 400
        )
        assert error["param"] == "prompt" and "prompt.str" not in error["message"]
        assert "[1]" in error["message"] and "whole number" in error["message"]
    echo = {**TEXT, "prompt": [[1, 2]] * 9, "echo": True, "max_tokens": 0}
    assert (
        assert_openai_error(lm_http.post("/v1/completions", json=echo), 413)["code"]
        == "too_many_rows"
    )
    context = lm_http.get("/v1/models").json()["data"][0]["max_model_len"]
    huge = lm_http.post("/detokenize", json={"tokens": [1] * (8 * context + 1)})
    assert assert_openai_error(huge, 413)["code"] == "too_many_tokens"
    assert lm_http.post("/detokenize", json={"tokens": [1, 2]}).status_code == 200


# ---- GGUF headers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def malformed_ggufs(tmp_path_factory) -> list[tuple[str, Path]]:
    folder = tmp_path_factory.mktemp("ggufs")
    cases = mutations(base_gguf(folder / "base.gguf"))
    return [
        (label, write(folder / f"case{i:03d}.gguf", data)) for i, (label, data) in enumerate(cases)
    ]


def test_every_malformed_gguf_header_is_one_line_naming_the_file(cli, malformed_ggufs):
    """Magic, version, counts, key/string/array lengths, value and item types, tensor
    infos and truncations: on either runtime, exit 2 and one line naming the file — never
    a traceback (a header claiming a 2⁶²-byte key ended in numpy's IndexError) and never a
    model that runs."""
    assert len(malformed_ggufs) >= 50
    failures = []
    for label, path in malformed_ggufs:
        for runtime in (["--runtime", "llamacpp", "--threads", "1"], ["--runtime", "torch"]):
            result = cli("generate", str(path), "--prompt", "hi", "--max-new-tokens", "1", *runtime)
            lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
            if (
                result.code != 2
                or "Traceback" in result.stderr
                or len(lines) != 1
                or path.name not in lines[0]
            ):
                failures.append((label, runtime[1], result.code, result.stderr[-300:]))
    assert not failures, failures[:5]


def test_a_malformed_gguf_is_refused_by_tokens_and_before_any_allocation(cli, malformed_ggufs):
    """The tokenizer-only path refuses too; and a header claiming 2⁶² entries is refused
    without allocating anything sized by it (the reader's peak stays under 1 MiB)."""
    import tracemalloc

    from muestra.errors import InputError
    from muestra.models.gguf_header import read_gguf_header

    huge = [(label, path) for label, path in malformed_ggufs if "4611686018427387904" in label]
    assert len(huge) >= 6
    for label, path in huge:
        assert_refused(cli("tokens", str(path), "hola"), path.name)
        tracemalloc.start()
        with pytest.raises(InputError, match=r"is not a readable GGUF file \(.*4,611,686,018,"):
            read_gguf_header(path)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 1 << 20, (label, peak)
