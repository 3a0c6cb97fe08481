"""The seam from a user's settings to the decoding (issue 44): one declaration of every
sampling setting (muestra/settings.py), held to its bound on every surface before any
model loads; the runner's batch-executor seam; one bound for a runtime's threads."""

from __future__ import annotations

from pathlib import Path

import pytest

import helpers
from muestra.errors import InputError
from muestra.experiments.spec import load_spec
from muestra.settings import NAMES, PHASED, Sampling, flag, use


def outside(name: str) -> list[float | int]:
    """Values just outside each end of setting `name`'s declared bound (read from its
    declaration, so a new setting is tested as soon as it is declared)."""
    info = Sampling.model_fields[name]
    found = []
    for m in info.metadata:
        for key, step in (("gt", 0), ("ge", -1), ("lt", 0), ("le", 1)):
            if hasattr(m, key):
                value = getattr(m, key) + step
                found.append(int(value) if info.annotation is int else float(value))
    return found


BOUNDED = [name for name in NAMES if outside(name)]
CASES = [(name, value) for name in BOUNDED for value in outside(name)]


def test_every_numeric_setting_has_a_bound_to_test():
    # temperature, top_p, top_k, min_p, the penalties: each refuses something
    assert len(BOUNDED) == len(NAMES) - 1  # dola_layers is checked by shape, not a number
    assert outside("top_p") == [0.0, 2.0] and outside("min_p") == [-1.0, 1.0]


@pytest.mark.parametrize(
    "prefix,name,bad",
    [("", n, v) for n, v in CASES]
    + [(p, n, v) for p in ("think_", "answer_") for n, v in CASES if n in PHASED],
)
def test_generate_refuses_each_value_out_of_bounds_by_flag_before_loading(
    cli, tmp_path, prefix, name, bad
):
    """`--top-p 0` and `--min-p 1` passed typer and failed after the model loaded; every
    sampling flag is now held to its setting's bound first (the model does not exist)."""
    mode = ["--think-budget", "4"] if prefix else []
    result = cli(
        "generate", str(tmp_path / "no-model"), "--prompt", "x", *mode,
        flag(name, prefix), str(bad),
    )  # fmt: skip
    assert result.code == 2, result.stderr
    assert f"{flag(name, prefix)}={bad!r} is invalid" in result.stderr, result.stderr
    assert "no-model" not in result.stderr


@pytest.mark.parametrize("section", ["think", "answer"])
@pytest.mark.parametrize("name,bad", [(n, v) for n, v in CASES if n in PHASED])
def test_a_spec_refuses_each_phase_value_out_of_bounds(tmp_path, section, name, bad):
    spec = tmp_path / "s.toml"
    spec.write_text(
        f'name = "s"\nsamples = 1\n[model]\nid = "m"\n[prompt]\nuser = "u"\n'
        f'[[prompt.items]]\nid = "a"\n[{section}]\n{name} = {bad!r}\n'
    )
    with pytest.raises(InputError, match=f"{section}.{name}"):
        load_spec(spec, check_models=False)


@pytest.mark.parametrize("name,bad", CASES)
def test_the_server_refuses_each_value_out_of_bounds(name, bad):
    from pydantic import ValidationError

    from muestra.server.protocol import ChatRequest

    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    ChatRequest.model_validate(body | {name: Sampling.model_fields[name].default})
    if use(name).request_off == bad:  # top_k -1 is the OpenAI wire's "off"
        bad = bad - 1
    with pytest.raises(ValidationError, match=name):
        ChatRequest.model_validate(body | {name: bad})


def test_the_docs_table_lists_every_setting_with_its_flags_and_bound():
    from muestra.settings import markdown_table, rule

    table = markdown_table()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(NAMES)
    for name, row in zip(NAMES, rows, strict=True):
        assert flag(name) in row and rule(name) in row
        assert (flag(name, "think_") in row) == (name in PHASED)


# ---- the runner's batch-executor seam ---------------------------------------------------


def write_spec(folder: Path, samples: int = 3) -> Path:
    return helpers.write_spec(folder, "s", '[model]\nid = "m"', samples=samples)


class Echo:
    """An executor that samples nothing: each row answers with its prompt's variable."""

    def __init__(self) -> None:
        self.loaded: list[str] = []
        self.batches: list[list[tuple[str, list[int]]]] = []

    def load(self, runner, model):
        self.loaded.append(model.id)
        return "worker"

    def run_batch(self, runner, worker, batch):
        from muestra.answers.structured import StructuredSample

        assert worker == "worker"
        self.batches.append([(unit.item.id, samples) for unit, samples in batch])
        rows = []
        for unit, samples in batch:
            for index in samples:
                text = unit.item.variables["q"]
                sample = StructuredSample(
                    unit.prompt_index, index, index, text, [], "stop", None, 0, None, 0,
                    False, text, text, None, None,
                )  # fmt: skip
                rows.append(runner.row(unit, sample, None, 0.0))
        return rows


def test_a_custom_executor_runs_through_the_runner_and_resumes(tmp_path):
    from muestra.experiments.results import samples_frame
    from muestra.experiments.runner import Runner
    from muestra.experiments.store import connect

    spec, store = load_spec(write_spec(tmp_path), check_models=False), tmp_path / "s.db"
    echo = Echo()
    with Runner(spec, store, samples=2, executor=echo, batch_rows=3) as runner:
        runner.open()
        progress = runner.run()
    assert progress.done == 4 and echo.loaded == ["m"]
    assert echo.batches == [[("a", [0, 1]), ("b", [0])], [("b", [1])]]
    with Runner(spec, store, samples=3, executor=(again := Echo())) as runner:
        runner.open()
        runner.run()
    assert again.batches == [[("a", [2]), ("b", [2])]]  # only what was missing
    with connect(store, create=False) as db:
        frame = samples_frame(db, 1)
    assert sorted(zip(frame["prompt_id"], frame["answer_text"], strict=True)) == [
        ("a", "uno")] * 3 + [("b", "dos")] * 3  # fmt: skip


# ---- one bound for a runtime's threads (47-D) ---------------------------------------------


def test_threads_over_the_bound_are_refused_everywhere_before_loading(cli, tmp_path):
    from muestra.limits import MAX_THREADS
    from muestra.models.loading import load_model

    too_many = str(MAX_THREADS + 1)
    generate = cli("generate", str(tmp_path / "no-model"), "--prompt", "x", "--threads", too_many)
    assert generate.code == 2 and "--threads" in generate.stderr
    run = cli("run", str(write_spec(tmp_path)), "--threads", "10000")
    assert run.code == 2 and "--threads" in run.stderr
    with pytest.raises(
        InputError, match=f"threads=10,000 is over muestra's limit of {MAX_THREADS:,}"
    ):
        load_model(str(tmp_path / "no-model"), threads=10_000)  # before the path is looked at
    from muestra.experiments.runner import Runner

    spec = load_spec(write_spec(tmp_path), check_models=False)
    with pytest.raises(InputError, match="threads.*given on the command line"):
        Runner(spec, tmp_path / "s.db", model_options={"threads": 10_000})
    assert not (tmp_path / "s.db").exists()


# ---- a probe's scorers own both ends of their scores ------------------------------------


def test_each_probe_scorer_reads_back_the_records_it_writes():
    """The records `evaluation/probes/running.py` writes through each scorer come back
    from `analysis.probe_scores.features` as that scorer's features: the writer and the
    reader share the scorer's key and record, not two spellings of them."""
    import pandas as pd

    from muestra.analysis.probe_scores import CONTINUATION, EXTRACTION, JUDGE, LEXICON, features
    from muestra.analysis.text import Lexicon, Normaliser

    lexicon = Lexicon({"care": ["nurse"], "power": ["boss"]}, Normaliser("en", lemmas=False))
    texts = ["a nurse at night", "the boss of it", "a nurse again"]
    scores = [
        {
            CONTINUATION: text,
            LEXICON.key: LEXICON.record(text, lexicon),
            EXTRACTION.key: EXTRACTION.record(
                text.split()[1], lexicon.category_of(text.split()[1])
            ),
            JUDGE.key: JUDGE.record(
                {"tone": "warm" if "nurse" in text else "cold", "score": i}, None, None, "j", 2
            ),
        }
        for i, text in enumerate(texts)
    ]
    scored = features(pd.DataFrame({"scores": scores}))
    by_name = {f.name: f.values.tolist() for f in scored.features}
    assert by_name["lexicon:care"] == [1.0, 0.0, 1.0] and by_name["lexicon:power"] == [0, 1, 0]
    assert by_name["phrase=nurse"] == [1.0, 0.0, 1.0] and by_name["category=care"] == [1, 0, 1]
    assert by_name["judge.tone=warm"] == [1.0, 0.0, 1.0] and by_name["judge.score"] == [0, 1, 2]
    assert set(scored.categorical) == {EXTRACTION.phrase, EXTRACTION.category, "judge.tone"}


# ---- eval and compare: one set of question options, one default store ----------------


def test_eval_and_compare_share_their_question_options_and_the_librarys_defaults():
    """The options both commands take are one declaration, with `EvalSettings`'s defaults."""
    import typer

    from muestra.cli.app import app
    from muestra.evaluation.evaluate import EvalSettings

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    library = EvalSettings()
    shared = {
        "fmt": library.format, "shots": library.shots, "limit": library.limit,
        "think_budget": library.think_budget, "seed": library.seed, "dtype": library.dtype,
    }  # fmt: skip
    for name in ("eval", "compare"):
        params = {p.name: p for p in commands[name].params}
        for option, default in shared.items():
            assert params[option].default == default, (name, option)
    eval_params = {p.name: p for p in commands["eval"].params}
    compare_params = {p.name: p for p in commands["compare"].params}
    for option in shared:
        assert eval_params[option].opts == compare_params[option].opts
        assert eval_params[option].help == compare_params[option].help


def test_the_default_store_is_one_rule():
    from muestra.paths import default_store

    assert default_store("easy-en", "eval") == Path("eval-easy-en.db")
    assert default_store("easy-en", "compare") == Path("compare-easy-en.db")
    assert default_store("occupations-en") == Path("occupations-en.db")  # CLI and notebook
    assert default_store("prueba", beside=Path("/specs/exp.toml")) == Path("/specs/prueba.db")
