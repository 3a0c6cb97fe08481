"""Answer grammars: specs, refused keywords, caches, forbidden tokens, value positions."""

from __future__ import annotations

import json

import pytest

from muestra.answers.answer_probs import categorical_fields, value_spans
from muestra.answers.grammar import GrammarBackend, GrammarSpec
from muestra.errors import InputError
from muestra.models.loading import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_kit):
    return load_tokenizer(str(tiny_kit))


@pytest.mark.parametrize("keyword", ["uniqueItems", "not", "multipleOf", "patternProperties", "if"])
def test_unenforced_keywords_are_refused_by_name_and_path(keyword):
    value = (
        {"type": "string"} if keyword in ("not", "if") else 3 if keyword == "multipleOf" else True
    )
    if keyword == "patternProperties":
        value = {"^a": {"type": "string"}}
    schema = {"type": "object", "properties": {"tags": {"type": "array", keyword: value}}}
    with pytest.raises(InputError, match=rf"{keyword}.*\$\.properties\.tags"):
        GrammarSpec.json_schema(schema)


def test_property_named_like_a_keyword_is_fine():
    spec = GrammarSpec.json_schema({"type": "object", "properties": {"not": {"type": "string"}}})
    assert spec.schema["properties"]["not"] == {"type": "string"}


def test_schema_file_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        GrammarSpec.json_schema(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(InputError, match="bad.json line 1"):
        GrammarSpec.json_schema(bad)


def test_schema_keeps_property_order():
    spec = GrammarSpec.json_schema(
        {"type": "object", "properties": {"z": {"type": "string"}, "a": {"type": "string"}}}
    )
    assert list(spec.schema["properties"]) == ["z", "a"]


def test_choice_validation():
    with pytest.raises(InputError, match="two distinct"):
        GrammarSpec.choice(["a", "a"])
    assert GrammarSpec.choice(["sí", "no"]).choices == ["sí", "no"]


def test_compile_cache_is_a_bounded_lru(tokenizer):
    specs = [GrammarSpec.regex(f"[a-z]{{{n}}}") for n in (1, 2, 3)]
    backend = GrammarBackend(tokenizer, 151936, [151645, 151643])
    first = backend.compile(specs[0])
    assert backend.compile(specs[0]) is first
    assert backend.stats == {"hits": 1, "compiles": 1, "evictions": 0}
    sizes = [backend.compile(spec).memory_size_bytes for spec in specs]
    assert min(sizes) > 0
    # room for grammars 0 and 2 only: adding 2 evicts the least recently used, 1
    limit = sizes[0] + sizes[2]
    backend = GrammarBackend(tokenizer, 151936, [151645, 151643], memory_limit_bytes=limit)
    backend.compile(specs[0])
    backend.compile(specs[1])
    backend.compile(specs[0])  # 0 is now the most recent
    backend.compile(specs[2])
    assert backend.stats["evictions"] == 1
    assert backend.cached(specs[0]) and backend.cached(specs[2]) and not backend.cached(specs[1])
    assert backend.memory_bytes <= backend.memory_limit_bytes
    # a grammar larger than the whole budget is still returned, and kept alone
    tiny = GrammarBackend(tokenizer, 151936, [151645, 151643], memory_limit_bytes=1)
    tiny.compile(specs[0])
    tiny.compile(specs[1])
    assert tiny.cached(specs[1]) and not tiny.cached(specs[0])


def test_forbidden_tokens(tokenizer, tmp_path):
    backend = GrammarBackend(tokenizer, 151936, [151645, 151643])
    for token in ("<think>", "</think>", "<|im_start|>", "<tool_call>", "<|fim_pad|>"):
        assert backend.forbidden[tokenizer.convert_tokens_to_ids(token)]
    assert not backend.forbidden[151645] and not backend.forbidden[151643]
    assert backend.forbidden[151700]  # config padding beyond the tokenizer


def test_bad_ebnf_is_a_clear_error(tokenizer, tmp_path):
    backend = GrammarBackend(tokenizer, 151936, [151645])
    with pytest.raises(InputError, match="does not compile"):
        backend.compile(GrammarSpec.ebnf("root ::= ("))


def test_categorical_fields_follow_refs_and_nesting():
    schema = {
        "$defs": {"Sexo": {"enum": ["masculino", "femenino"], "type": "string"}},
        "type": "object",
        "properties": {
            "sexo": {"$ref": "#/$defs/Sexo"},
            "vivo": {"type": "boolean"},
            "origen": {"type": "object", "properties": {"región": {"enum": ["norte", "sur"]}}},
            "nombre": {"type": "string"},
        },
    }
    assert categorical_fields(schema) == {
        "sexo": ["masculino", "femenino"],
        "vivo": [True, False],
        "origen.región": ["norte", "sur"],
    }


def test_value_spans():
    text = '{"a": "x", "b": {"c": [1, 2], "d": true}, "e": "ñ"}'
    spans = value_spans(text)
    assert text[slice(*spans["a"])] == '"x"'
    assert text[slice(*spans["b.d"])] == "true"
    assert text[slice(*spans["b.c"])] == "[1, 2]"
    assert json.loads(text[slice(*spans["e"])]) == "ñ"


def test_mask_application_equals_xgrammar_kernel(tokenizer, tmp_path):
    import torch
    import xgrammar as xgr

    backend = GrammarBackend(tokenizer, 151936, [151645, 151643])
    compiled = backend.compile(
        GrammarSpec.json_schema(
            {"type": "object", "properties": {"t": {"type": "string"}, "n": {"enum": ["sí", "no"]}}}
        )
    )
    prefixes = ["", '{"t": "ho', '{"t": "x", "n": "', '{"t": "x", "n": "no"}']
    matchers = []
    for prefix in prefixes:
        matcher = backend.matcher(compiled)
        assert matcher.accept_string(prefix)
        matchers.append(matcher)
    logits = torch.randn(6, 151936, generator=torch.Generator().manual_seed(0))
    rows = [0, 2, 3, 5]
    ours = logits.clone()
    backend.fill_and_apply(ours, matchers, rows)
    reference = logits.clone()
    bitmask = xgr.allocate_token_bitmask(6, 151936)
    for row, matcher in zip(rows, matchers, strict=True):
        matcher.fill_next_token_bitmask(bitmask, row)
    xgr.apply_token_bitmask_inplace(reference, bitmask, vocab_size=151936, indices=rows)
    reference[torch.tensor(rows).unsqueeze(1), backend.forbidden.nonzero().flatten()] = float(
        "-inf"
    )
    assert torch.equal(ours, reference)
    assert torch.equal(ours[[1, 4]], logits[[1, 4]])  # rows without a matcher are untouched
