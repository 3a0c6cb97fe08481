"""Beam search in the phases (answers/beam_phases.py) and DoLa across a phase switch.

Oracles: think beams equal HF `generate(num_beams=k)` with `</think>` as the end token and
the EOS ids suppressed (tags mode, tiny Qwen3 kit) or the model's EOS (plain-text mode,
real model); an answer after a beam reasoning equals the answer generated from the
prompt + reasoning + closing text; an answer beam's log-probability equals a
teacher-forced recomputation; a DoLa answer after a sampled reasoning equals DoLa
decoding started from the closed reasoning."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch

from muestra.answers.beam_phases import run_beam_phases, think_beams
from muestra.answers.grammar import GrammarSpec
from muestra.answers.phases import AnswerConfig, ThinkConfig, with_instruction
from muestra.answers.structured import StructuredGenerator
from muestra.engine import GenerationRequest, SamplingParams
from muestra.engine.beam import BeamParams
from muestra.errors import InputError
from test_beam import PAD, teacher_forced_logprob


def hf_think_beams(loaded, prompt, params: BeamParams, budget: int, end_ids, suppress):
    out = loaded.model.generate(
        input_ids=torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        num_beams=params.num_beams,
        length_penalty=params.length_penalty,
        early_stopping=params.early_stopping,
        num_return_sequences=params.num_return_sequences,
        max_new_tokens=budget,
        eos_token_id=list(end_ids),
        suppress_tokens=list(suppress) or None,
        pad_token_id=PAD,
        top_k=None,
        top_p=None,
        temperature=None,
        return_dict_in_generate=True,
        output_scores=True,
    )
    return [
        (row[len(prompt) :].tolist(), score)
        for row, score in zip(out.sequences, out.sequences_scores.tolist(), strict=True)
    ]


def assert_beams_like_hf(generator, beams, prompt, params, budget, end_ids, suppress):
    reference = hf_think_beams(generator.loaded, prompt, params, budget, end_ids, suppress)
    assert len(beams) == params.num_return_sequences
    for beam, (tokens, score) in zip(beams, reference, strict=True):
        searched = beam.reasoning_ids + beam.end_ids
        assert tokens[: len(searched)] == searched, beam.rank
        assert all(t == PAD for t in tokens[len(searched) :])
        assert beam.score == pytest.approx(score, abs=1e-4)
        assert beam.budget_hit == (len(beam.reasoning_ids) == budget and not beam.end_ids)


@pytest.mark.parametrize("params", [BeamParams(3, 1.0, False, 3), BeamParams(2, 0.0, True, 2)])
def test_think_beams_in_tags_mode_match_hf(qwen, hybrid_kit, params):
    from muestra.models.loading import load_model

    for loaded in (qwen, load_model(str(hybrid_kit), device="cpu", dtype="float32")):
        generator = StructuredGenerator(loaded)
        prompt = generator.text.encode_messages([{"role": "user", "content": "Hola, ¿qué tal?"}])
        think = ThinkConfig(budget=7, mode="tags")
        (beams,) = think_beams(generator, [prompt], think, params)
        tags = generator.tag_ids(think)
        assert beams is not None and tags is not None
        prefix = beams[0].prefix_ids  # the hybrid template does not open the block itself
        assert prefix == (tags.open_ids if loaded is not qwen else [])
        assert_beams_like_hf(
            generator,
            beams,
            prompt + prefix,
            params,
            7,
            [tags.close_id],
            sorted(loaded.eos_token_ids),
        )
        for beam in beams:  # closed as a sampled row is: the budget's closing text
            assert beam.closing_ids == (tags.after_close_ids if beam.end_ids else tags.close_ids)


def test_think_beams_in_text_mode_match_hf_and_close_like_sampled_rows(smol):
    generator = StructuredGenerator(smol)
    think = generator.resolve_think(ThinkConfig(budget=40, mode="auto"))
    assert think is not None and think.mode == "text"
    messages = with_instruction(
        [{"role": "user", "content": "Is Paris in France?"}], think.instruction
    )
    prompt = generator.text.encode_messages(messages)
    params = BeamParams(3, 1.0, False, 3)
    (beams,) = think_beams(generator, [prompt], think, params)
    assert beams is not None
    assert_beams_like_hf(generator, beams, prompt, params, 40, sorted(smol.eos_token_ids), [])
    tags = generator.tag_ids(think)
    assert any(b.end_ids for b in beams), "the real model ends its reasoning itself"
    for beam in beams:
        assert beam.closing_ids == tags.close_ids  # after its EOS, or at the budget


def test_answers_after_beam_reasonings_are_the_answers_of_the_closed_contexts(smol):
    generator = StructuredGenerator(smol)
    think = generator.resolve_think(ThinkConfig(budget=16, mode="auto"))
    messages = with_instruction(
        [{"role": "user", "content": "Is Paris in France?"}], think.instruction
    )
    prompt = generator.text.encode_messages(messages)
    grammar = GrammarSpec.choice(["yes", "no"])
    answer = AnswerConfig(SamplingParams(temperature=1.0), max_tokens=4)
    samples = run_beam_phases(
        generator,
        [prompt],
        counts=[3],
        seed=5,
        think=think,
        think_beams_params=BeamParams(3),
        answer=answer,
        grammar=grammar,
    )
    (beams,) = think_beams(generator, [prompt], think, BeamParams(3, num_return_sequences=3))
    assert [s.sample for s in samples] == [0, 1, 2]
    for sample, beam in zip(samples, beams, strict=True):
        assert sample.beam == {"think": beam.record()}
        assert sample.token_ids[: len(beam.token_ids)] == beam.token_ids
        assert sample.think_tokens == len(beam.reasoning_ids)
        assert sample.num_prompt_tokens == len(prompt)
        alone = generator.run(
            [prompt + beam.token_ids],
            seed=5,
            first_samples=[sample.sample],
            answer=answer,
            grammar=grammar,
        )[0]
        assert sample.token_ids[len(beam.token_ids) :] == alone.token_ids
        assert sample.answer == alone.answer and sample.seed == alone.seed
        # `alone` scores inside the decoding loop, the beam answers after it: float noise
        assert sample.field_probs["answer"] == pytest.approx(alone.field_probs["answer"], abs=1e-5)


def test_answer_beams_rank_the_samples_or_answer_each_sampled_reasoning(smol):
    generator = StructuredGenerator(smol)
    prompt = generator.text.encode_messages(
        [{"role": "user", "content": "Is Paris in France? Answer yes, no or maybe."}]
    )
    grammar = GrammarSpec.choice(["yes", "no", "maybe"])
    ranked = run_beam_phases(
        generator, [prompt], counts=[3], seed=1, answer_beams=BeamParams(6), grammar=grammar
    )
    assert sorted(s.answer for s in ranked) == ["maybe", "no", "yes"]
    logprobs = [s.beam["answer"]["sum_logprob"] for s in ranked]
    assert [s.beam["answer"]["rank"] for s in ranked] == [0, 1, 2]
    for sample in ranked:
        forced = teacher_forced_logprob(smol, prompt, sample.token_ids)
        assert sample.beam["answer"]["sum_logprob"] == pytest.approx(forced, abs=1e-3)
        assert set(sample.field_probs["answer"]) == {"yes", "no", "maybe"}
    assert logprobs == sorted(logprobs, reverse=True)  # length penalty 1, same lengths here

    think = generator.resolve_think(
        ThinkConfig(SamplingParams(temperature=1.0), budget=10, mode="auto")
    )
    asked = with_instruction(
        [{"role": "user", "content": "Is Paris in France?"}], think.instruction
    )
    context = generator.text.encode_messages(asked)
    sampled = run_beam_phases(
        generator,
        [context],
        counts=[2],
        seed=7,
        think=think,
        answer_beams=BeamParams(2),
        grammar=grammar,
    )
    reasoned = generator.run(
        [context], n=2, seed=7, think=think, answer=AnswerConfig(), grammar=grammar
    )
    for sample, plain in zip(sampled, reasoned, strict=True):
        assert sample.reasoning == plain.reasoning and sample.seed == plain.seed  # same draws
        assert sample.beam["answer"]["rank"] == 0 and sample.answer in ("yes", "no", "maybe")
        assert sample.think_tokens == plain.think_tokens


def test_dola_switched_on_for_the_answer_starts_at_the_closed_reasoning(smol):
    """A think phase without DoLa, then a DoLa answer: the engine computes the early layers
    while the closing text is forced, so the answer equals DoLa decoding started afresh
    from the prompt + reasoning + closing text."""
    generator = StructuredGenerator(smol)
    think = generator.resolve_think(
        ThinkConfig(SamplingParams(temperature=0.9), budget=12, mode="auto")
    )
    asked = with_instruction([{"role": "user", "content": "Name a colour."}], think.instruction)
    prompt = generator.text.encode_messages(asked)
    dola = SamplingParams(temperature=0, dola_layers="low", repetition_penalty=1.2)
    samples = generator.run(
        [prompt], n=2, seed=3, think=think, answer=AnswerConfig(dola, max_tokens=10)
    )
    plain = generator.run([prompt], n=2, seed=3, think=think, answer=AnswerConfig(max_tokens=10))
    engine = generator.text.engine
    differs = False
    for sample, reference in zip(samples, plain, strict=True):
        assert sample.reasoning == reference.reasoning
        close = generator.tag_ids(think).close_ids
        ids = sample.token_ids
        start = next(
            i for i in range(sample.think_tokens, len(ids)) if ids[i : i + len(close)] == close
        )
        context = prompt + ids[: start + len(close)]
        request = GenerationRequest(context, params=dola, max_new_tokens=10)
        alone = engine.generate([request])[0][0]
        assert ids[start + len(close) :] == alone.token_ids
        differs |= sample.answer_text != reference.answer_text
    assert differs, "DoLa changed no answer: the test would not see it switched off"


@pytest.mark.parametrize("layers", ["high", "low"])
def test_dola_under_a_grammar_always_leaves_a_valid_token(smol, layers):
    generator = StructuredGenerator(smol)
    prompt = generator.text.encode_messages([{"role": "user", "content": "A knight. JSON."}])
    schema = {
        "type": "object",
        "properties": {"gender": {"enum": ["male", "female"]}, "age": {"type": "integer"}},
        "required": ["gender", "age"],
        "additionalProperties": False,
    }
    answer = AnswerConfig(SamplingParams(temperature=0.8, dola_layers=layers), max_tokens=30)
    samples = generator.run(
        [prompt], n=6, seed=2, answer=answer, grammar=GrammarSpec.json_schema(schema)
    )
    for sample in samples:
        assert sample.error is None, sample.error
        assert sample.answer["gender"] in ("male", "female")


# ---- experiments: the spec, the store, resume ------------------------------------------


def beam_spec(folder, model, think: str, answer: str, samples: int = 2):
    spec = folder / "beams.toml"
    spec.write_text(f'''
name = "beams"
seed = 11
samples = {samples}
[model]
id = "{model}"
[prompt]
user = "Is {{city}} in France? Answer yes or no."
[[prompt.items]]
id = "paris"
city = "Paris"
[[prompt.items]]
id = "rome"
city = "Rome"
{think}
[answer]
max_tokens = 4
choice = ["yes", "no"]
{answer}
''')
    return spec


def stored(path):
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    try:
        return db.execute("SELECT * FROM samples ORDER BY prompt_id, sample_index").fetchall()
    finally:
        db.close()


def test_an_experiment_beam_searches_its_reasoning_and_stores_each_beams_rank(
    cli, smol_kit, tmp_path
):
    spec = beam_spec(
        tmp_path, smol_kit, '[think]\nbudget = 8\nstrategy = "beam"\nnum_beams = 3', "", samples=3
    )
    out = tmp_path / "beams.db"
    result = cli("run", str(spec), "--out", str(out))
    assert result.code == 0, result.stderr
    rows = stored(out)
    assert len(rows) == 6
    for prompt in (1, 2):
        mine = [r for r in rows if r["prompt_id"] == prompt]
        beams = [json.loads(r["beam_json"])["think"] for r in mine]
        assert [b["rank"] for b in beams] == [0, 1, 2] == [r["sample_index"] for r in mine]
        scores = [b["score"] for b in beams]
        assert scores == sorted(scores, reverse=True)
        assert all(r["reasoning"] and r["answer_json"] in ('"yes"', '"no"') for r in mine)
        assert len({r["reasoning"] for r in mine}) == 3  # three different reasonings
    result = cli("analyze", str(out), "--json")
    assert result.code == 0, result.stderr
    notes = result.json()["notes"]
    (note,) = [n for n in notes if "beam" in n]
    assert "ranked by beam search, not random draws" in note, notes
    from muestra.experiments.results import samples_frame
    from muestra.experiments.store import connect

    db = connect(out, create=False)
    frame = samples_frame(db)
    db.close()
    assert list(frame["think_beam_rank"]) == [0, 1, 2, 0, 1, 2]
    assert "think_beam_rank" not in [c for c in frame.columns if c == "answer"]
    again = cli("run", str(spec), "--out", str(out))
    assert again.code == 0 and "0 to run" in again.stderr, again.stderr


def test_an_experiment_without_reasoning_stores_the_best_answers_ranked(cli, smol_kit, tmp_path):
    spec = beam_spec(tmp_path, smol_kit, "", 'strategy = "beam"\nnum_beams = 4')
    out = tmp_path / "answers.db"
    result = cli("run", str(spec), "--out", str(out))
    assert result.code == 0, result.stderr
    rows = stored(out)
    for prompt in (1, 2):
        mine = [r for r in rows if r["prompt_id"] == prompt]
        assert sorted(json.loads(r["answer_json"]) for r in mine) == ["no", "yes"]
        ranks = [json.loads(r["beam_json"])["answer"]["rank"] for r in mine]
        assert ranks == [0, 1]
        assert all(json.loads(r["field_probs_json"])["answer"] for r in mine)


@pytest.mark.parametrize(
    ("think", "answer", "samples", "words"),
    [
        ("", 'strategy = "beam"\nnum_beams = 2', 3, ["samples = 3", "answer.num_beams = 2"]),
        ('[think]\nstrategy = "beam"\nnum_beams = 2', "", 4, ["think.num_beams = 2"]),
        ('[think]\nstrategy = "beam"\ntemperature = 0.7', "", 2, ["temperature", "do not apply"]),
        ("", 'strategy = "beam"\ntemperature = 0.7', 2, ["answer.strategy", "temperature"]),
        ("", 'strategy = "beam"\ndola_layers = "low"', 2, ["dola_layers", "do not apply"]),
        ("", "num_beams = 4", 2, ["num_beams apply to beam search only", 'strategy = "beam"']),
        ("[think]\nlength_penalty = 2.0", "", 2, ["length_penalty", "think.strategy"]),
        ("", 'strategy = "beams"', 2, ["answer.strategy", "sample", "beam"]),
    ],
)
def test_beam_mistakes_in_a_spec_are_refused_by_name(tmp_path, think, answer, samples, words):
    spec = beam_spec(tmp_path, "org/model", think, answer, samples)
    with pytest.raises(InputError) as info:
        from muestra.experiments.spec import load_spec

        load_spec(spec, check_models=False)
    for word in [str(spec), *words]:
        assert word in str(info.value), str(info.value)


def test_a_sweep_may_compare_sampling_with_beam_search(tmp_path):
    from muestra.experiments.spec import load_spec

    spec = beam_spec(
        tmp_path,
        "org/model",
        "",
        'num_beams = 2\n[sweep]\n"answer.strategy" = ["sample", "beam"]',
    )
    loaded = load_spec(spec, check_models=False)
    assert [c.answer.strategy for c in loaded.conditions] == ["sample", "beam"]
    assert loaded.conditions[1].answer.num_beams == 2
    remote = spec.read_text().replace(
        'id = "org/model"', 'id = "m"\nendpoint = "http://127.0.0.1:9/v1"'
    )
    spec.write_text(remote.replace('choice = ["yes", "no"]', ""))
    with pytest.raises(InputError, match='answer.strategy = "beam" needs a local model'):
        load_spec(spec, check_models=False)


# ---- the CLI ---------------------------------------------------------------------------


def test_the_cli_beam_searches_the_reasoning_and_answers_each_beam(cli, smol_kit):
    result = cli(
        "generate", str(smol_kit), "--prompt", "Is Paris in France?", "--think-budget", "8",
        "--think-num-beams", "3", "--n", "2", "--choice", "yes,no", "--seed", "4",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    lines = result.json_lines()
    assert [line["beam"]["think"]["rank"] for line in lines] == [0, 1]
    assert all(line["reasoning"] and line["answer"] in ("yes", "no") for line in lines)
    assert lines[0]["beam"]["think"]["score"] >= lines[1]["beam"]["think"]["score"]
    dola = cli(
        "generate", str(smol_kit), "--prompt", "Is Paris in France?", "--think-budget", "6",
        "--think-temperature", "0.8", "--answer-dola-layers", "high",
        "--choice", "yes,no", "--n", "2", "--seed", "4",
    )  # fmt: skip
    assert dola.code == 0, dola.stderr
    assert all(line["answer"] in ("yes", "no") for line in dola.json_lines())
    reasoned = cli(
        "generate", str(smol_kit), "--prompt", "Is Paris in France?", "--think-budget", "6",
        "--think-temperature", "0.8", "--num-beams", "2", "--choice", "yes,no", "--n", "2",
        "--seed", "4",
    )  # fmt: skip
    assert reasoned.code == 0, reasoned.stderr
    for line in reasoned.json_lines():
        assert line["reasoning"] is not None and line["beam"]["answer"]["rank"] == 0


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--think-num-beams", "2", "--choice", "a,b"], ["--think-num-beams needs --think-budget"]),
        (
            ["--think-num-beams", "2", "--think-budget", "4", "--think-temperature", "0.5"],
            ["--think-temperature", "beam-searched reasoning", "leave it out"],
        ),
        (["--think-num-beams", "2"], ["--think-num-beams needs --think-budget"]),
        (
            ["--num-beams", "2", "--choice", "a,b", "--answer-temperature", "0.5"],
            ["--answer-temperature"],
        ),
        (["--dola-layers", "low", "--choice", "a,b"], ["--answer-dola-layers"]),
        (["--answer-dola-layers", "middle", "--choice", "a,b"], ["--answer-dola-layers 'middle'"]),
    ],
)
def test_the_cli_refuses_beam_and_dola_mistakes_by_name(cli, tiny_kit, flags, words):
    result = cli("generate", str(tiny_kit), "--prompt", "Hola", *flags)
    assert result.code == 2, (result.code, result.stderr)
    for word in words:
        assert word in result.stderr, result.stderr


def test_the_beams_example_is_the_character_experiment_with_a_strategy_sweep():
    from conftest import ROOT
    from muestra.experiments.spec import load_spec

    beams = load_spec(ROOT / "examples/characters-beams.toml", check_models=False)
    plain = load_spec(ROOT / "examples/characters.toml", check_models=False)
    assert beams.spec.prompt == plain.spec.prompt and beams.spec.answer == plain.spec.answer
    sample, beam = beams.conditions
    assert sample.think.strategy == "sample" and sample.think.temperature == 0.8
    assert beam.think.strategy == "beam" and beam.think.temperature is None  # what ran
    assert beam.think.num_beams == beams.spec.samples == 4
