"""Experiments as a user runs them: specs, the store, run/resume/kill, summary, export."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pandas as pd
import pytest

import helpers
from conftest import ROOT
from muestra.errors import InputError
from muestra.experiments.spec import load_spec
from muestra.experiments.store import connect, insert_samples

SCHEMA = {
    "type": "object",
    "properties": {
        "nombre": {"type": "string", "maxLength": 6},
        "sexo": {"enum": ["masculino", "femenino"]},
        "edad": {"type": "integer", "minimum": 18, "maximum": 99},
    },
    "required": ["nombre", "sexo", "edad"],
}


def write_spec(folder: Path, model: Path, samples: int = 6, extra: str = "") -> Path:
    return helpers.write_spec(
        folder,
        "exp",
        "",
        schema=SCHEMA,
        text=f'''
name = "prueba"
seed = 99
samples = {samples}

[model]
id = "{model}"

[prompt]
system = 'Responde en JSON: {{ "nombre": str }}'
user = "Personaje para: <{{descripcion}}>"

[[prompt.items]]
id = "a"
descripcion = "Soy fuerte."
group = "g"
variant = "x"

[[prompt.items]]
id = "b"
descripcion = "Soy amable."
group = "g"
variant = "y"

[think]
budget = 6
temperature = 1.0

[answer]
max_tokens = 40
schema = "p.schema.json"
{extra}''',
    )


def test_store_schema_through_migrations(tmp_path):
    db = connect(tmp_path / "s.db")
    assert [r[0] for r in db.execute("SELECT name FROM _migrations ORDER BY id")] == [
        "m001_initial",
        "m002_beams",
        "m003_evals",
        "m004_probes",
        "m005_run_status",
        "m006_run_seeding_schema",
        "m007_stops",
        "m008_memory_plans",
    ]
    assert [r[1] for r in db.execute("PRAGMA table_info(runs)")][-3:] == [
        "seeding",
        "answer_schema_json",
        "stop_json",
    ]
    tables = sorted(r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'"))
    assert tables == [
        "_migrations",
        "conditions",
        "evals",
        "memory_plans",
        "models",
        "probes",
        "prompts",
        "runs",
        "samples",
        "stops",
    ]
    columns = [r[1] for r in db.execute("PRAGMA table_info(samples)")]
    assert columns == [
        "id",
        "run_id",
        "model_id",
        "condition_id",
        "prompt_id",
        "sample_index",
        "seed",
        "think_budget",
        "reasoning",
        "think_tokens",
        "budget_hit",
        "answer_text",
        "answer_json",
        "field_probs_json",
        "finish_reason",
        "error",
        "prompt_tokens",
        "completion_tokens",
        "batch_seconds",
        "muestra_version",
        "created_at",
        "beam_json",
        "scores_json",
        "endpoint",
    ]
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_run_summary_export_and_resume(cli, tiny_kit, tmp_path):
    spec = write_spec(tmp_path, tiny_kit)
    store = tmp_path / "out.db"
    dry = cli("run", str(spec), "--out", str(store), "--dry-run")
    assert dry.code == 0 and "12 to run" in dry.stderr
    assert list(tmp_path.glob("out.db*")) == []  # a dry run writes nothing
    first = cli("run", str(spec), "--out", str(store), "--batch", "4")
    assert first.code == 0, first.stderr
    again = cli("run", str(spec), "--out", str(store))
    assert again.code == 0 and "12 stored, 0 to run" in again.stderr
    before = store.read_bytes()
    dry = cli("run", str(spec), "--out", str(store), "--samples", "8", "--dry-run")
    assert dry.code == 0 and "12 stored, 4 to run" in dry.stderr, dry.stderr
    other = cli("run", str(spec), "--out", str(store), "--model", f"{tiny_kit}/", "--dry-run")
    assert other.code == 0 and "12 to run" in other.stderr, other.stderr
    assert store.read_bytes() == before  # planned on a copy: not even a model row is added
    more = cli("run", str(spec), "--out", str(store), "--samples", "8")
    assert "12 stored, 4 to run" in more.stderr
    summary = cli("summary", str(store), "--json")
    data = summary.json()
    assert set(data["groups"]) == {"a", "b"} and data["groups"]["a"]["samples"] == 8
    table = cli("summary", str(store), "--by", "condition", "--field", "sexo")
    assert table.code == 0 and "sexo" in table.stdout
    for fmt in ("csv", "parquet", "jsonl"):
        out = tmp_path / f"x.{fmt}"
        assert cli("export", str(store), "--format", fmt, "-o", str(out)).code == 0
    frame = pd.read_parquet(tmp_path / "x.parquet")
    assert len(frame) == 16
    assert {
        "nombre",
        "sexo",
        "edad",
        "prompt_id",
        "prompt",
        "sample",
        "condition",
        "model",
        "seed",
        "reasoning",
        "think_tokens",
        "budget_hit",
        "finish_reason",
        "error",
    } <= set(frame.columns)
    valid = frame[frame["error"].isna()]
    assert set(valid["sexo"]) <= {"masculino", "femenino"}
    assert (frame["think_tokens"] <= 6).all()


def test_changed_spec_is_refused(cli, tiny_kit, tmp_path):
    spec = write_spec(tmp_path, tiny_kit, samples=1)
    store = tmp_path / "s.db"
    assert cli("run", str(spec), "--out", str(store)).code == 0
    spec.write_text(spec.read_text().replace("seed = 99", "seed = 100"))
    refused = cli("run", str(spec), "--out", str(store))
    assert refused.code == 2 and "--force-new" in refused.stderr
    assert cli("run", str(spec), "--out", str(store), "--force-new").code == 0
    db = sqlite3.connect(store)
    assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 2


def _count(store: Path) -> int:
    try:
        with closing(sqlite3.connect(store, timeout=30)) as db:
            return db.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


@pytest.mark.long
def test_kill_9_then_resume_gives_exact_rows(tiny_kit, tmp_path, cli):
    """A run killed with SIGKILL right after it stored a batch, its resume killed the same
    way, then a resume to the end: the rows equal an uninterrupted run's. (Kills after
    fixed delays landed before the first batch: starting takes ~14 s here.)"""
    import muestra

    spec = write_spec(tmp_path, tiny_kit, samples=10)
    store = tmp_path / "k.db"
    command = [sys.executable, "-m", "muestra", "run", str(spec), "--out", str(store)]
    command += ["--batch", "3"]
    kills = []
    for _ in range(2):
        before = _count(store)
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while _count(store) == before and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills.append(_count(store))
    assert 0 < kills[0] < kills[1] < 20, f"each kill should land mid-run: {kills} rows stored"
    stopped = cli("summary", str(store), "--json")  # the killed run is shown as such
    assert stopped.json()["run_status"]["status"] == "stopped", stopped.stderr
    assert "is not finished — stopped" in stopped.stderr and "partial" in stopped.stderr
    assert subprocess.run(command, capture_output=True).returncode == 0
    done = cli("summary", str(store), "--json")
    assert done.json()["run_status"] == {"status": "done", "reason": None}
    assert "warning" not in done.stderr
    query = (
        "SELECT p.prompt_key, s.sample_index, s.answer_text, s.answer_json, s.error "
        "FROM samples s JOIN prompts p ON p.id = s.prompt_id"
    )
    rows = sqlite3.connect(store).execute(query).fetchall()
    assert len(rows) == 20 and len({(r[0], r[1]) for r in rows}) == 20
    for _, _, _, answer, error in rows:
        assert (answer is None) != (error is None)
    straight = tmp_path / "straight.db"
    muestra.run(spec, straight)
    reference = sqlite3.connect(straight).execute(query).fetchall()
    assert sorted(rows) == sorted(reference), "resumed samples differ from an uninterrupted run"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.replace("samples = 6", "samples = 6\nsampels = 3"), "did you mean 'samples'"),
        (lambda s: s.replace("[think]", "[think\n"), "TOML syntax error"),
        (lambda s: s.replace("samples = 6", 'samples = "six"'), "samples"),
        (lambda s: s.replace('descripcion = "Soy fuerte."', 'otra = "x"'), "descripcion"),
        (lambda s: s.replace("p.schema.json", "missing.json"), "missing.json"),
        (lambda s: s.replace("budget = 6", "budget = 6\nbudgte = 2"), "did you mean 'budget'"),
        (lambda s: s.replace("samples = 6", "sampels = 6"), "sampels; did you mean 'samples'"),
    ],
    ids=[
        "unknown-key",
        "toml-syntax",
        "wrong-type",
        "template-variable",
        "schema-file",
        "nested-key",
        "misspelled-required-key",
    ],
)
def test_spec_errors_exit_2_before_loading(cli, tiny_kit, tmp_path, change, message):
    spec = write_spec(tmp_path, tiny_kit)
    spec.write_text(change(spec.read_text()))
    result = cli("run", str(spec), "--out", str(tmp_path / "e.db"))
    assert result.code == 2, result.stderr
    assert message in result.stderr and str(spec) in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_schema_and_unknown_model(tmp_path, tiny_kit):
    spec = write_spec(tmp_path, tiny_kit)
    (tmp_path / "p.schema.json").write_text('{"type": "array", "uniqueItems": true}')
    with pytest.raises(InputError, match="uniqueItems"):
        load_spec(spec)
    spec = write_spec(tmp_path, tmp_path / "no-model")
    with pytest.raises(InputError, match="muestra kit build"):
        load_spec(spec)


def test_sweep_conditions(tmp_path, tiny_kit):
    extra = '\n[sweep]\n"think.temperature" = [0.5, 1.0]\n"answer.max_tokens" = [30, 40]\n'
    loaded = load_spec(write_spec(tmp_path, tiny_kit, extra=extra))
    assert len(loaded.conditions) == 4
    assert {c.think.temperature for c in loaded.conditions} == {0.5, 1.0}
    bad = write_spec(tmp_path, tiny_kit, extra='\n[sweep]\n"think.temprature" = [1]\n')
    with pytest.raises(InputError, match="think.temprature"):
        load_spec(bad)


def test_unwritable_store_and_full_disk(tmp_path):
    with pytest.raises(InputError, match="cannot open the store"):
        connect(Path("/proc/muestra-store.db"))
    db = connect(tmp_path / "full.db")
    db.execute(
        "INSERT INTO runs (name, spec_path, spec_text, spec_hash, seed, muestra_version, "
        "created_at) VALUES ('r', 'p', 't', 'h', 1, 'v', 'now')"
    )
    db.commit()

    with pytest.raises(InputError, match="disk is full"):
        insert_samples(_FullDiskProxy(db), [{"run_id": 1}])
    assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1


class _FullDiskProxy:
    """A connection whose writes fail as on a full disk."""

    def __init__(self, db):
        self.db = db

    def __enter__(self):
        return self.db.__enter__()

    def __exit__(self, *exc):
        return self.db.__exit__(*exc)

    def executemany(self, *args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")


def test_python_api(tiny_kit, tmp_path):
    import muestra

    run = muestra.run(write_spec(tmp_path, tiny_kit, samples=2), tmp_path / "api.db")
    frame = run.to_pandas()
    assert len(frame) == 4 and set(frame["prompt_id"]) == {"a", "b"}
    assert run.summary()["groups"]["a"]["samples"] == 2


def test_examples_parse():
    for name in ("personajes", "personajes-contrafactual", "personajes-barrido"):
        loaded = load_spec(ROOT / "examples" / f"{name}.toml")
        assert loaded.answer_schema["title"] == "Personaje"
    seed = load_spec(ROOT / "examples" / "personajes.toml")
    assert [i.think_budget for i in seed.spec.prompt.items] == [750, 1500]
    assert seed.spec.samples == 50 and seed.spec.model.id == "Qwen/Qwen3-4B-Thinking-2507"


def test_several_models_and_a_sweep_in_one_run(tiny_kit, hybrid_kit, tmp_path):
    import muestra

    spec = write_spec(tmp_path, tiny_kit, samples=2, extra='\n[sweep]\n"think.budget" = [2, 4]\n')
    text = spec.read_text().replace(
        f'[model]\nid = "{tiny_kit}"',
        f'[[models]]\nid = "{tiny_kit}"\nlabel = "tiny"\n\n'
        f'[[models]]\nid = "{hybrid_kit}"\nlabel = "hybrid"',
    )
    spec.write_text(text)
    frame = muestra.run(spec, tmp_path / "multi.db").to_pandas()
    assert len(frame) == 2 * 2 * 2 * 2  # models x conditions x prompts x samples
    assert set(frame["model"]) == {"tiny", "hybrid"}
    assert set(frame["condition"]) == {"think.budget=2", "think.budget=4"}
    for condition, budget in (("think.budget=2", 2), ("think.budget=4", 4)):
        assert (frame[frame["condition"] == condition]["think_tokens"] <= budget).all()
    # common random numbers: the same (prompt, sample) gets the same seed in every cell
    assert frame.groupby(["prompt_id", "sample"])["seed"].nunique().max() == 1
    # the analysis of a real run: models and conditions are compared inside each prompt
    from muestra.analysis import analyze
    from muestra.report.html import render

    result = analyze(frame)
    valid = frame[frame["error"].isna()]
    assert result.valid == len(valid) > 0
    by = {t.by: t for t in result.tests if t.field == "sexo"}
    if valid["sexo"].nunique() > 1:
        assert by and all(t.method == "chi2-stratified-permutation" for t in by.values())
    pairs = {(c.by, c.a, c.b) for c in result.comparisons if c.field == "sexo"}
    assert ("model", "hybrid", "tiny") in pairs
    assert ("condition", "think.budget=2", "think.budget=4") in pairs
    assert {p.level for p in result.pooled if p.field == "sexo"} >= {"all", "tiny", "hybrid"}
    page = render(
        {
            "name": "multi",
            "spec_path": str(spec),
            "spec_hash": "0" * 64,
            "created_at": "now",
            "muestra_version": "test",
        },
        [],
        frame,
        result,
    )
    assert 'class="forest"' in page and 'class="estimate"' in page


def _store_of_answers(path: Path, answers: list[dict]) -> Path:
    """A store with one run, model, condition and prompt holding `answers` as samples."""
    db = connect(path)
    with db:
        db.execute(
            "INSERT INTO runs (id, name, spec_path, spec_text, spec_hash, seed, "
            "muestra_version, created_at) VALUES (1, 'r', 'p', 't', 'h', 1, 'v', 'now')"
        )
        db.execute("INSERT INTO models (id, run_id, label, model_ref) VALUES (1, 1, 'm', 'm')")
        db.execute(
            "INSERT INTO conditions (id, run_id, label, overrides_json, answer_json) "
            "VALUES (1, 1, 'default', '{}', '{}')"
        )
        db.execute(
            "INSERT INTO prompts (id, run_id, prompt_index, prompt_key, messages_json, "
            "variables_json) VALUES (1, 1, 0, 'a', '\"x\"', '{}')"
        )
    rows = [
        {
            "run_id": 1,
            "model_id": 1,
            "condition_id": 1,
            "prompt_id": 1,
            "sample_index": i,
            "seed": i,
            "think_tokens": 0,
            "budget_hit": 0,
            "answer_text": json.dumps(answer),
            "answer_json": json.dumps(answer),
            "finish_reason": "stop",
            "prompt_tokens": 1,
            "completion_tokens": 1,
            "batch_seconds": 1.0,
            "muestra_version": "v",
            "created_at": "now",
        }
        for i, answer in enumerate(answers)
    ]
    insert_samples(db, rows)
    db.close()
    return path


def test_summary_of_a_free_text_field_counts_distinct_values_and_lists_the_top(cli, tmp_path):
    repeated = {"Ana": 12, "Luis": 8, "Eva": 5, "Juan": 4, "Rosa": 3}
    names = [n for n, times in repeated.items() for _ in range(times)]
    names += [f"Nombre{i:02d}" for i in range(35)]  # 40 distinct names in all
    answers = [
        {"nombre": n, "sexo": ("femenino", "masculino")[i % 2], "edad": 20 + i % 7}
        for i, n in enumerate(names)
    ]
    store = _store_of_answers(tmp_path / "nombres.db", answers)
    result = cli("summary", str(store), "--json")
    assert result.code == 0, result.stderr
    fields = result.json()["groups"]["a"]["fields"]
    assert fields["nombre"] == {
        "kind": "text",
        "distinct": 40,
        "top": [
            {"value": name, "count": count, "proportion": count / 67}
            for name, count in repeated.items()
        ],
        "n": 67,
    }
    assert fields["sexo"]["kind"] == "categorical" and len(fields["sexo"]["counts"]) == 2
    assert fields["edad"]["kind"] == "numeric"
    table = cli("summary", str(store))
    assert table.code == 0, table.stderr
    assert "nombre: 40 distinct values, the 5 most frequent" in table.stdout
    assert "(35 other values)" in table.stdout and "Nombre07" not in table.stdout
    # ten distinct values or fewer is still a categorical table with every value
    few = _store_of_answers(tmp_path / "pocos.db", [{"nombre": f"N{i % 10}"} for i in range(40)])
    counts = cli("summary", str(few), "--json").json()["groups"]["a"]["fields"]["nombre"]
    assert counts["kind"] == "categorical" and len(counts["counts"]) == 10


def test_a_condition_that_cannot_jump_forward_is_noted_once(cli, tiny_kit, tmp_path):
    """DoLa keeps grammar jump-forward off: the run says so on stderr, once per model and
    condition however many batches it takes; a run that jumps forward says nothing."""
    plain = cli("run", str(write_spec(tmp_path, tiny_kit, 4)), "--out", str(tmp_path / "a.db"))
    assert plain.code == 0 and "jump-forward" not in plain.stderr, plain.stderr
    spec = write_spec(tmp_path, tiny_kit, 4, extra='dola_layers = "high"\n')
    dola = cli("run", str(spec), "--out", str(tmp_path / "b.db"), "--batch", "2")
    assert dola.code == 0, dola.stderr
    notes = [line for line in dola.stderr.splitlines() if "jump-forward is off" in line]
    assert len(notes) == 1 and "DoLa" in notes[0] and notes[0].startswith("note: model"), notes


def test_a_model_given_with_a_tilde_is_the_same_model_in_the_store(
    cli, tiny_kit, tmp_path, monkeypatch
):
    """README's snippet: `muestra.run(..., model="~/…")` after the CLI ran the same folder
    (the shell expanded its ~) resumes the same rows instead of sampling them again."""
    import muestra

    monkeypatch.setenv("HOME", str(tiny_kit.parent))
    spec = write_spec(tmp_path, tiny_kit, samples=2)
    store = tmp_path / "t.db"
    assert cli("run", str(spec), "--out", str(store), "--model", str(tiny_kit)).code == 0
    muestra.run(spec, store, model=f"~/{tiny_kit.name}", samples=2)
    with closing(sqlite3.connect(store)) as db:
        assert db.execute("SELECT model_ref FROM models").fetchall() == [(str(tiny_kit),)]
        assert db.execute("SELECT count(*) FROM samples").fetchone()[0] == 4
