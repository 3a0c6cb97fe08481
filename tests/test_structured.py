"""Think-then-answer generation with grammars, on the random tiny kit (the hardest case)."""

from __future__ import annotations

import enum
import math
import re

import jsonschema
import pytest
from pydantic import BaseModel, Field, conint, constr

from helpers import chi_square_sf
from muestra.answers.grammar import GrammarSpec
from muestra.answers.phases import QWEN_CLOSE_TEXT, AnswerConfig, ThinkConfig
from muestra.answers.structured import StructuredGenerator
from muestra.engine import SamplingParams
from muestra.models.loading import load_model

SPECIAL_TEXTS = [
    "<think>",
    "</think>",
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "<|endoftext|>",
]


class Clase(str, enum.Enum):  # noqa: UP042 (as seed 000 writes it)
    guerrero = "guerrero"
    soporte = "soporte"
    tanque = "tanque"


class Sexo(str, enum.Enum):  # noqa: UP042
    masculino = "masculino"
    femenino = "femenino"


class Personaje(BaseModel):  # seed 000's schema, exactly
    nombre: str
    sexo: Sexo
    edad: conint(gt=18, lt=99)
    clase: Clase
    nivel: conint(gt=1, lt=10)


@pytest.fixture(scope="module")
def generator(tiny_kit):
    return StructuredGenerator(load_model(str(tiny_kit)))


@pytest.fixture(scope="module")
def hybrid(hybrid_kit):
    return StructuredGenerator(load_model(str(hybrid_kit)))


def chat(generator, text, **kwargs):
    return generator.text.encode_messages([{"role": "user", "content": text}], **kwargs)


def check_answers(samples, schema):
    finished = 0
    for sample in samples:
        for special in SPECIAL_TEXTS:
            assert special not in sample.answer_text
        if sample.error is None:
            jsonschema.validate(sample.answer, schema)
            finished += 1
        else:
            assert sample.answer is None
    return finished


@pytest.mark.long
def test_personaje_64_samples(generator):
    spec = GrammarSpec.json_schema(Personaje)
    samples = generator.run(
        [chat(generator, "Genera un personaje para: <Soy una persona fuerte.>")],
        n=64,
        seed=5,
        think=ThinkConfig(budget=8),
        answer=AnswerConfig(max_tokens=60),
        grammar=spec,
        pydantic_model=Personaje,
    )
    assert len(samples) == 64
    finished = check_answers(samples, Personaje.model_json_schema())
    assert finished >= 5, "random weights should finish some answers within 60 tokens"
    for sample in samples:
        assert sample.think_tokens == 8 and sample.budget_hit
        assert QWEN_CLOSE_TEXT not in (sample.reasoning or "")
        assert QWEN_CLOSE_TEXT in sample.text
        if sample.error is None:
            assert isinstance(sample.value, Personaje)
            assert set(sample.field_probs) == {"sexo", "clase"}
        else:
            assert sample.finish_reason == "length" and "budget" in sample.error


class Origen(BaseModel):
    región: str = Field(json_schema_extra={"enum": ["norte", "sur", "montaña"]})
    código: str = Field(pattern=r"^[A-Z]{2}[0-9]$")


class Ficha(BaseModel):
    origen: Origen
    rasgos: list[constr(max_length=5)] = Field(min_length=1, max_length=2)
    valor: int | constr(max_length=3)
    activo: bool


def test_nested_arrays_accents_anyof_patterns(generator):
    schema = Ficha.model_json_schema()
    samples = generator.run(
        [chat(generator, "Ficha")],
        n=24,
        seed=2,
        think=ThinkConfig(budget=4),
        answer=AnswerConfig(max_tokens=120),
        grammar=GrammarSpec.json_schema(schema),
        pydantic_model=Ficha,
    )
    assert check_answers(samples, schema) >= 1
    for sample in samples:
        if sample.error is None:
            assert 1 <= len(sample.answer["rasgos"]) <= 2
            assert re.fullmatch(r"[A-Z]{2}[0-9]", sample.answer["origen"]["código"])
            assert set(sample.field_probs) == {"origen.región", "activo"}


def test_regex_and_choice(generator):
    prompt = chat(generator, "Código")
    regex = generator.run(
        [prompt],
        n=8,
        seed=1,
        think=ThinkConfig(budget=2),
        grammar=GrammarSpec.regex(r"[0-9]{3}-[a-z]{2}"),
    )
    for sample in regex:
        assert sample.error is None and re.fullmatch(r"[0-9]{3}-[a-z]{2}", sample.answer)
    choice = generator.run(
        [prompt],
        n=8,
        seed=1,
        think=ThinkConfig(budget=2),
        grammar=GrammarSpec.choice(["sí", "no", "quizá"]),
    )
    for sample in choice:
        assert sample.answer in ("sí", "no", "quizá")
        assert math.isclose(sum(sample.field_probs["answer"].values()), 1.0, abs_tol=1e-9)


def test_budget_forced_exactly_and_eos_never_ends_thinking(generator):
    eager_eos = SamplingParams(temperature=1.0, logit_bias={151645: 50.0, 151643: 50.0})
    samples = generator.run(
        [chat(generator, "Hola")],
        n=6,
        seed=3,
        think=ThinkConfig(params=eager_eos, budget=12),
        answer=AnswerConfig(max_tokens=4),
    )
    for sample in samples:
        assert sample.think_tokens == 12 and sample.budget_hit
        think_ids = sample.token_ids[: sample.token_ids.index(151668)]
        assert 151645 not in think_ids and 151643 not in think_ids


def test_model_closing_its_own_thinking(generator):
    closes = SamplingParams(temperature=1.0, logit_bias={151668: 50.0})
    sample = generator.run(
        [chat(generator, "Hola")],
        n=1,
        seed=3,
        think=ThinkConfig(params=closes, budget=50),
        grammar=GrammarSpec.choice(["a", "b"]),
    )[0]
    assert not sample.budget_hit and sample.think_tokens == 0 and sample.reasoning == ""
    assert sample.token_ids[:2] == [151668, 271]  # </think> then the forced "\n\n"
    assert sample.answer in ("a", "b")


def test_bare_close_text(generator):
    think = ThinkConfig(budget=3, close_text="</think>")
    sample = generator.run(
        [chat(generator, "Hola")], n=1, seed=1, think=think, grammar=GrammarSpec.choice(["x", "y"])
    )[0]
    assert sample.token_ids[3] == 151668 and sample.answer_text in ("x", "y")


def test_hybrid_template_on_and_off(hybrid):
    on = hybrid.run(
        [chat(hybrid, "Hola")],
        n=2,
        seed=1,
        think=ThinkConfig(budget=5),
        grammar=GrammarSpec.choice(["a", "b"]),
    )
    for sample in on:
        assert sample.token_ids[:2] == [151667, 198]  # "<think>\n" forced
        assert sample.think_tokens == 5 and sample.answer in ("a", "b")
    off = hybrid.run(
        [chat(hybrid, "Hola", enable_thinking=False)],
        n=2,
        seed=1,
        think=ThinkConfig(budget=5),
        grammar=GrammarSpec.choice(["a", "b"]),
    )
    for sample in off:
        assert sample.reasoning is None and sample.think_tokens == 0
        assert sample.answer in ("a", "b") and sample.token_ids[0] != 151667


def test_base_model_does_not_think(gpt2_kit):
    base = StructuredGenerator(load_model(str(gpt2_kit)))
    sample = base.run(
        [base.text.encode_text("Color:")],
        n=1,
        seed=1,
        think=ThinkConfig(budget=5),
        grammar=GrammarSpec.choice(["rojo", "azul"]),
    )[0]
    assert sample.reasoning is None and sample.answer in ("rojo", "azul")


@pytest.mark.parametrize("kind", ["choice", pytest.param("json", marks=pytest.mark.long)])
def test_field_probs_match_empirical_frequencies(hybrid, kind):
    """Answers sampled at T=1 under the grammar follow the mean of field_probs (each sample's
    exact distribution given its own prefix, summed over every tokenization of every value).
    A choice has no prefix, so there every sample carries the same distribution."""
    options = ["rojo", "azul", "verde", "amarillo"]
    if kind == "choice":
        spec, name = GrammarSpec.choice(options), "answer"
    else:
        spec = GrammarSpec.json_schema(
            {"type": "object", "properties": {"color": {"enum": options}}, "required": ["color"]}
        )
        name = "color"
    prompt = chat(hybrid, "Un color", enable_thinking=False)
    samples = hybrid.run(
        [prompt],
        n=400,
        seed=11,
        think=None,
        answer=AnswerConfig(params=SamplingParams(temperature=1.0), max_tokens=20),
        grammar=spec,
    )
    for sample in samples:
        assert set(sample.field_probs[name]) == set(options)
        assert math.isclose(sum(sample.field_probs[name].values()), 1.0, abs_tol=1e-9)
        if kind == "choice":
            assert sample.field_probs[name] == pytest.approx(samples[0].field_probs[name], abs=1e-5)
    probs = {o: sum(s.field_probs[name][o] for s in samples) / len(samples) for o in options}
    values = [s.answer if kind == "choice" else s.answer["color"] for s in samples]
    observed = {o: values.count(o) for o in options}
    expected = {o: probs[o] * len(values) for o in options}
    support = [o for o in options if expected[o] > 0.5]
    statistic = sum((observed[o] - expected[o]) ** 2 / expected[o] for o in support)
    assert chi_square_sf(statistic, len(support) - 1) > 0.001, (observed, expected)


def test_grammar_cache_hit_on_second_compile(generator):
    spec = GrammarSpec.json_schema({"type": "object", "properties": {"q": {"type": "integer"}}})
    generator.backend.compile(spec)
    before = dict(generator.backend.stats)
    generator.backend.compile(spec)
    assert generator.backend.stats["hits"] == before["hits"] + 1
    assert generator.backend.stats["compiles"] == before["compiles"]


def test_notebook_api_pydantic_in_objects_out(tiny_kit):
    from muestra.answers.structured import sample_answers

    class Color(BaseModel):
        color: str = Field(json_schema_extra={"enum": ["rojo", "azul"]})
        vivo: bool

    samples = sample_answers(str(tiny_kit), "Un color", schema=Color, n=4, seed=1, think_budget=3)
    assert len(samples) == 4
    for sample in samples:
        if sample.error is None:
            assert isinstance(sample.value, Color)
            assert set(sample.field_probs) == {"color", "vivo"}
    assert any(s.error is None for s in samples)


@pytest.mark.parametrize(
    ("kit", "kind"),
    [
        pytest.param("tiny", "personaje", marks=pytest.mark.long),  # the slowest schema: CI
        ("tiny", "ficha"),
        ("tiny", "choice"),
        ("hybrid", "ficha"),
    ],
)
def test_field_probs_in_the_loop_equal_post_hoc(generator, hybrid, monkeypatch, kit, kind):
    """`field_probs` computed inside the decoding loop (recorded logits + the row's live
    cache) equal the post-hoc computation (a forward over prompt + sample) for every
    sample; on the growing-cache kit every sample is scored in the loop, and some needed
    an expansion forward over the live cache (a branch the sample did not take)."""
    from muestra.answers.answer_probs import AnswerProbabilities
    from muestra.engine.engine import Batch

    model = {"tiny": generator, "hybrid": hybrid}[kit]
    spec = {
        "personaje": GrammarSpec.json_schema(Personaje),
        "ficha": GrammarSpec.json_schema(Ficha),
        "choice": GrammarSpec.choice(["sí", "no", "quizá", "no sé"]),
    }[kind]
    contexts, forwards = [], []
    row_context, expand = Batch.row_context, AnswerProbabilities._expand

    def counting_context(self, index, generated):
        contexts.append(generated)
        return row_context(self, index, generated)

    def counting_expand(self, trees):
        forwards.append(len({id(t.row) for t in trees}))
        return expand(self, trees)

    monkeypatch.setattr(Batch, "row_context", counting_context)
    monkeypatch.setattr(AnswerProbabilities, "_expand", counting_expand)

    def run(in_loop):
        monkeypatch.setattr(model, "live_field_probs", in_loop)
        return model.run(
            [chat(model, "Genera un personaje"), chat(model, "Otro, distinto")],
            n=12,
            seed=4,
            think=ThinkConfig(budget=3),
            answer=AnswerConfig(params=SamplingParams(temperature=1.0), max_tokens=80),
            grammar=spec,
        )

    in_loop = run(True)
    counts = dict(model.field_probs_counts)
    post_hoc = run(False)
    scored = 0
    for a, b in zip(in_loop, post_hoc, strict=True):
        assert a.token_ids == b.token_ids
        assert (a.field_probs is None) == (b.field_probs is None)
        if a.field_probs is None:
            continue
        scored += 1
        assert set(a.field_probs) == set(b.field_probs)
        for name, values in a.field_probs.items():
            assert values == pytest.approx(b.field_probs[name], abs=1e-5), name
    assert scored >= 4
    if kit == "tiny":
        assert counts == {"in_loop": scored, "post_hoc": 0}
        # every row that needed the model is in a forward; rows share forwards
        assert contexts and sum(forwards) >= len(contexts) > len(forwards) >= 1
