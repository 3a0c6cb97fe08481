"""`muestra eval`: question files, the four scoring methods, their statistics, the store."""

from __future__ import annotations

import json
import tomllib

import numpy as np
import pandas as pd
import pytest
import torch

from muestra.analysis.accuracy import majority, mcnemar, paired_bootstrap, vote_curve, vote_sizes
from muestra.errors import InputError
from muestra.evaluation import prompts
from muestra.evaluation.evaluate import EvalSettings, build_spec, evaluate, normalize, read_result
from muestra.evaluation.loglik import loglikelihoods
from muestra.evaluation.tasks import load_task
from muestra.experiments.toml_text import dump_toml

# ---- tasks -------------------------------------------------------------------------------


def test_shipped_sets_are_the_same_questions_in_two_languages():
    en, es = load_task("easy-en"), load_task("easy-es")
    assert len(en.items) == len(es.items) == 40 and len(en.shots) == len(es.shots) == 5
    assert [i.id for i in en.items] == [i.id for i in es.items]
    assert [i.answer for i in en.items] == [i.answer for i in es.items]
    assert sorted(pd.Series([i.answer for i in en.items]).value_counts()) == [10, 10, 10, 10]
    assert all(len(i.options) == 4 and len(set(i.options)) == 4 for i in en.items + es.items)
    assert en.items[0].answer_text == "Paris" and es.items[0].answer_text == "París"
    assert prompts.language_of(es).code == "es" and prompts.language_of(en).code == "en"
    assert len(en.categories) == 5


def test_mmlu_pro_and_prox_layouts(tmp_path):
    pro = pd.DataFrame(
        {
            "question_id": [7, 8],
            "question": ["2+2?", "Capital of Peru?"],
            "options": [["3", "4", "5", "N/A"], ["Lima", "Quito", "Cusco"]],
            "answer": ["B", "A"],
            "answer_index": [1, 0],
            "cot_content": ["", ""],
            "category": ["math", "geo"],
            "src": ["x", "y"],
        }
    )
    pro.to_parquet(tmp_path / "pro.parquet")
    task = load_task(tmp_path / "pro.parquet")
    assert [i.id for i in task.items] == ["7", "8"]
    assert task.items[0].options == ("3", "4", "5")  # trailing N/A padding dropped
    assert task.items[1].answer_text == "Lima"
    prox = pd.DataFrame(
        {
            "question_id": [1],
            "question": ["¿Cuánto es 2+2?"],
            **{f"option_{i}": [str(i + 2) if i < 4 else "N/A"] for i in range(10)},
            "answer": [None],
            "answer_index": [2],
            "category": ["mates"],
        }
    )
    prox.to_csv(tmp_path / "prox.csv", index=False)
    item = load_task(tmp_path / "prox.csv").items[0]
    assert item.options == ("2", "3", "4", "5") and item.answer == "C"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"id": "a", "question": "q", "options": ["x", "y"], "answer": "C"}, "`answer` must be"),
        ({"id": "a", "question": "q", "options": ["x"], "answer": "A"}, "2–10 texts"),
        ({"id": "a", "question": "", "options": ["x", "y"], "answer": "A"}, "`question`"),
        ({"question": "q", "options": ["x", "y"], "answer": "A"}, "missing `id`"),
        ({"id": "a", "question": "q", "options": "x", "answer": "A"}, "must be a list"),
    ],
)
def test_task_errors_name_the_file_row_and_field(tmp_path, row, message):
    path = tmp_path / "t.jsonl"
    path.write_text(
        json.dumps({"id": "ok", "question": "q", "options": ["a", "b"], "answer": "A"})
        + "\n"
        + json.dumps(row)
        + "\n"
    )
    with pytest.raises(InputError) as err:
        load_task(path)
    assert str(path) in str(err.value) and "row 2" in str(err.value) and message in str(err.value)


def test_task_file_and_cache_errors(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="does not exist.*easy-en"):
        load_task(tmp_path / "nope.jsonl")
    path = tmp_path / "dup.jsonl"
    line = json.dumps({"id": "a", "question": "q", "options": ["x", "y"], "answer": "A"})
    path.write_text(line + "\n" + line + "\n")
    with pytest.raises(InputError, match="unique; repeated: \\['a'\\]"):
        load_task(path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(InputError, match="not in the local Hugging Face cache"):
        load_task("hf:li-lab/MMLU-ProX:es")


def test_generated_spec_round_trips_through_toml():
    task = load_task("easy-es")
    loaded = build_spec("some/model", task, EvalSettings(method="choice", shots=2, limit=3))
    data = tomllib.loads(loaded.text)
    assert data == tomllib.loads(dump_toml(data))
    items = data["prompt"]["items"]
    assert [i["choice"] for i in items] == [["A", "B", "C", "D"]] * 3
    assert "Indica con una sola letra la opción correcta." in items[0]["text"]
    assert items[0]["text"].count("Respuesta:") == 2  # the two examples, answered
    assert loaded.spec.prompt.items[0].choice == ["A", "B", "C", "D"]


def test_method_refusals():
    task = load_task("easy-en")
    with pytest.raises(InputError, match="--method 'guess'"):
        EvalSettings(method="guess")
    with pytest.raises(InputError, match="--chat is for --method loglik"):
        EvalSettings(method="choice", chat=True)
    raw = build_spec("m", task, EvalSettings(method="cot", raw=True, limit=1))
    assert raw.spec.prompt.raw and raw.spec.prompt.items[0].variables["text"].endswith("Answer:")
    with pytest.raises(InputError, match="--shots 9, but .* has 5 dev questions"):
        build_spec("m", task, EvalSettings(shots=9))


CHANGED = {"format": "letters", "chat": True, "raw": True, "samples": 3, "think_budget": 64,
           "temperature": 0.5, "top_p": 0.8, "weighted": True, "regex": "(\\w+)"}  # fmt: skip
SCORING_ONLY = {"weighted", "regex"}  # read when the samples are scored, not in the spec


@pytest.mark.parametrize("method", ["choice", "loglik", "cot", "vote"])
def test_every_eval_setting_is_applied_or_refused_by_name(method, tmp_path):
    """The method × setting table walked: a setting the method does not use is refused
    (naming its flag) before anything runs; one it uses changes the generated spec."""
    from muestra.evaluation.evaluate import METHOD_SETTINGS, settings_for

    task = load_task("easy-en")
    plain = build_spec("m", task, EvalSettings(method=method, limit=2)).text
    for name, value in CHANGED.items():
        if method not in METHOD_SETTINGS[name]:
            with pytest.raises(InputError, match=f"--{name.replace('_', '-')}"):
                build_spec("m", task, EvalSettings(method=method, limit=2, **{name: value}))
            # a command listing several methods keeps the setting only where it applies
            assert getattr(settings_for(method, {name: value}), name) != value
            continue
        settings = EvalSettings(method=method, limit=2, **{name: value})
        if name == "regex":  # open questions only
            with pytest.raises(InputError, match="reads the answer of open questions"):
                build_spec("m", task, settings)
            continue
        spec = build_spec("m", task, settings).text
        assert (spec != plain) != (name in SCORING_ONLY), (method, name)


def test_the_eval_command_refuses_a_flag_no_method_uses(cli, tmp_path):
    missing = str(tmp_path / "no-model")
    result = cli("eval", missing, "easy-en", "--method", "choice,loglik", "--top-p", "0.9",
                 "--weighted", "--out", str(tmp_path / "e.db"))  # fmt: skip
    assert result.code == 2, result.stderr
    assert "--top-p (cot, vote)" in result.stderr and "--weighted (vote)" in result.stderr
    assert not (tmp_path / "e.db").exists()
    # a setting of one listed method is kept for it (and checked by it), not refused
    chat = cli("eval", missing, "easy-en", "--method", "loglik,choice", "--chat",
               "--out", str(tmp_path / "e.db"))  # fmt: skip
    assert chat.code == 2 and "--chat" not in chat.stderr and "no-model" in chat.stderr
    compare = cli("compare", missing, missing, "--task", "easy-en", "--method", "loglik",
                  "--samples", "3")  # fmt: skip
    assert compare.code == 2 and "--samples (choice, vote)" in compare.stderr, compare.stderr


# ---- statistics ---------------------------------------------------------------------------


def test_majority_and_the_vote_curve_by_hand():
    assert majority(["B", "A", "A", None]) == "A"
    assert majority(["B", "A"]) == "B"  # a tie goes to the answer seen first
    assert majority(["B", "A", "A"], weights=[0.9, 0.2, 0.3]) == "B"  # weighted: mass
    assert majority([None, None]) is None
    assert vote_sizes(6) == [1, 3, 5, 6] and vote_sizes(5) == [1, 3, 5]
    # q1: first path wrong, the majority of 3 and 5 right; q2: always right; q3: never
    votes = [["B", "A", "A", "C", "A"], ["A"] * 5, ["C", "C", "B", "B", "C"]]
    curve = vote_curve(votes, ["A", "A", "B"])
    assert [(k, a.correct) for k, a in curve] == [(1, 1), (3, 2), (5, 2)]


def test_mcnemar_and_paired_bootstrap_by_hand():
    a = [True] * 10 + [False] * 2 + [True] * 5
    b = [False] * 10 + [True] * 2 + [True] * 5
    test = mcnemar(a, b)
    assert (test.only_a, test.only_b) == (10, 2)
    assert test.p_value == pytest.approx(
        2 * sum(__import__("math").comb(12, k) for k in range(0, 3)) / 2**12
    )
    diff, low, high = paired_bootstrap(a, b)
    assert diff == pytest.approx(8 / 17) and low < diff < high and low > 0


def test_open_answers_are_normalised():
    assert normalize("  París. ") == "paris"
    assert normalize("La Ciudad de MÉXICO!") == "la ciudad de mexico"
    assert normalize("...") is None


# ---- log-likelihood: the oracle is a plain forward per option ---------------------------


def _reference(model, tokenizer, context, continuation):
    """lm-eval's definition, one full forward per (context, option), no cache."""
    encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    ctx = encode(context)
    cont = encode(context + continuation)[len(ctx) :]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ctx + cont])).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)
    picked = [logprobs[len(ctx) - 1 + j, t] for j, t in enumerate(cont)]
    greedy = all(logprobs[len(ctx) - 1 + j].argmax() == t for j, t in enumerate(cont))
    return float(sum(picked)), bool(greedy)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["cloze", "letters"])
def test_loglik_equals_one_forward_per_option(smol, fmt):
    task = load_task("easy-es")
    lang = prompts.language_of(task)
    items = task.items[:6]
    questions = [
        (prompts.loglik_context(i, fmt, lang), prompts.continuations(i, fmt)) for i in items
    ]
    encode = lambda t: smol.tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    got = loglikelihoods(smol.model, encode, questions, batch_questions=4)
    for (context, conts), scored in zip(questions, got, strict=True):
        for cont, s in zip(conts, scored, strict=True):
            value, greedy = _reference(smol.model, smol.tokenizer, context, cont)
            assert s.loglik == pytest.approx(value, abs=2e-4)
            assert s.is_greedy == greedy


@pytest.mark.slow
def test_choice_probabilities_are_the_softmax_over_letter_tokens(smol, smol_kit, tmp_path):
    """Each letter is one token after the assistant prompt: the exact probabilities are the
    model's next-token distribution renormalised over the four letters."""
    from muestra.models.inspection import render_chat

    task = load_task("easy-en")
    settings = EvalSettings(method="choice", limit=5)
    result = evaluate(str(smol_kit), task, settings, tmp_path / "e.db")
    letters = [smol.tokenizer.convert_tokens_to_ids(x) for x in "ABCD"]
    spec = build_spec(str(smol_kit), task, settings)
    for score, item in zip(result.items, spec.spec.prompt.items, strict=True):
        ids = render_chat(smol.tokenizer, [{"role": "user", "content": item.variables["text"]}])[1]
        with torch.no_grad():
            last = smol.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        expected = torch.softmax(last[letters], -1).tolist()
        assert [score.probs[x] for x in "ABCD"] == pytest.approx(expected, abs=1e-4)
        assert score.predicted == "ABCD"[int(np.argmax(expected))]
        assert score.p_correct == pytest.approx(expected["ABCD".index(score.answer)], abs=1e-4)
    assert result.expected[0] == pytest.approx(np.mean([s.p_correct for s in result.items]))


# ---- the command ----------------------------------------------------------------------------


def test_eval_command_json_store_and_resume(cli, tiny_kit, tmp_path):
    store = tmp_path / "e.db"
    args = (
        "eval",
        str(tiny_kit),
        "easy-en",
        "--method",
        "choice,loglik",
        "--n",
        "4",
        "--format",
        "letters",
        "--out",
        str(store),
        "--json",
    )
    first = cli(*args)
    assert first.code == 0, first.stderr
    data = first.json()
    choice, loglik = data["results"]
    assert choice["method"] == "choice" and loglik["method"] == "loglik"
    assert choice["total"] == loglik["total"] == 4
    for item in choice["items"]:
        assert set(item["probs"]) == {"A", "B", "C", "D"}
        assert sum(item["probs"].values()) == pytest.approx(1.0)
        assert item["correct"] == (item["predicted"] == item["answer"])
    for item in loglik["items"]:
        assert max(item["logliks"], key=item["logliks"].get) == item["predicted"]
    comparison = data["comparisons"][0]
    assert comparison["a"] == "choice" and 0 <= comparison["mcnemar"]["p_value"] <= 1
    again = cli(*args)
    assert again.code == 0 and again.json() == data  # read back from the store, nothing rerun
    import sqlite3

    db = sqlite3.connect(store)
    assert db.execute("SELECT method FROM evals ORDER BY run_id").fetchall() == [
        ("choice",),
        ("loglik",),
    ]
    assert db.execute("SELECT COUNT(*) FROM samples").fetchone()[0] == 8
    shown = cli(
        "eval",
        str(tiny_kit),
        "easy-en",
        "--method",
        "loglik",
        "--n",
        "4",
        "--format",
        "letters",
        "--out",
        str(store),
    )
    assert shown.code == 0 and "acc_norm" in shown.stdout and "95% interval" in shown.stdout


def test_open_questions_vote_on_normalised_answers(cli, tiny_kit, tmp_path):
    path = tmp_path / "open.jsonl"
    path.write_text(
        json.dumps({"id": "fr", "question": "¿Cuál es la capital de Francia?", "answer": "París"})
        + "\n"
    )
    result = cli(
        "eval",
        str(tiny_kit),
        str(path),
        "--method",
        "vote",
        "--samples-per-question",
        "4",
        "--out",
        str(tmp_path / "o.db"),
        "--json",
    )
    assert result.code == 0, result.stderr
    data = result.json()
    (item,) = data["items"]
    assert sum(item["votes"].values()) <= 4 and item["answer"] == "París"
    assert [p["k"] for p in data["vote_curve"]] == [1, 3, 4]
    refused = cli(
        "eval", str(tiny_kit), str(path), "--method", "choice", "--out", str(tmp_path / "x.db")
    )
    assert refused.code == 2 and "only --method vote scores them" in refused.stderr


def test_item_choice_is_refused_with_a_schema_or_an_endpoint(tmp_path):
    from muestra.experiments.spec import load_spec

    spec = tmp_path / "s.toml"
    spec.write_text(
        'name = "x"\nsamples = 1\n[model]\nid = "m"\n[prompt]\nuser = "{q}"\n'
        '[[prompt.items]]\nid = "a"\nq = "hola"\nchoice = ["A", "B"]\n'
        '[answer]\nregex = "[AB]"\n'
    )
    with pytest.raises(InputError, match="sets its own choice, but the answer is a regex"):
        load_spec(spec, check_models=False)
    spec.write_text(
        'name = "x"\nsamples = 1\n[model]\nid = "m"\nendpoint = "http://127.0.0.1:1/v1"\n'
        '[prompt]\nuser = "{q}"\n[[prompt.items]]\nid = "a"\nq = "hola"\nchoice = ["A", "B"]\n'
    )
    with pytest.raises(InputError, match="item's choice needs a local model"):
        load_spec(spec, check_models=False)


def test_read_result_refuses_a_store_without_evaluations(tmp_path):
    from muestra.experiments.store import connect

    connect(tmp_path / "s.db").close()
    with pytest.raises(InputError, match="holds no evaluation run"):
        read_result(tmp_path / "s.db")


def test_compare_two_models_on_a_task_and_the_report_section(cli, tiny_kit, gpt2_kit, tmp_path):
    store = tmp_path / "c.db"
    result = cli(
        "compare",
        str(tiny_kit),
        str(gpt2_kit),
        "--task",
        "easy-en",
        "--n",
        "5",
        "--out",
        str(store),
        "--json",
    )
    assert result.code == 0, result.stderr
    data = result.json()
    assert data["models"] == [str(tiny_kit), str(gpt2_kit)]
    assert [r["total"] for r in data["results"]] == [5, 5]
    accuracy = [r["accuracy"] for r in data["results"]]
    assert data["comparison"]["accuracy"] == pytest.approx(accuracy)
    for timing in data["timings"]:
        assert timing["load_seconds"] > 0 and timing["prefill_tps"] > 0
        assert timing["decode_tps"] > 0 and timing["weights_mb"] > 0
    html = tmp_path / "r.html"
    shown = cli("report", str(store), "-o", str(html))
    assert shown.code == 0, shown.stderr
    page = html.read_text()
    assert "<h2>Evaluations</h2>" in page and "McNemar" in page and "prefill tok/s" in page
    printed = cli(
        "compare",
        str(tiny_kit),
        str(gpt2_kit),
        "--task",
        "easy-en",
        "--n",
        "5",
        "--out",
        str(store),
    )
    assert printed.code == 0 and "side by side" in printed.stdout and "McNemar" in printed.stdout
    both = cli("compare", str(tiny_kit), str(gpt2_kit), "--out", str(store))
    assert both.code == 2 and "exactly one of --task" in both.stderr


@pytest.mark.long
def test_compare_two_models_on_a_spec(cli, tiny_kit, hybrid_kit, tmp_path):
    result = cli(
        "compare",
        str(tiny_kit),
        str(hybrid_kit),
        "--spec",
        "examples/characters.toml",
        "--samples",
        "2",
        "--out",
        str(tmp_path / "s.db"),
        "--json",
    )
    assert result.code == 0, result.stderr
    data = result.json()
    assert data["models"] == [str(tiny_kit), str(hybrid_kit)]
    assert data["analysis"]["samples"] == 2 * 2 * 2  # prompts × models × samples
    assert {row["prompt"] for row in data["side_by_side"]} == {"neutral_1", "neutral_2"}
    import sqlite3

    db = sqlite3.connect(tmp_path / "s.db")
    assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1
    labels = [r[0] for r in db.execute("SELECT label FROM models ORDER BY id")]
    assert labels == [str(tiny_kit), str(hybrid_kit)]


def test_a_dataset_in_the_local_hugging_face_cache(tmp_path, monkeypatch):
    """hf:OWNER/NAME:CONFIG reads the hub cache's snapshot (MMLU-ProX's layout), offline."""
    cache = tmp_path / "hub"
    repo = cache / "datasets--li-lab--MMLU-ProX"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    folder = repo / "snapshots" / "0123abcd" / "es"
    folder.mkdir(parents=True)

    def frame(ids: list[int]) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "question_id": ids,
                "question": [f"¿Pregunta {i}?" for i in ids],
                **{
                    f"option_{k}": [f"opción {k}" if k < 4 else "N/A"] * len(ids) for k in range(10)
                },
                "answer": ["B"] * len(ids),
                "answer_index": [1] * len(ids),
                "category": ["física"] * len(ids),
            }
        )

    frame([1, 2, 3]).to_parquet(folder / "test-00000-of-00001.parquet")
    frame([9]).to_parquet(folder / "validation-00000-of-00001.parquet")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = load_task("hf:li-lab/MMLU-ProX:es")
    assert [i.id for i in task.items] == ["1", "2", "3"] and [s.id for s in task.shots] == ["9"]
    assert task.items[0].options == ("opción 0", "opción 1", "opción 2", "opción 3")
    assert task.name == "MMLU-ProX-es" and prompts.language_of(task).code == "es"


@pytest.mark.slow
def test_choice_probabilities_agree_with_drawn_letters(smol_kit, tmp_path):
    """300 letters drawn at temperature 1 follow the exact probabilities (χ² test)."""
    from scipy import stats

    task = load_task("easy-en")
    settings = EvalSettings(method="choice", limit=1, samples=300)
    result = evaluate(str(smol_kit), task, settings, tmp_path / "d.db")
    from muestra.experiments.results import samples_frame
    from muestra.experiments.store import connect

    with connect(tmp_path / "d.db", create=False) as db:
        frame = samples_frame(db, result.run_id)
    counts = frame["answer"].value_counts()
    probs = result.items[0].probs
    observed = np.array([counts.get(x, 0) for x in "ABCD"])
    expected = np.array([probs[x] for x in "ABCD"]) * 300
    assert observed.sum() == 300
    assert stats.chisquare(observed, expected).pvalue > 0.001
    assert result.draws.total == 300
    assert result.draws.value == pytest.approx(observed["ABCD".index(result.items[0].answer)] / 300)


@pytest.mark.parametrize(
    ("work", "flags"),
    [
        (["--spec", "examples/characters.toml"], ["--seed", "3"]),
        (["--probe", "occupations-en"], ["--dtype", "float32", "--method", "choice"]),
    ],
)
def test_question_set_flags_with_a_spec_or_probe_are_refused_by_name(
    cli, tiny_kit, tmp_path, work, flags
):
    store = tmp_path / "c.db"
    result = cli("compare", str(tiny_kit), str(tiny_kit), *work, *flags, "--out", str(store))
    assert result.code == 2
    assert all(flag in result.stderr for flag in flags[::2]) and "--task only" in result.stderr
    assert not store.exists()
