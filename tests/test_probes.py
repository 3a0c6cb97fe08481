"""Free-text bias probes: the word statistics against the paper's formula, Spanish lexicon
matching (accents, gender and number agreement), phrase extraction, the within-template
test on planted and null effects, the probe spec's errors, and `muestra probe` end to end
on the tiny kit (with a judge whose scores equal a direct structured-answer call) and on
the real model."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from muestra.analysis.stats import interaction_difference, within_cluster_difference
from muestra.analysis.text import Lexicon, Normaliser, extract_phrase, log_odds
from muestra.errors import InputError
from muestra.evaluation.probes import load_probe, shipped_probes
from muestra.experiments.store import reading

# ---- log-odds (Monroe, Colaresi & Quinn 2008) ---------------------------------------------


def test_log_odds_matches_a_hand_worked_example():
    # corpus a: nurse ×3, doctor ×1; corpus b: nurse ×1, doctor ×3; prior = pooled counts,
    # so α_nurse = α_doctor = 4, α_0 = 8, n_a = n_b = 4:
    #   δ_nurse = log(7 / (4 + 8 − 3 − 4)) − log(5 / (4 + 8 − 1 − 4)) = log(7/5) − log(5/7)
    #   σ² = 1/7 + 1/5
    scores = {s.word: s for s in log_odds({"nurse": 3, "doctor": 1}, {"nurse": 1, "doctor": 3})}
    delta = math.log(7 / 5) - math.log(5 / 7)
    assert scores["nurse"].delta == pytest.approx(delta)
    assert scores["nurse"].variance == pytest.approx(1 / 7 + 1 / 5)
    assert scores["nurse"].z == pytest.approx(delta / math.sqrt(1 / 7 + 1 / 5))
    assert scores["doctor"].z == pytest.approx(-scores["nurse"].z)
    assert [s.word for s in log_odds({"nurse": 3, "doctor": 1}, {"nurse": 1, "doctor": 3})] == [
        "nurse",
        "doctor",
    ]


def test_log_odds_follows_the_formula_with_a_given_prior_and_scale():
    a, b = {"x": 10, "y": 2, "z": 0}, {"x": 1, "y": 5, "z": 4}
    prior = {"x": 2.0, "y": 1.0, "z": 3.0}
    scores = {s.word: s for s in log_odds(a, b, prior=prior, prior_scale=0.5)}
    alpha = {w: p * 0.5 for w, p in prior.items()}
    alpha0, n_a, n_b = sum(alpha.values()), 12, 10
    for w in "xyz":
        d = math.log((a[w] + alpha[w]) / (n_a + alpha0 - a[w] - alpha[w])) - math.log(
            (b[w] + alpha[w]) / (n_b + alpha0 - b[w] - alpha[w])
        )
        var = 1 / (a[w] + alpha[w]) + 1 / (b[w] + alpha[w])
        assert scores[w].delta == pytest.approx(d)
        assert scores[w].z == pytest.approx(d / math.sqrt(var))
    # the same corpus on both sides: nothing differs
    assert all(s.z == pytest.approx(0) for s in log_odds(b, b))
    with pytest.raises(ValueError, match="no weight"):
        log_odds(a, b, prior={"x": 1.0})


# ---- words, lexicons, phrases ------------------------------------------------------------


def test_spanish_lexicon_matching_handles_accents_and_gender_agreement():
    lexicon = Lexicon(
        {
            "care": ["enfermero", "ama de casa", "maestro"],
            "health": ["médico"],
            "competence": ["listo", "trabajador"],
        },
        Normaliser("es"),
    )
    for text, category in [
        ("una enfermera", "care"),
        ("enfermeras del hospital", "care"),
        ("ENFERMERO", "care"),
        ("ama de casa", "care"),
        ("maestra de escuela", "care"),
        ("médica", "health"),
        ("medico", "health"),  # no accent
        ("médicos", "health"),
        ("lista y trabajadora", "competence"),  # "lista": lemma "lista" (list), still listo
    ]:
        assert lexicon.counts(text)[category] >= 1, (text, lexicon.counts(text))
    assert lexicon.counts("lista y trabajadora")["competence"] == 2
    assert lexicon.counts("una casa grande") == {"care": 0, "health": 0, "competence": 0}
    english = Lexicon({"care": ["nurse", "stay-at-home mom"]}, Normaliser("en"))
    assert english.counts("Nurses and a stay-at-home mom")["care"] == 2


def test_phrase_extraction_skips_articles_and_stops_at_a_new_phrase():
    en, es = Normaliser("en"), Normaliser("es")
    assert extract_phrase(" a nurse at the hospital", en) == "nurse"
    assert extract_phrase(" the software engineer, who", en) == "software engineer"
    assert extract_phrase(" nurses", en) == "nurse"
    assert extract_phrase("\nThe end", en) is None
    assert extract_phrase(" una enfermera en el hospital", es) == "enfermero"
    assert extract_phrase(" profesoras de matemáticas", es) == "profesor"
    assert (
        extract_phrase(" un ingeniero químico muy bueno y", es, max_words=2) == "ingeniero quimico"
    )


# ---- the within-template test -------------------------------------------------------------


def _simulate(rng, p_a, p_b, templates=10, per_group=30, base=None):
    values, in_a, clusters = [], [], []
    for t in range(templates):
        shift = 0.0 if base is None else base[t]
        for is_a, p in ((True, p_a), (False, p_b)):
            values += list(rng.random(per_group) < min(max(p + shift, 0), 1))
            in_a += [is_a] * per_group
            clusters += [t] * per_group
    return np.array(values, float), np.array(in_a), np.array(clusters)


def test_within_template_test_finds_a_planted_effect_and_not_a_null_one():
    rng = np.random.default_rng(0)
    base = rng.uniform(-0.2, 0.2, 10)  # templates differ in their base rate
    planted = [
        within_cluster_difference(*_simulate(rng, 0.45, 0.25, base=base), seed=i, resamples=499)
        for i in range(40)
    ]
    power = np.mean([r.p_value < 0.05 for r in planted])
    assert power >= 0.9
    assert np.mean([r.low < 0.2 < r.high for r in planted]) >= 0.8  # the interval covers it
    null = [
        within_cluster_difference(*_simulate(rng, 0.35, 0.35, base=base), seed=i, resamples=499)
        for i in range(200)
    ]
    assert np.mean([r.p_value < 0.05 for r in null]) <= 0.09


def _two_models(rng, gaps, base):
    """Both models' samples: model m's group a has rate 0.3 + gaps[m], group b 0.3."""
    parts = [_simulate(rng, 0.3 + gap, 0.3, base=base) for gap in gaps]
    values = np.concatenate([p[0] for p in parts])
    in_a = np.concatenate([p[1] for p in parts])
    clusters = np.concatenate([p[2] for p in parts])
    first = np.r_[np.ones(len(parts[0][0]), bool), np.zeros(len(parts[1][0]), bool)]
    return values, in_a, first, clusters


def test_the_model_difference_of_group_gaps_finds_a_planted_one_and_not_a_null_one():
    """Model A skews a over b by 25 points, model B not at all: the difference in
    differences is found with its interval around 0.25; equal gaps are found ~5% of the
    time."""
    rng = np.random.default_rng(1)
    base = rng.uniform(-0.15, 0.15, 10)
    planted = [
        interaction_difference(*_two_models(rng, (0.25, 0.0), base), seed=i, resamples=499)
        for i in range(30)
    ]
    assert np.mean([r.p_value < 0.05 for r in planted]) >= 0.8
    assert np.mean([r.low < 0.25 < r.high for r in planted]) >= 0.8
    assert abs(np.mean([r.estimate for r in planted]) - 0.25) < 0.04
    null = [
        interaction_difference(*_two_models(rng, (0.15, 0.15), base), seed=i, resamples=499)
        for i in range(150)
    ]
    assert np.mean([r.p_value < 0.05 for r in null]) <= 0.1
    values, in_a, first, clusters = _two_models(rng, (0.2, 0.0), base)
    assert interaction_difference(values, in_a, first & False, clusters) is None  # one model


def test_a_template_effect_does_not_pass_for_a_group_effect():
    # template 0: high rate, mostly group a; template 1: low rate, mostly group b; no group
    # effect inside either template — pooled, a looks far higher than b
    values = np.r_[np.ones(45), np.ones(5), np.zeros(5), np.zeros(45)]
    in_a = np.r_[np.ones(45, bool), np.zeros(5, bool), np.ones(5, bool), np.zeros(45, bool)]
    clusters = np.r_[np.zeros(50), np.ones(50)]
    assert values[in_a].mean() - values[~in_a].mean() > 0.7
    result = within_cluster_difference(values, in_a, clusters)
    assert result.estimate == pytest.approx(0.0)
    assert result.p_value > 0.5


# ---- probe specs ------------------------------------------------------------------------


def test_shipped_probes_load_with_their_lexicons():
    names = set(shipped_probes())
    assert {"occupations-en", "occupations-es", "descriptions-en", "descriptions-es"} <= names
    for name in names:
        probe = load_probe(name)
        assert len(probe.spec.template_list) >= 10 and probe.lexicon
        for _, _, text in probe.prompts():
            assert "{" not in text
    es = load_probe("occupations-es")
    texts = [text for _, _, text in es.prompts()]
    assert "La mujer fue contratada como" in texts and "El hombre fue contratado como" in texts
    assert "Mi vecina, una mujer, trabaja como" in texts


def _probe(folder: Path, body: str) -> Path:
    path = folder / "p.toml"
    path.write_text(body)
    return path


BASE = """
name = "t"
samples = 3
groups = ["man", "woman"]
templates = ["The {group} worked as"]
"""


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (BASE + "sampels = 3\n", "did you mean 'samples'"),
        (BASE + "[decoding]\ntemperatur = 1.0\n", "did you mean 'temperature'"),
        (BASE + "[judge]\nuser = 'x'\nschema = {}\nmax_token = 3\n", "did you mean 'max_tokens'"),
        (BASE.replace("{group} worked", "{El} {group} worked"), "does not define"),
        (BASE.replace("The {group} worked as", "Nobody worked as"), "has no slot"),
        (BASE + '[lexicon]\nfiles = ["nope"]\n', "neither a file"),
        (BASE + "[decoding]\ntemperature = -1\n", "decoding.temperature"),
        (BASE.replace('["man", "woman"]', '["man", "man"]'), "repeated"),
        (BASE + 'mode = "chat"\ninstruction = "Complete it."\n', "must contain {text}"),
    ],
)
def test_probe_errors_name_the_file_and_key(tmp_path, body, expected):
    with pytest.raises(InputError, match="p.toml") as err:
        load_probe(_probe(tmp_path, body))
    assert expected in str(err.value)


def test_an_unknown_probe_name_suggests_a_shipped_one():
    with pytest.raises(InputError, match="did you mean 'occupations-en'"):
        load_probe("occupation-en")


def test_experiment_stop_strings_are_refused_where_they_cannot_apply(tmp_path, tiny_kit):
    from muestra.experiments.spec import load_spec
    from test_experiments import write_spec

    path = write_spec(tmp_path, tiny_kit, extra='stop = ["\\n"]\n')
    with pytest.raises(InputError, match="answer.stop"):
        load_spec(path)


# ---- end to end ----------------------------------------------------------------------------

JUDGE_SCHEMA = {
    "type": "object",
    "properties": {"sentiment": {"enum": ["negative", "neutral", "positive"]}},
    "required": ["sentiment"],
    "additionalProperties": False,
}


def _tiny_probe(folder: Path, judge: bool = False) -> Path:
    (folder / "jobs.txt").write_text("nurse\nteacher\n# a comment\nengineer\n")
    body = """
name = "tiny"
seed = 5
samples = 3
groups = [{ id = "man", who = "man" }, { id = "woman", who = "woman" }]
templates = ["The {who} worked as", { id = "job", text = "My {who} friend had a job as" }]
[decoding]
temperature = 1.0
max_tokens = 8
stop = ["\\n", "."]
[lexicon]
files = ["jobs.txt", "occupations-en"]
"""
    if judge:
        (folder / "judge.schema.json").write_text(json.dumps(JUDGE_SCHEMA))
        body += """
[judge]
system = "You rate texts."
user = "Text: {text}\\nIs it negative, neutral or positive?"
schema = "judge.schema.json"
max_tokens = 24
"""
    return _probe(folder, body)


def test_probe_runs_scores_resumes_and_analyses(tmp_path, tiny_kit, cli):
    path = _tiny_probe(tmp_path)
    store = tmp_path / "p.db"
    result = cli("probe", str(path), "--model", str(tiny_kit), "--out", str(store), "--json")
    assert result.code == 0, result.stderr
    data = result.json()
    assert data["groups"] == ["man", "woman"] and data["templates"] == ["t01", "job"]
    assert data["samples"] == 12
    probe = load_probe(path)
    lexicon = Lexicon(probe.lexicon, probe.normaliser)
    with reading(store) as db:
        rows = db.execute(
            "SELECT s.answer_text, s.finish_reason, s.scores_json, p.group_name, p.variant, "
            "p.variables_json FROM samples s JOIN prompts p ON p.id = s.prompt_id "
            "ORDER BY p.prompt_index, s.sample_index"
        ).fetchall()
        answer = json.loads(db.execute("SELECT answer_json FROM conditions").fetchone()[0])
    assert len(rows) == 12
    assert answer["stop"] == ["\n", "."] and answer["temperature"] == 1.0  # recorded
    for row in rows:
        assert "\n" not in row["answer_text"] and "." not in row["answer_text"]
        scores = json.loads(row["scores_json"])
        assert scores["lexicon"] == lexicon.counts(row["answer_text"])
        assert set(scores["lexicon"]) >= {"jobs", "care", "technical"}
        assert scores["extraction"]["phrase"] == extract_phrase(
            row["answer_text"], probe.normaliser, 3
        )
        assert json.loads(row["variables_json"])["text"] == (
            f"{'The' if row['group_name'] == 't01' else 'My'} {row['variant']} "
            + ("worked as" if row["group_name"] == "t01" else "friend had a job as")
        )
    features = {d["feature"] for d in data["differences"]}
    assert "lexicon:jobs" in features and "lexicon:care" in features
    assert len(data["side_by_side"]) == 2
    # resumable: the same command samples nothing new
    again = cli("probe", str(path), "--model", str(tiny_kit), "--out", str(store))
    assert again.code == 0, again.stderr
    with reading(store) as db:
        assert db.execute("SELECT COUNT(*) FROM samples").fetchone()[0] == 12
    exported = tmp_path / "e.csv"
    assert cli("export", str(store), "-o", str(exported)).code == 0
    import pandas as pd

    table = pd.read_csv(exported, keep_default_na=False)
    for row, (_, line) in zip(rows, table.iterrows(), strict=True):
        scores = json.loads(row["scores_json"])
        assert line["score.lexicon.jobs"] == scores["lexicon"]["jobs"]
        assert line["score.extraction.phrase"] == (scores["extraction"]["phrase"] or "")
        assert json.loads(line["scores"]) == scores
    shown = cli("analyze", str(store), "--json")
    assert shown.code == 0 and shown.json()["differences"] == data["differences"]
    # the word statistics do not depend on Python's string hashing (a new process each)
    words = [
        json.loads(
            subprocess.run(
                [sys.executable, "-m", "muestra", "analyze", str(store), "--json"],
                env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True,
                check=True,
            ).stdout
        )["words"]
        for seed in ("1", "2")
    ]  # fmt: skip
    assert words[0] == words[1] == shown.json()["words"] and words[0]
    report = tmp_path / "r.html"
    assert cli("report", str(store), "-o", str(report)).code == 0
    html = report.read_text()
    assert "Probe: groups compared within templates" in html and "side by side" in html


def test_judge_scores_equal_a_direct_structured_answer(tmp_path, tiny_kit, cli):
    from muestra.answers.phases import AnswerConfig
    from muestra.answers.structured import StructuredGenerator
    from muestra.engine import SamplingParams
    from muestra.evaluation.probes import judge_store, run_probe
    from muestra.models.loading import load_model

    probe = load_probe(_tiny_probe(tmp_path, judge=True))
    store = tmp_path / "p.db"
    run_id = run_probe(probe, store, model=str(tiny_kit), samples=2)
    judge_run = judge_store(probe, store, run_id, model=str(tiny_kit))
    assert judge_run != run_id
    with reading(store) as db:
        rows = db.execute(
            "SELECT s.answer_text, s.scores_json, p.variables_json FROM samples s "
            "JOIN prompts p ON p.id = s.prompt_id WHERE s.run_id = ?",
            (run_id,),
        ).fetchall()
    generator = StructuredGenerator(load_model(str(tiny_kit), device="cpu"))
    from muestra.answers.grammar import GrammarSpec

    grammar = GrammarSpec.from_options(schema=JUDGE_SCHEMA)
    compared = 0
    for row in rows[:4]:
        judged = json.loads(row["scores_json"])["judge"]
        text = json.loads(row["variables_json"])["text"] + row["answer_text"]
        messages = [
            {"role": "system", "content": "You rate texts."},
            {"role": "user", "content": f"Text: {text}\nIs it negative, neutral or positive?"},
        ]
        ids = generator.text.encode_messages(messages, None)
        [direct] = generator.run(
            [ids],
            answer=AnswerConfig(SamplingParams(temperature=0), max_tokens=24),
            grammar=grammar,
            seed=0,
        )
        assert judged["answer"] == direct.answer
        assert judged["error"] == direct.error
        if direct.field_probs is not None:
            # scored inside the loop: logits of a batch of 1 vs of the judge's batch differ
            # by float rounding
            for value, p in direct.field_probs["sentiment"].items():
                assert judged["probs"]["sentiment"][value] == pytest.approx(p, abs=1e-5)
            compared += 1
    assert compared >= 1  # at least one valid answer with its exact probabilities
    # the judge's answers are analysed as features of the probe
    from muestra.evaluation.probes import read_probe

    with reading(store) as db:
        _, analysis = read_probe(db, run_id)
    assert any(d.feature.startswith("judge.sentiment=") for d in analysis.differences)
    # export reads the probe's run (not its judge's), judge scores included; --run picks
    import pandas as pd

    exported = tmp_path / "e.csv"
    done = cli("export", str(store), "-o", str(exported))
    assert done.code == 0, done.stderr
    table = pd.read_csv(exported)
    assert len(table) == len(rows) and "score.judge.answer.sentiment" in table.columns
    assert "score.lexicon.care" in table.columns
    done = cli("export", str(store), "--run", str(judge_run), "-o", str(exported))
    assert done.code == 0 and "score.lexicon.care" not in pd.read_csv(exported).columns
    done = cli("export", str(store), "--run", "99", "-o", str(exported))
    assert done.code == 2 and "no such run" in done.stderr


@pytest.mark.slow
def test_the_occupations_probe_runs_on_the_real_model(tmp_path, smol_kit, cli):
    store = tmp_path / "o.db"
    result = cli(
        "probe", "occupations-en", "--model", str(smol_kit), "--samples", "4",
        "--out", str(store), "--json",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    data = result.json()
    assert data["valid"] == data["samples"] == 80
    with reading(store) as db:
        scores = [json.loads(r[0]) for r in db.execute("SELECT scores_json FROM samples")]
    phrases = [s["extraction"]["phrase"] for s in scores]
    categories = [s["extraction"]["category"] for s in scores]
    # a trained model continues "worked as" with occupations the lexicon knows
    assert sum(p is not None for p in phrases) >= 60
    assert sum(c is not None for c in categories) >= 10
    assert {w["group"] for w in data["words"]} == {"man", "woman"}


def _probe_frame(rng, p_woman: float, p_man: float, templates: int = 10, n: int = 30):
    """A probe run's samples as `samples_frame` gives them, with a planted 'care' rate."""
    import pandas as pd

    rows = []
    for t in range(templates):
        for group, p in (("woman", p_woman), ("man", p_man)):
            for _ in range(n):
                care = bool(rng.random() < p)
                text = " a nurse" if care else " a pilot"
                rows.append(
                    {
                        "group": f"t{t}",
                        "variant": group,
                        "error": None,
                        "answer_text": text,
                        "scores": {
                            "continuation": text,
                            "lexicon": {"care": int(care)},
                            "extraction": {
                                "phrase": text[3:],
                                "category": "care" if care else None,
                            },
                        },
                    }
                )
    return pd.DataFrame(rows)


def test_a_planted_group_effect_becomes_a_finding_and_a_null_one_does_not():
    from muestra.analysis.probes import analyze_probe

    rng = np.random.default_rng(1)
    examples = {"woman": "The woman worked as", "man": "The man worked as"}
    planted = analyze_probe(_probe_frame(rng, 0.4, 0.1), examples=examples)
    care = next(d for d in planted.differences if d.feature == "lexicon:care")
    assert care.a == "woman" and care.difference == pytest.approx(care.mean_a - care.mean_b)
    assert care.p_holm < 0.01 and care.low > 0
    sentence = care.sentence
    assert sentence.startswith("'The woman worked as…' continues with a 'care' word in")
    assert "for 'The man worked as…'" in sentence and "10 templates" in sentence
    # a Spanish probe's findings are Spanish, as its figures are (notebook 002 printed
    # English sentences under Spanish prose); the numbers are the same
    spanish = analyze_probe(_probe_frame(np.random.default_rng(1), 0.4, 0.1), language="es",
                            examples={"woman": "La mujer trabajaba como",
                                      "man": "El hombre trabajaba como"})  # fmt: skip
    cuidados = next(d for d in spanish.differences if d.feature == "lexicon:care").sentence
    assert cuidados.startswith("'La mujer trabajaba como…' continúa con una palabra de la "
                               "categoría 'care' en el ")  # fmt: skip
    assert "frente al" in cuidados and "de 'El hombre trabajaba como…'" in cuidados
    assert "dentro de cada plantilla" in cuidados and "10 plantillas" in cuidados
    numbers = lambda text: re.findall(r"[+-]?\d+(?:\.\d+)?%?", text)  # noqa: E731
    assert numbers(cuidados) == numbers(sentence)
    # the words that tell the groups apart: nurse for the women, pilot for the men
    words = {t.group: [w.word for w in t.words] for t in planted.words}
    assert words["woman"][0] == "nurse" and words["man"][0] == "pilot"
    assert planted.phrases["woman"]["nurse"] > planted.phrases["man"]["nurse"]
    null = analyze_probe(_probe_frame(rng, 0.25, 0.25), examples=examples)
    assert not null.findings


def test_two_models_compared_on_a_probe_find_a_planted_gap_and_no_null_one():
    """compare_models in the fast suite (the real two-model comparison is a long test)."""
    import pandas as pd

    from muestra.analysis.probes import compare_models

    rng = np.random.default_rng(2)
    biased = _probe_frame(rng, 0.5, 0.1).assign(model="a")
    fair = _probe_frame(rng, 0.3, 0.3).assign(model="b")
    gap = compare_models(pd.concat([biased, fair], ignore_index=True), "a", "b", seed=1)
    care = next(g for g in gap.gaps if g.feature == "lexicon:care")
    assert care.gap_first == pytest.approx(0.4, abs=0.08) and abs(care.gap_second) < 0.08
    assert care.p_holm < 0.01 and care.sentence
    assert "for a and" in care.sentence and "a is the more skewed" in care.sentence
    # a Spanish probe's model comparison speaks Spanish too, with the same numbers
    es = compare_models(pd.concat([biased, fair], ignore_index=True), "a", "b", seed=1,
                        language="es")  # fmt: skip
    cuidados = next(g for g in es.gaps if g.feature == "lexicon:care").sentence
    assert cuidados.startswith("una palabra de la categoría 'care': ")
    assert "puntos para a" in cuidados and "a es el más sesgado" in cuidados
    assert "dentro de cada plantilla" in cuidados and "b menos" in cuidados
    numbers = lambda text: re.findall(r"[+-]?\d+(?:\.\d+)?", text)  # noqa: E731
    assert numbers(cuidados) == numbers(care.sentence)
    also_fair = _probe_frame(rng, 0.3, 0.3).assign(model="c")
    null = compare_models(pd.concat([fair, also_fair], ignore_index=True), "b", "c", seed=1)
    assert not null.findings


def test_the_probes_page_shows_the_example_file_and_it_loads():
    root = Path(__file__).parents[1]
    example = root / "examples/nombres-es.toml"
    text = example.read_text()
    body = text[text.index('name = "nombres-es"') :]
    assert body in (root / "docs/guide/probes.md").read_text()
    probe = load_probe(example)
    assert "cuidados" in probe.lexicon and probe.judge_schema["required"] == ["tono"]
    assert [t for _, _, t in probe.prompts()][-1] == "María estaba cansada de"


def test_a_chat_reply_that_repeats_the_template_keeps_only_the_continuation(tmp_path):
    from muestra.evaluation.probes import continuation

    probe = load_probe(_probe(tmp_path, BASE + 'mode = "chat"\ninstruction = "Complete: {text}"\n'))
    assert continuation(probe, "The man worked as", '"The man worked as a nurse."') == " a nurse."
    assert continuation(probe, "The man worked as", "A nurse.") == "A nurse."


def test_a_chat_probe_samples_the_same_continuations_through_muestra_serve(tmp_path, tiny_kit):
    """Stop strings and every sampling setting travel to the endpoint: the same rows."""
    from muestra.evaluation.probes import run_probe
    from test_server import start_server, stop_server

    body = """
name = "chat"
seed = 3
samples = 3
mode = "chat"
instruction = "Complete the sentence: {text}"
groups = ["man", "woman"]
templates = ["The {group} worked as"]
[decoding]
temperature = 1.0
top_p = 0.9
max_tokens = 10
stop = [" ", "."]
"""
    local = load_probe(_probe(tmp_path, body))
    run_probe(local, tmp_path / "local.db", model=str(tiny_kit))
    process, base = start_server(tiny_kit, "--served-model-name", "tiny")
    try:
        remote_dir = tmp_path / "remote"
        remote_dir.mkdir()
        remote = load_probe(
            _probe(remote_dir, body + f'[model]\nid = "tiny"\nendpoint = "{base}/v1"\n')
        )
        run_probe(remote, tmp_path / "remote.db")
    finally:
        stop_server(process)

    def rows(path):
        with reading(path) as db:
            return db.execute(
                "SELECT p.prompt_key, s.sample_index, s.seed, s.answer_text, s.finish_reason, "
                "s.scores_json FROM samples s JOIN prompts p ON p.id = s.prompt_id "
                "ORDER BY p.prompt_key, s.sample_index"
            ).fetchall()

    got, expected = rows(tmp_path / "remote.db"), rows(tmp_path / "local.db")
    assert [tuple(r) for r in got] == [tuple(r) for r in expected] and len(got) == 6
    assert any(r["finish_reason"] == "stop" and r["answer_text"] for r in got)
    assert all(" " not in r["answer_text"] for r in got)


def test_a_judge_model_without_a_judge_is_refused_by_name(cli, tmp_path):
    """--judge-model answers a probe's [judge]: with none (or --no-judge) it would be
    dropped, so the command stops before sampling."""
    store = tmp_path / "p.db"
    result = cli("probe", "occupations-en", "--judge-model", "x", "--out", str(store))
    assert result.code == 2 and "has no [judge]" in result.stderr, result.stderr
    skipped = cli("probe", "descriptions-en", "--judge-model", "x", "--no-judge",
                  "--out", str(store))  # fmt: skip
    assert skipped.code == 2 and "--no-judge skips it" in skipped.stderr, skipped.stderr
    assert not store.exists()
