"""Sequential runs ([stop]) as a user runs them, on the tiny random-weight kit (its answers
mean nothing; the mechanics are what is tested): rounds, stops stored, resume replays the
same sequence, the rule refused when it cannot be followed."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

import pandas as pd
import pytest

from muestra.errors import InputError
from muestra.experiments.runner import Runner
from muestra.experiments.spec import load_spec
from muestra.experiments.stop_rules import field_probs_caveat


def write_spec(folder: Path, model: Path, stop: str, answer: str = "temperature = 1.0") -> Path:
    spec = folder / "seq.toml"
    spec.write_text(f'''
name = "secuencial"
seed = 7
samples = 40

[model]
id = "{model}"

[prompt]
user = "¿{{pregunta}}? Responde sí o no."

[[prompt.items]]
id = "a"
pregunta = "Es azul el cielo"

[[prompt.items]]
id = "b"
pregunta = "Es verde el mar"

[answer]
choice = ["si", "no"]
max_tokens = 4
{answer}

[stop]
{stop}
''')
    return spec


STOP = 'field = "answer"\nvalue = "si"\nprecision = 0.3\nmin_samples = 4\nevery = 4'


def run(spec: Path, store: Path, **kwargs) -> Runner:
    notes: list[str] = []
    runner = Runner(load_spec(spec), store, on_note=notes.append, **kwargs)
    with runner:
        runner.open()
        runner.run()
    runner.notes_given = notes  # type: ignore[attr-defined]
    return runner


def table(store: Path, sql: str) -> list[tuple]:
    with closing(sqlite3.connect(store)) as db:
        return db.execute(sql).fetchall()


@pytest.mark.slow
def test_cells_stop_when_settled_and_the_stops_are_stored(tmp_path, tiny_kit):
    spec = write_spec(tmp_path, tiny_kit, STOP)
    run(spec, tmp_path / "s.db")
    stops = table(
        tmp_path / "s.db",
        "SELECT p.prompt_key, reason, samples, used, estimator, low, high, tracked "
        "FROM stops t JOIN prompts p ON p.id = t.prompt_id ORDER BY p.prompt_key",
    )
    assert [s[0] for s in stops] == ["a", "b"]
    counts = dict(
        table(
            tmp_path / "s.db",
            "SELECT p.prompt_key, COUNT(*) FROM samples s JOIN prompts p ON p.id = s.prompt_id "
            "GROUP BY p.prompt_key",
        )
    )
    for prompt, reason, samples, used, estimator, low, high, tracked in stops:
        assert estimator == "field_probs" and tracked == "answer=si"  # drawn at T 1
        assert counts[prompt] == samples and samples % 4 == 0 and samples <= 40
        assert reason == "precision" and (high - low) / 2 <= 0.3 and used == samples
        assert samples < 40  # the exact probabilities settle well before the cap


def test_a_greedy_answer_is_counted_and_the_run_says_why(tmp_path, tiny_kit):
    stop = STOP.replace("precision = 0.3", "precision = 0.01") + "\nmax_samples = 8"
    spec = write_spec(tmp_path, tiny_kit, stop, answer="temperature = 0")
    runner = run(spec, tmp_path / "g.db")
    assert any("greedy (answer.temperature = 0)" in n for n in runner.notes_given)
    stops = table(tmp_path / "g.db", "SELECT estimator, reason, samples FROM stops")
    assert stops == [("counts", "max_samples", 8)] * 2


@pytest.mark.slow
def test_a_resumed_run_replays_the_same_sequence(tmp_path, tiny_kit):
    spec = write_spec(tmp_path, tiny_kit, STOP.replace("0.3", "0.2"))
    run(spec, tmp_path / "whole.db")

    class Interrupted(Exception):
        pass

    def interrupt(progress) -> None:  # after the first batch of the first round
        raise Interrupted

    runner = Runner(load_spec(spec), tmp_path / "cut.db", batch_rows=4)
    with runner:
        runner.open()
        with pytest.raises(Interrupted):
            runner.run(interrupt)
    assert table(tmp_path / "cut.db", "SELECT COUNT(*) FROM samples") == [(4,)]
    run(spec, tmp_path / "cut.db")
    query = (
        "SELECT p.prompt_key, sample_index, answer_text, field_probs_json FROM samples s "
        "JOIN prompts p ON p.id = s.prompt_id ORDER BY 1, 2"
    )
    resumed, whole = table(tmp_path / "cut.db", query), table(tmp_path / "whole.db", query)
    assert [r[:3] for r in resumed] == [r[:3] for r in whole]  # the same draws, in order
    # (the torch runtime's logits move ~1e-7 with the rows batched beside them)
    for a, b in zip(resumed, whole, strict=True):
        assert json.loads(a[3])["answer"] == pytest.approx(json.loads(b[3])["answer"], abs=1e-5)
    stops = "SELECT prompt_id, reason, samples, used, estimate, low, high FROM stops ORDER BY 1"
    cut, whole = table(tmp_path / "cut.db", stops), table(tmp_path / "whole.db", stops)
    assert len(cut) == len(whole) == 2
    for a, b in zip(cut, whole, strict=True):
        assert a[:4] == b[:4] and a[4:] == pytest.approx(b[4:], abs=1e-3)


@pytest.mark.slow
def test_a_difference_between_prompts_samples_them_in_pairs(tmp_path, tiny_kit):
    stop = STOP + '\ncompare = ["a", "b"]\nreference = 0.0'
    spec = write_spec(tmp_path, tiny_kit, stop)
    run(spec, tmp_path / "d.db")
    stops = table(tmp_path / "d.db", "SELECT tracked, reason, samples, low, high FROM stops")
    assert len(stops) == 2 and stops[0] == stops[1]  # one decision for the pair
    tracked, reason, samples, low, high = stops[0]
    assert tracked == "answer=si: a − b" and -1 <= low <= high <= 1
    assert reason in ("precision", "reference")
    counts = table(tmp_path / "d.db", "SELECT COUNT(*) FROM samples GROUP BY prompt_id")
    assert counts == [(samples,), (samples,)]


@pytest.mark.slow
def test_resuming_under_another_rule_is_refused(tmp_path, tiny_kit):
    spec = write_spec(tmp_path, tiny_kit, STOP)
    run(spec, tmp_path / "r.db")
    plain = write_spec(tmp_path, tiny_kit, STOP)
    text = plain.read_text()
    loaded = load_spec(plain)
    changed = loaded.spec.model_copy(
        update={"stop": loaded.spec.stop.model_copy(update={"precision": 0.1})}
    )
    from dataclasses import replace

    runner = Runner(replace(loaded, spec=changed), tmp_path / "r.db")
    with runner, pytest.raises(InputError, match="sampled with the \\[stop\\] rule"):
        runner.open()
        runner.run()
    assert plain.read_text() == text


@pytest.mark.parametrize(
    ("stop", "message"),
    [
        (
            'field = "sexo"\nvalue = "si"\nprecision = 0.1',
            'an answer without a schema is tracked as "answer"',
        ),
        (
            'field = "answer"\nvalue = "tal vez"\nprecision = 0.1',
            "is not a value of answer: si, no",
        ),
        ('field = "answer"\nvalue = "si"', "give precision, reference or both"),
        (
            'field = "answer"\nvalue = "si"\nprecision = 0.1\ncompare = ["a", "z"]',
            r"two prompt ids \(a, b\)",
        ),
        ('field = "answer"\nvalue = "si"\nprecision = 0.1\nestimator = "field_probs"', None),
        (
            'field = "answer"\nvalue = "si"\nprecision = 0.1\nmin_samples = 50\nmax_samples = 20',
            "is over max_samples",
        ),
    ],
)
def test_a_stop_table_the_run_cannot_follow_is_refused_by_name(tmp_path, stop, message):
    spec = write_spec(tmp_path, tmp_path, stop, answer="temperature = 1.0")
    if message is None:  # field_probs estimate these answers (T 1): accepted
        assert load_spec(spec, check_models=False).spec.stop.estimator == "field_probs"
        greedy = write_spec(tmp_path, tmp_path, stop, answer="temperature = 0")
        with pytest.raises(InputError, match="greedy .answer.temperature = 0. .condition"):
            load_spec(greedy, check_models=False)
        return
    with pytest.raises(InputError, match=message) as err:
        load_spec(spec, check_models=False)
    assert str(err.value).startswith(str(spec))


def test_field_probs_caveat_names_what_makes_them_another_quantity():
    from muestra.experiments.spec import AnswerSpec

    assert field_probs_caveat(AnswerSpec(temperature=1.0)) is None
    assert "greedy" in field_probs_caveat(AnswerSpec())
    assert "top_p = 0.9" in field_probs_caveat(AnswerSpec(temperature=1.0, top_p=0.9))
    assert "temperature = 0.7" in field_probs_caveat(AnswerSpec(temperature=0.7))
    assert "endpoint" in field_probs_caveat(AnswerSpec(temperature=1.0), remote=True)


def test_a_spanish_runs_analysis_says_its_notes_in_spanish(tmp_path, tiny_kit, cli):
    """The notes the store adds to the analysis (field_probs that are not the answers'
    share, the sequential rule) speak the analysis' language, as its findings do
    (notebook 000 printed them in English under "nota:")."""
    spec = write_spec(tmp_path, tiny_kit, STOP, answer="")  # a greedy answer
    spec.write_text(spec.read_text() + '\n[analysis]\nlanguage = "es"\n')
    store = tmp_path / "es.db"
    assert cli("run", str(spec), "--out", str(store)).code == 0
    notes = json.loads(cli("analyze", str(store), "--json").stdout)["notes"]
    assert ("condición default: las respuestas son voraces (answer.temperature = 0); "
            "field_probs (y su media) describen sorteos") in " ".join(notes), notes  # fmt: skip
    assert any(n.startswith("Ejecución secuencial: cada celda se muestreó en rondas de 4")
               for n in notes), notes  # fmt: skip
    assert not any("Sequential run" in n or "the answers" in n for n in notes), notes
    from muestra.notebook import open_run

    view = open_run(store)  # the run's summary speaks the spec's language too
    shown = " ".join(repr(view).split())
    assert shown.startswith("ejecución 1 · secuencial · done · ") and "muestras por celda" in shown
    assert "dónde se detuvo cada celda" in shown and "almacén: " in shown
    assert "nota: condición default: las respuestas son voraces" in shown, shown
    assert view.counted == {"default"}  # greedy: its band is drawn by counting only
    labels = view.plot_sequence(prompt="a").legends[0].get_texts()
    labels = {t.get_text() for t in labels}
    assert "conteo de respuestas" in labels and not any("Rao" in t for t in labels), labels
    from muestra.experiments.spec import AnswerSpec

    spanish = field_probs_caveat(AnswerSpec(temperature=1.0, top_p=0.9), lang="es")
    assert spanish == "las respuestas se sortean con answer.top_p = 0.9"


@pytest.mark.slow
def test_run_flags_and_every_view_show_the_stops(tmp_path, tiny_kit, cli):
    spec = write_spec(tmp_path, tiny_kit, STOP)
    spec.write_text(spec.read_text().split("[stop]")[0])  # no table: the flags make the run
    store = tmp_path / "f.db"
    flags = ["--stop-on", "answer=si", "--precision", "0.3", "--min-samples", "4", "--every", "4"]
    result = cli("run", str(spec), "--out", str(store), *flags)
    assert result.code == 0, result.stderr
    assert "sequential: each cell samples 4, then 4 a round" in result.stderr
    result = cli("summary", str(store))
    assert "where each cell stopped" in result.stdout and "within ±0.3" in result.stdout
    assert "Sequential run:" in result.stdout
    analyzed = json.loads(cli("analyze", str(store), "--json").stdout)
    cells = analyzed["stops"]["cells"]
    assert [c["prompt"] for c in cells] == ["a", "b"] and cells[0]["estimator"] == "field_probs"
    assert any(n.startswith("Sequential run:") for n in analyzed["notes"])
    assert cli("report", str(store), "-o", str(tmp_path / "r.html")).code == 0
    assert "Where each cell stopped" in (tmp_path / "r.html").read_text()
    # resumed without the flags: refused, the stops would not replay
    again = cli("run", str(spec), "--out", str(store))
    assert again.code != 0 and "with the [stop] rule" in again.stderr

    from muestra.notebook import open_run

    view = open_run(store)
    assert list(view.stops["samples"]) == [c["samples"] for c in cells]
    curve = view.sequence()
    assert set(curve["estimator"]) == {"counts", "field_probs"}
    fig = view.plot_sequence(prompt="b", lang="es")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "muestras con respuesta" and "proporción de si" in ax.get_ylabel()
    stopped = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert stopped and stopped[0].get_xdata()[0] == cells[1]["used"]
    assert "se detuvo" in " ".join(t.get_text() for t in fig.legends[0].get_texts())
    # a cell whose samples were not all answers: the line stands at the answers the band
    # used (the curves' count), and says both (notebook 000 drew it at 10, past a curve of 8)
    from muestra.report.plots import sequence_bands

    drawn = pd.DataFrame({"estimator": "counts", "n": range(1, 9), "estimate": 0.5,
                          "low": 0.1, "high": 0.9})  # fmt: skip
    fig = sequence_bands(drawn, "si", stopped_at=10, lang="es", used=8)
    (line,) = [x for x in fig.axes[0].get_lines() if x.get_linestyle() == "--"]
    assert line.get_xdata()[0] == 8
    assert "se detuvo (10 muestras, 8 con respuesta)" in [
        t.get_text() for t in fig.legends[0].get_texts()
    ]
    with pytest.raises(InputError, match="prompt_id 'z' is not in run"):
        view.plot_sequence(prompt="z")


def stored_sample(runner: Runner, prompt: str, index: int, answer: str | None, p_si: float):
    """A sample row as the runner writes it (answer None: an error)."""
    return {
        "run_id": runner.run_id, "model_id": runner.model_ids[str(runner.models[0].name)],
        "condition_id": runner.condition_ids["default"], "prompt_id": runner.prompt_ids[prompt],
        "sample_index": index, "seed": index, "think_budget": None, "reasoning": None,
        "think_tokens": 0, "budget_hit": 0, "answer_text": answer or "",
        "answer_json": None if answer is None else json.dumps(answer),
        "field_probs_json": None if answer is None else json.dumps(
            {"answer": {"si": p_si, "no": 1 - p_si}}),
        "beam_json": None, "finish_reason": "stop" if answer else "error",
        "error": None if answer else "invalid", "prompt_tokens": 3, "completion_tokens": 1,
        "batch_seconds": 0.1, "muestra_version": "test", "created_at": "now",
    }  # fmt: skip


def test_looks_skip_errors_and_ask_only_for_the_next_round(tmp_path, tiny_kit):
    """Stored samples alone decide: cell a (4 errors, then sure "si" answers) settles and
    its stop counts only its valid samples; cell b (a coin flip) is asked for exactly the
    next round's indices."""
    from muestra.experiments.stopping import Rounds
    from muestra.experiments.store import insert_samples

    spec = write_spec(tmp_path, tiny_kit, STOP.replace("0.3", "0.25"))
    runner = Runner(load_spec(spec), tmp_path / "h.db")
    with runner:
        runner.open()
        rows = [stored_sample(runner, "a", i, None if i < 4 else "si", 1.0) for i in range(16)]
        rows += [
            stored_sample(runner, "b", i, "si" if i % 2 else "no", 0.95 if i % 2 else 0.05)
            for i in range(16)
        ]
        insert_samples(runner.db, rows)
        rounds = Rounds(runner, runner.spec.spec.stop, runner.samples)
        units = next(rounds.of(runner.models[0].name))
        assert [(u.item.id, u.missing) for u in units] == [("b", (16, 17, 18, 19))]
        (stop,) = table(tmp_path / "h.db", "SELECT prompt_id, reason, samples, used FROM stops")
        # a settles at 16 samples, 12 of them valid (band [0.581, 1]: ±0.21)
        assert stop == (runner.prompt_ids["a"], "precision", 16, 12)


def test_a_sequential_vote_tracks_each_questions_right_letter():
    from muestra.evaluation.evaluate import EvalSettings, build_spec
    from muestra.evaluation.tasks import load_task

    task = load_task("easy-en")
    settings = EvalSettings(method="vote", samples=40, precision=0.1, reference=0.5, limit=2)
    loaded = build_spec("some/model", task, settings)
    stop = loaded.spec.stop
    assert (stop.field, stop.value, stop.max_samples) == ("answer", "{answer}", 40)
    assert (stop.precision, stop.reference, stop.estimator) == (0.1, 0.5, "auto")
    assert loaded.spec.prompt.items[0].variables["answer"] in "ABCD"
    with pytest.raises(InputError, match=r"--precision \(vote\)"):
        EvalSettings(method="choice", precision=0.1).check_applies()


def test_samples_and_max_samples_together_are_refused_by_name(tmp_path):
    spec = write_spec(tmp_path, tmp_path, STOP + "\nmax_samples = 20")
    loaded = load_spec(spec, check_models=False)
    with pytest.raises(InputError, match="--samples 30 and \\[stop\\] max_samples = 20"):
        Runner(loaded, tmp_path / "x.db", samples=30)
    assert Runner(loaded, tmp_path / "x.db").samples == 20  # the cap


def test_stop_flags_are_checked_as_the_table_is(tmp_path):
    from muestra.experiments.stopping import with_stop

    spec = write_spec(tmp_path, tmp_path, STOP)
    spec.write_text(spec.read_text().split("[stop]")[0])
    loaded = load_spec(spec, check_models=False)
    assert with_stop(loaded, {"precision": None}, "w") is loaded  # no flag: no change
    with pytest.raises(InputError, match="^w: a sequential run tracks one answer value"):
        with_stop(loaded, {"precision": 0.1}, "w")
    with pytest.raises(InputError, match=r"^w: precision: .*less than or equal to 0.5"):
        with_stop(loaded, {"field": "answer", "value": "si", "precision": 0.7}, "w")
    with pytest.raises(InputError, match="^w: \\[stop\\] value = 'x' is not a value of answer"):
        with_stop(loaded, {"field": "answer", "value": "x", "precision": 0.1}, "w")
    done = with_stop(loaded, {"field": "answer", "value": "si", "reference": 0.5}, "w")
    assert done.spec.stop.reference == 0.5 and done.text == loaded.text


def write_variants(folder: Path, model: Path, stop: str, second_g2: bool = True) -> Path:
    """Two groups of items, each with the variants x and y (g2's y optional)."""
    items = [("a1", "g1", "x"), ("a2", "g1", "y"), ("b1", "g2", "x")]
    items += [("b2", "g2", "y")] * second_g2
    spec = write_spec(folder, model, stop)
    head, tail = spec.read_text().split("[[prompt.items]]", 1)
    tail = tail[tail.index("[answer]") :]
    listed = "".join(
        f'[[prompt.items]]\nid = "{i}"\ngroup = "{g}"\nvariant = "{v}"\npregunta = "Es {i}"\n\n'
        for i, g, v in items
    )
    spec.write_text(head + listed + tail)
    return spec


@pytest.mark.slow
def test_two_variants_are_compared_in_pairs_within_each_group(tmp_path, tiny_kit):
    stop = STOP + '\ncompare = ["y", "x"]\nreference = 0.0'
    spec = write_variants(tmp_path, tiny_kit, stop)
    run(spec, tmp_path / "v.db")
    stops = table(
        tmp_path / "v.db",
        "SELECT p.prompt_key, tracked, reason, samples, estimate, low, high FROM stops t "
        "JOIN prompts p ON p.id = t.prompt_id ORDER BY p.prompt_key",
    )
    assert [s[0] for s in stops] == ["a1", "a2", "b1", "b2"]
    for first, second in ((stops[1], stops[0]), (stops[3], stops[2])):  # y − x in g1, g2
        assert first[1:] == second[1:]  # one decision for the pair
        assert first[1] == "answer=si: y − x"
    counts = dict(
        table(
            tmp_path / "v.db",
            "SELECT p.prompt_key, COUNT(*) FROM samples s JOIN prompts p ON p.id = s.prompt_id "
            "GROUP BY p.prompt_key",
        )
    )
    assert counts["a1"] == counts["a2"] == stops[0][3]
    assert counts["b1"] == counts["b2"] == stops[2][3]


def test_a_variant_without_its_partner_is_refused_by_name(tmp_path):
    stop = STOP + '\ncompare = ["x", "y"]'
    spec = write_variants(tmp_path, tmp_path, stop, second_g2=False)
    with pytest.raises(InputError, match="group 'g2' has no item of variant 'y'"):
        load_spec(spec, check_models=False)
    spec = write_variants(tmp_path, tmp_path, STOP + '\ncompare = ["x", "z"]')
    with pytest.raises(InputError, match=r"or two variants \(x, y\)"):
        load_spec(spec, check_models=False)
