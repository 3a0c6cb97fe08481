"""Careless specs are refused when loaded: one InputError naming the file, the key and the
value, exit code 2 through the CLI, and no model loaded nor store created first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import helpers
from muestra.errors import InputError
from muestra.experiments.spec import load_spec

SCHEMA = {"type": "object", "properties": {"sexo": {"enum": ["a", "b"]}}, "required": ["sexo"]}


def write_spec(folder: Path, answer: str = "", prompt: str = "", model: str = "org/modelo") -> Path:
    """A valid spec (a Hub id is not looked up at load time) with `answer` lines added."""
    return helpers.write_spec(
        folder,
        "exp",
        "",
        schema=SCHEMA,
        text=f'''
name = "prueba"
samples = 2
[model]
id = "{model}"
[prompt]
user = "Personaje: <{{descripcion}}>"
{prompt}
[[prompt.items]]
id = "corto"
descripcion = "Soy fuerte."
[answer]
{answer}
''',
    )


def refused(spec: Path, *fragments: str) -> str:
    with pytest.raises(InputError) as info:
        load_spec(spec)
    message = str(info.value)
    for fragment in (str(spec), *fragments):
        assert fragment in message, message
    return message


# ---- files that are not what they should be ----------------------------------------------


def test_spec_in_latin1_or_utf16_is_refused_by_encoding(tmp_path):
    spec = write_spec(tmp_path)
    text = spec.read_text().replace("Soy fuerte.", "Soy él.")
    spec.write_bytes(text.encode("latin-1"))
    refused(spec, "spec file", "not UTF-8", "0xe9", "save it as UTF-8")
    spec.write_bytes(text.encode("utf-16"))  # with its byte order mark
    refused(spec, "UTF-16", "save it as UTF-8")
    spec.write_bytes(b"\xef\xbb\xbf" + text.encode())  # UTF-8 with a BOM is UTF-8
    assert load_spec(spec).spec.prompt.items[0].variables["descripcion"] == "Soy él."


def test_schema_file_in_latin1_or_a_folder_is_refused(tmp_path):
    spec = write_spec(tmp_path, 'schema = "p.schema.json"')
    schema = tmp_path / "p.schema.json"
    schema.write_bytes(json.dumps({"description": "él"}, ensure_ascii=False).encode("latin-1"))
    refused(spec, "answer.schema", "p.schema.json", "not UTF-8", "save it as UTF-8")
    schema.unlink()
    schema.mkdir()
    refused(spec, "answer.schema", "p.schema.json", "is a folder")


def test_grammar_file_in_utf16_is_refused(tmp_path):
    spec = write_spec(tmp_path, 'grammar = "g.ebnf"')
    (tmp_path / "g.ebnf").write_bytes('root ::= "sí" | "no"'.encode("utf-16"))
    with pytest.raises(InputError, match=r"g\.ebnf is not UTF-8 text .*UTF-16"):
        load_spec(spec)


def test_deeply_nested_toml_is_refused_not_a_recursion_error(tmp_path):
    spec = write_spec(tmp_path)
    base = spec.read_text()
    spec.write_text(
        base.replace('id = "corto"', 'id = "corto"\nx = ' + "{a = " * 2000 + "1" + "}" * 2000)
    )
    refused(spec, "nested too deeply", "64 levels")
    spec.write_text(
        base.replace('id = "corto"', 'id = "corto"\nx = ' + "{a = " * 100 + "1" + "}" * 100)
    )
    refused(spec, "$.prompt.items[0].x.a.a", "more than 64 levels")


def test_deeply_nested_schema_file_is_refused(tmp_path):
    spec = write_spec(tmp_path, 'schema = "p.schema.json"')
    (tmp_path / "p.schema.json").write_text('{"items": ' * 3000 + "{}" + "}" * 3000)
    refused(spec, "answer.schema", "nested too deeply")


def test_two_answer_grammars_are_refused_once_by_name(tmp_path):
    spec = write_spec(tmp_path, 'regex = "[0-9]+"\nchoice = ["a", "b"]')
    refused(spec, "answer takes one of schema, regex, choice, grammar; got regex, choice")
    empty = write_spec(tmp_path, "choice = []")  # an empty list is a choice, not none
    refused(empty, "answer.choice", "at least two distinct")


# ---- what only failed after the model loaded ----------------------------------------------

LATE = {
    "one-choice": ('choice = ["x"]', ("answer.choice", "['x']", "at least two distinct")),
    "bad-ebnf": ('grammar = "g.ebnf"', ("answer.grammar", "g.ebnf", "EBNF parser error")),
    "bad-regex": ('regex = "(["', ("answer.regex", "'(['", "Unclosed '['")),
    "type-banana": (
        'schema = {type = "banana"}',
        ("answer.schema", "not a valid JSON Schema at $.type", "'banana'"),
    ),
    "dangling-ref": (
        'schema = {"$ref" = "#/$defs/persona"}',
        ("answer.schema", "#/$defs/persona", "does not compile"),
    ),
    "huge-prompt": ("", ("prompt.items[0]", "'corto'", "prompt.max_chars = 1,000,000")),
}


def _late_spec(tmp_path: Path, case: str, model: str = "org/modelo") -> Path:
    answer = LATE[case][0]
    spec = write_spec(tmp_path, answer, model=model)
    (tmp_path / "g.ebnf").write_text("root ::= (")
    if case == "huge-prompt":
        spec.write_text(spec.read_text().replace("Soy fuerte.", "x" * 10_000_000))
    return spec


@pytest.mark.parametrize("case", list(LATE))
def test_late_errors_are_refused_at_load(tmp_path, case):
    refused(_late_spec(tmp_path, case), *LATE[case][1])


@pytest.mark.parametrize("case", list(LATE))
def test_late_errors_exit_2_before_the_store_exists(cli, tmp_path, case):
    # a model folder that does not exist: had the spec passed, the run would stop there
    spec = _late_spec(tmp_path, case, model="./no-such-model")
    store = tmp_path / "e.db"
    result = cli("run", str(spec), "--out", str(store))
    assert result.code == 2, result.stderr
    assert all(fragment in result.stderr for fragment in LATE[case][1]), result.stderr
    assert "Traceback" not in result.stderr and "request 0" not in result.stderr
    assert not store.exists()


@pytest.mark.parametrize(
    ("schema", "fragments"),
    [
        ('{"$ref" = "http://example.com/p.json"}', ("'http://example.com/p.json'", "outside")),
        ('{"$ref" = "file:///etc/passwd"}', ("'file:///etc/passwd'", "outside")),
        ("{type = []}", ("type [] at $", "name at least one type")),
        (
            '{type = "object", properties = {a = {"$ref" = "other.json#/x"}}}',
            ("'other.json#/x' at $.properties.a", "$defs"),
        ),
    ],
)
def test_non_local_refs_and_empty_types_are_refused(tmp_path, schema, fragments):
    refused(write_spec(tmp_path, f"schema = {schema}"), "answer.schema", *fragments)


def test_a_swept_choice_names_its_condition(tmp_path):
    spec = write_spec(tmp_path, '[sweep]\n"answer.choice" = [["a", "b"], ["c"]]')
    refused(spec, "answer (answer.choice=['c']).choice", "['c']")


def test_valid_grammars_still_load_and_max_chars_is_a_setting(tmp_path):
    for answer in ('choice = ["sí", "no"]', 'regex = "[0-9]{3}"', 'schema = "p.schema.json"'):
        assert load_spec(write_spec(tmp_path, answer)).spec.answer is not None
    (tmp_path / "g.ebnf").write_text('root ::= "sí" | "no"')
    assert load_spec(write_spec(tmp_path, 'grammar = "g.ebnf"')).spec.answer.grammar == "g.ebnf"
    spec = write_spec(tmp_path, prompt="max_chars = 20")
    refused(spec, "(id 'corto') renders to 24 characters", "prompt.max_chars = 20")
    assert load_spec(write_spec(tmp_path, prompt="max_chars = 24")).spec.prompt.max_chars == 24
