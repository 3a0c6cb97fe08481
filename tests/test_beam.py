"""Beam search against HF generate(num_beams=k, do_sample=False): the oracle, token for
token and score for score, on both kit architectures and the real model, with prompts
of different lengths in one batch."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import hf_generate
from muestra.engine import Engine, GenerationRequest, SamplingParams
from muestra.engine.beam import BeamParams, beam_search
from muestra.errors import InputError
from test_engine import PROMPTS, encode

PAD = 1  # not 0: HF fills finished sequences with `pad_token_id or eos[0]`


def hf_beams(loaded, prompts, params: BeamParams, max_new_tokens: int, eos_ids):
    """HF's returned sequences (new tokens, fill stripped) and scores, per prompt."""
    out, width = hf_generate(
        loaded,
        prompts,
        PAD,
        num_beams=params.num_beams,
        length_penalty=params.length_penalty,
        early_stopping=params.early_stopping,
        num_return_sequences=params.num_return_sequences,
        max_new_tokens=max_new_tokens,
        eos_token_id=sorted(eos_ids),
        return_dict_in_generate=True,
        output_scores=True,
    )
    r = params.num_return_sequences
    sequences = [row[width:].tolist() for row in out.sequences]
    scores = out.sequences_scores.tolist()
    return [
        list(zip(sequences[i * r : (i + 1) * r], scores[i * r : (i + 1) * r], strict=True))
        for i in range(len(prompts))
    ]


def assert_same_as_hf(loaded, texts, params: BeamParams, max_new_tokens: int) -> int:
    """Compare every returned hypothesis; returns how many ended on an EOS."""
    engine = Engine.from_loaded(loaded)
    prompts = [encode(loaded, t) for t in texts]
    ours = beam_search(
        engine, [GenerationRequest(p, max_new_tokens=max_new_tokens) for p in prompts], params
    )
    reference = hf_beams(loaded, prompts, params, max_new_tokens, engine.eos_token_ids)
    ended = 0
    for hypotheses, hf in zip(ours, reference, strict=True):
        assert len(hypotheses) == params.num_return_sequences
        for hypothesis, (hf_tokens, hf_score) in zip(hypotheses, hf, strict=True):
            n = len(hypothesis.token_ids)
            assert hf_tokens[:n] == hypothesis.token_ids, (hypothesis.rank, params)
            assert all(t == PAD for t in hf_tokens[n:]), (hf_tokens, hypothesis.token_ids)
            assert hypothesis.score == pytest.approx(hf_score, abs=1e-4)
            penalty = n**params.length_penalty
            assert hypothesis.sum_logprob / penalty == pytest.approx(hypothesis.score, abs=1e-4)
            ended += hypothesis.finish_reason == "stop"
    return ended


CONFIGS = [
    BeamParams(2, 1.0, False, 2),
    BeamParams(4, 1.0, False, 3),
    BeamParams(4, 0.0, True, 4),
    BeamParams(3, 2.0, "never", 2),
    BeamParams(4, -1.0, False, 1),
]


@pytest.mark.parametrize("arch", ["qwen", "gpt2"])
@pytest.mark.parametrize("params", CONFIGS, ids=str)
def test_beam_search_matches_hf_on_kits(arch, params, request):
    loaded = request.getfixturevalue(arch)
    assert_same_as_hf(loaded, PROMPTS[:3], params, max_new_tokens=10)


@pytest.mark.parametrize(
    "params", [BeamParams(3, 1.0, False, 3), BeamParams(4, 1.0, True, 2)], ids=str
)
def test_beam_search_matches_hf_on_the_real_model(smol, params):
    texts = [
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n",
        "The three primary colours are",
    ]
    ended = assert_same_as_hf(smol, texts, params, max_new_tokens=24)
    assert ended > 0  # real end-of-turn tokens finished hypotheses before the budget


def test_a_beam_of_one_is_greedy(qwen):
    engine = Engine.from_loaded(qwen)
    prompt = encode(qwen, PROMPTS[0])
    beam = beam_search(engine, [GenerationRequest(prompt, max_new_tokens=12)], BeamParams(1))
    greedy = engine.generate(
        [GenerationRequest(prompt, params=SamplingParams(temperature=0), max_new_tokens=12)]
    )
    assert beam[0][0].token_ids == greedy[0][0].token_ids


def test_more_prompts_than_a_batch_holds_run_in_waves(qwen):
    prompts = [encode(qwen, t) for t in PROMPTS]
    params = BeamParams(3, 1.0, False, 2)
    requests = [GenerationRequest(p, max_new_tokens=8) for p in prompts]
    together = beam_search(Engine.from_loaded(qwen), requests, params)
    in_waves = beam_search(Engine.from_loaded(qwen, max_batch=4), requests, params)
    assert [[h.token_ids for h in r] for r in together] == [
        [h.token_ids for h in r] for r in in_waves
    ]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"n": 2}, "n=2"),
        ({"params": SamplingParams(temperature=0.7)}, "temperature"),
        ({"stop": ("x",)}, "stop strings"),
        ({"logprobs": 2}, "logprobs"),
    ],
)
def test_requests_beam_search_cannot_honour_are_refused(qwen, change, words):
    request = GenerationRequest([1, 2, 3], max_new_tokens=4, **change)
    with pytest.raises(InputError, match=words):
        beam_search(Engine.from_loaded(qwen), [request], BeamParams(2))


@pytest.mark.parametrize(
    ("params", "words"),
    [
        (BeamParams(0), "num_beams"),
        (BeamParams(2, num_return_sequences=3), "num_return_sequences"),
        (BeamParams(2, early_stopping="sometimes"), "early_stopping"),  # type: ignore[arg-type]
    ],
)
def test_bad_beam_params_are_refused(qwen, params, words):
    with pytest.raises(InputError, match=words):
        beam_search(Engine.from_loaded(qwen), [GenerationRequest([1, 2])], params)


def test_the_cli_returns_the_best_hypotheses_first(cli, tiny_kit, qwen):
    result = cli(
        "generate", str(tiny_kit), "--prompt", "Hola", "--num-beams", "3", "--n", "2",
        "--max-new-tokens", "6", "--early-stopping", "never",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    lines = result.json_lines()
    assert [line["sample"] for line in lines] == [0, 1]
    assert lines[0]["beam"]["score"] >= lines[1]["beam"]["score"]
    assert "seed" not in lines[0]  # nothing was drawn
    engine = Engine.from_loaded(qwen)
    prompt = qwen.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hola"}], add_generation_prompt=True, tokenize=False
    )
    ids = qwen.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    params = BeamParams(3, 1.0, "never", 2)
    direct = beam_search(engine, [GenerationRequest(ids, max_new_tokens=6)], params)[0]
    assert [line["token_ids"] for line in lines] == [h.token_ids for h in direct]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--temperature", "0.7", "--seed", "1"], "--seed, --temperature"),
        (["--n", "5"], "--n 5 with --num-beams 4"),
        (["--early-stopping", "maybe"], "--early-stopping 'maybe'"),
        (["--stop", "x"], "--stop"),
    ],
)
def test_the_cli_refuses_what_beam_search_cannot_do(cli, tiny_kit, flags, words):
    result = cli("generate", str(tiny_kit), "--prompt", "Hola", "--num-beams", "4", *flags)
    assert result.code == 2 and words in result.stderr, result.stderr


def test_the_server_searches_with_vllms_names(smol_kit, smol, tiny_kit):
    from test_server import in_process

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    body = {"model": "s", "messages": messages, "max_tokens": 20, "n": 3,
            "use_beam_search": True, "length_penalty": 1.0}  # fmt: skip
    ids = smol.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = smol.tokenizer(ids, add_special_tokens=False)["input_ids"]
    direct = beam_search(
        Engine.from_loaded(smol),
        [GenerationRequest(prompt, max_new_tokens=20)],
        BeamParams(3, 1.0, False, 3),
    )[0]
    with in_process(smol_kit, "s") as http:
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        choices = response.json()["choices"]
        assert [c["index"] for c in choices] == [0, 1, 2]
        assert [c["muestra"]["beam"]["score"] for c in choices] == pytest.approx(
            [h.score for h in direct], abs=1e-5
        )
        texts = [c["message"]["content"] for c in choices]
        assert texts[0] == smol.tokenizer.decode(direct[0].token_ids, skip_special_tokens=True)
        text = http.post(
            "/v1/completions",
            json={
                "model": "s",
                "prompt": ["Hola", "The sky is"],
                "max_tokens": 6,
                "n": 2,
                "use_beam_search": True,
                "early_stopping": "never",
            },  # fmt: skip
        )
        assert text.status_code == 200, text.text
        assert [c["index"] for c in text.json()["choices"]] == [0, 1, 2, 3]
        for extra, param in (
            ({"temperature": 0.5}, "temperature"), ({"stream": True}, "stream"),
            ({"seed": 3}, "seed"), ({"stop": ["x"]}, "stop"), ({"logprobs": True}, "logprobs"),
        ):  # fmt: skip
            refused = http.post("/v1/chat/completions", json={**body, **extra})
            assert refused.status_code == 400, refused.text
            assert refused.json()["error"]["param"] == param
        schema = {
            "type": "object",
            "properties": {"gender": {"enum": ["male", "female"]}},
            "required": ["gender"],
            "additionalProperties": False,
        }
        fmt = {"type": "json_schema", "json_schema": {"name": "g", "schema": schema}}
        graded = http.post("/v1/chat/completions", json={**body, "n": 2, "response_format": fmt})
        assert graded.status_code == 200, graded.text
        from muestra.answers.beam_answers import beam_answers
        from muestra.answers.grammar import GrammarSpec
        from muestra.answers.structured import StructuredGenerator

        expected = beam_answers(
            StructuredGenerator(smol), prompt, GrammarSpec.json_schema(schema),
            BeamParams(2, 1.0, False, 2), 20,
        )  # fmt: skip
        got = graded.json()["choices"]
        assert [c["message"]["content"] for c in got] == [a.answer_text for a in expected]
        assert [c["muestra"]["beam"]["probability"] for c in got] == pytest.approx(
            [a.probability for a in expected], rel=1e-4
        )
    thinking = {**body, "model": "t", "max_tokens": 40, "n": 2}
    with in_process(tiny_kit, "t") as http:
        refused = http.post("/v1/chat/completions", json=thinking)
        assert refused.status_code == 400 and "thinking_token_budget" in refused.text
        off = http.post("/v1/chat/completions", json={**thinking, "muestra": {"think": False}})
        assert off.status_code == 200, off.text
        searched = http.post("/v1/chat/completions", json={**thinking, "thinking_token_budget": 5})
        assert searched.status_code == 200, searched.text
        choices = searched.json()["choices"]
    # the reasonings are the think beams of the same prompt (answers/beam_phases.py)
    from muestra.answers.beam_phases import think_beams
    from muestra.answers.phases import ThinkConfig
    from muestra.answers.structured import StructuredGenerator
    from muestra.models.loading import load_model

    generator = StructuredGenerator(load_model(str(tiny_kit)))
    prompt = generator.text.encode_messages(messages)
    (beams,) = think_beams(generator, [prompt], ThinkConfig(budget=5), BeamParams(2, 1.0, False, 2))
    assert [c["muestra"]["beam"]["rank"] for c in choices] == [0, 1]
    for choice, beam in zip(choices, beams, strict=True):
        assert choice["muestra"]["beam"]["score"] == pytest.approx(beam.score, abs=1e-5)
        pieces = b"".join(generator.text.token_bytes[t] for t in beam.reasoning_ids)
        text = pieces.decode("utf-8", errors="replace")
        assert choice["message"]["reasoning_content"] == text
        assert choice["muestra"]["think_tokens"] == 5 and choice["muestra"]["budget_hit"]


# ---- beam search under a grammar: the k most likely valid answers ----------------------------


def teacher_forced_logprob(loaded, prompt, tokens) -> float:
    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.inference_mode():
        logprobs = loaded.model(input_ids=ids).logits[0].float().log_softmax(dim=-1)
    start = len(prompt)
    return sum(float(logprobs[start - 1 + i, t]) for i, t in enumerate(tokens))


@pytest.mark.parametrize(
    ("grammar", "check"),
    [
        (["sí", "no", "tal vez"], lambda a: a in ("sí", "no", "tal vez")),
        (
            {
                "type": "object",
                "properties": {"gender": {"enum": ["male", "female"]}},
                "required": ["gender"],
                "additionalProperties": False,
            },  # fmt: skip
            lambda a: a["gender"] in ("male", "female"),
        ),
    ],
    ids=["choice", "schema"],
)
def test_beam_answers_are_valid_ranked_and_scored_by_the_model(smol, grammar, check):
    from muestra.answers.beam_answers import beam_answers
    from muestra.answers.grammar import GrammarSpec
    from muestra.answers.structured import StructuredGenerator

    spec = (
        GrammarSpec.choice(grammar)
        if isinstance(grammar, list)
        else GrammarSpec.json_schema(grammar)
    )
    generator = StructuredGenerator(smol)
    question = (
        "Describe a brave knight. Answer in JSON."
        if isinstance(grammar, dict)
        else ("Is Paris in France? Answer sí, no or tal vez.")
    )
    prompt = generator.text.encode_messages([{"role": "user", "content": question}])
    params = BeamParams(num_beams=3, length_penalty=0.0, num_return_sequences=2)
    answers = beam_answers(generator, prompt, spec, params, max_tokens=24)
    assert len(answers) == 2
    for answer in answers:
        assert answer.error is None and check(answer.answer), answer
        assert answer.token_ids[-1] in smol.eos_token_ids
        forced = teacher_forced_logprob(smol, prompt, answer.token_ids)
        assert answer.sum_logprob == pytest.approx(forced, abs=1e-3)
        assert answer.probability == pytest.approx(math.exp(forced), rel=1e-3)
    assert answers[0].score >= answers[1].score
    assert answers[0].answer != answers[1].answer or answers[0].token_ids != answers[1].token_ids


def test_the_cli_gives_the_k_best_answers(cli, smol_kit):
    result = cli(
        "generate", str(smol_kit), "--prompt", "Is Paris in France? Answer yes or no.",
        "--choice", "yes,no", "--num-beams", "2", "--n", "2", "--length-penalty", "0",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    lines = result.json_lines()
    assert sorted(line["answer"] for line in lines) == ["no", "yes"]
    assert lines[0]["beam"]["probability"] >= lines[1]["beam"]["probability"]


def test_the_readme_messages_file_is_the_character_spec_item():
    import json
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = tomllib.loads((root / "examples/characters.toml").read_text("utf-8"))["prompt"]
    item = spec["items"][1]
    expected = [
        {"role": "system", "content": spec["system"]},
        {"role": "user", "content": spec["user"].replace("{description}", item["description"])},
    ]
    shipped = json.loads((root / "examples/messages/caring.json").read_text("utf-8"))
    assert shipped == expected
