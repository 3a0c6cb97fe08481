"""`muestra generate` as a user types it."""

from __future__ import annotations

import json

from conftest import ROOT


def test_json_lines_with_required_fields(cli, tiny_kit):
    result = cli(
        "generate",
        str(tiny_kit),
        "--prompt",
        "Hola",
        "--n",
        "3",
        "--seed",
        "11",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
    )
    assert result.code == 0, result.stderr
    lines = result.json_lines()
    assert [line["sample"] for line in lines] == [0, 1, 2]
    for line in lines:
        assert {"sample", "seed", "text", "token_ids", "finish_reason", "num_tokens"} <= set(line)
        assert line["finish_reason"] in ("stop", "length")
        assert line["num_tokens"] == len(line["token_ids"]) <= 6
    again = cli(
        "generate",
        str(tiny_kit),
        "--prompt",
        "Hola",
        "--n",
        "3",
        "--seed",
        "11",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
    )
    assert again.json_lines() == lines


def test_logprobs_and_stop(cli, tiny_kit):
    result = cli(
        "generate",
        str(tiny_kit),
        "--prompt",
        "Hola",
        "--seed",
        "1",
        "--logprobs",
        "2",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
    )
    line = result.json_lines()[0]
    assert len(line["logprobs"]) == line["num_tokens"]
    assert len(line["logprobs"][0]["top"]) == 2 and "raw_logprob" in line["logprobs"][0]
    word = line["text"].split()[0]
    stopped = cli(
        "generate",
        str(tiny_kit),
        "--prompt",
        "Hola",
        "--temperature",
        "0",
        "--max-new-tokens",
        "4",
        "--stop",
        word,
    )
    data = stopped.json_lines()[0]
    assert data["finish_reason"] == "stop" and data["stop_reason"] == word
    assert word not in data["text"]


def test_messages_raw_and_base_model(cli, tiny_kit, gpt2_kit):
    messages = ROOT / "examples" / "messages" / "strawberry.json"
    chat = cli("generate", str(tiny_kit), "--messages", str(messages), "--max-new-tokens", "3")
    assert chat.code == 0 and chat.json_lines()[0]["num_prompt_tokens"] == 47
    base = cli(
        "generate",
        str(gpt2_kit),
        "--prompt",
        "Lista de colores: rojo, azul",
        "--raw",
        "--max-new-tokens",
        "5",
        "--temperature",
        "0",
    )
    assert base.code == 0 and base.json_lines()[0]["num_prompt_tokens"] == 10


def test_stream_prints_text(cli, tiny_kit):
    streamed = cli(
        "generate",
        str(tiny_kit),
        "--prompt",
        "Hola",
        "--seed",
        "4",
        "--stream",
        "--max-new-tokens",
        "8",
    )
    plain = cli(
        "generate", str(tiny_kit), "--prompt", "Hola", "--seed", "4", "--max-new-tokens", "8"
    )
    assert streamed.code == 0, streamed.stderr
    assert streamed.stdout == plain.json_lines()[0]["text"] + "\n"
    assert "tok/s" in streamed.stderr


def test_user_errors_exit_2(cli, tiny_kit, tmp_path):
    both = cli("generate", str(tiny_kit), "--prompt", "x", "--messages", "m.json")
    assert both.code == 2 and "exactly one" in both.stderr
    overflow = cli("generate", str(tiny_kit), "--prompt", "x", "--max-new-tokens", "5000")
    assert overflow.code == 2 and "exceeds the model's context" in overflow.stderr
    stream_n = cli("generate", str(tiny_kit), "--prompt", "x", "--stream", "--n", "2")
    assert stream_n.code == 2 and "--n 1" in stream_n.stderr
    bad = tmp_path / "m.json"
    bad.write_text(json.dumps({"messages": [{"role": "user"}]}))
    missing = cli("generate", str(tiny_kit), "--messages", str(bad))
    assert missing.code == 2 and "[0].content" in missing.stderr
    top_p = cli("generate", str(tiny_kit), "--prompt", "x", "--top-p", "2")
    assert top_p.code == 2


def test_think_then_answer_with_schema(cli, tiny_kit, tmp_path):
    schema = tmp_path / "personaje.schema.json"
    schema.write_text(
        json.dumps(
            {
                "type": "object",
                "properties": {
                    "sexo": {"enum": ["masculino", "femenino"]},
                    "edad": {"type": "integer"},
                },
                "required": ["sexo", "edad"],
            }
        )
    )
    result = cli(
        "generate",
        str(tiny_kit),
        "--prompt",
        "Genera un personaje",
        "--n",
        "3",
        "--seed",
        "1",
        "--think-budget",
        "6",
        "--schema",
        str(schema),
        "--answer-max-tokens",
        "40",
    )
    assert result.code == 0, result.stderr
    for line in result.json_lines():
        assert line["think_tokens"] == 6 and line["budget_hit"] is True
        assert {"reasoning", "answer_text", "answer", "field_probs", "error"} <= set(line)
        if line["error"] is None:
            assert line["answer"]["sexo"] in ("masculino", "femenino")
            assert abs(sum(line["field_probs"]["sexo"].values()) - 1) < 1e-9


def test_choice_and_close_text(cli, tiny_kit):
    result = cli(
        "generate",
        str(tiny_kit),
        "--prompt",
        "¿Sí o no?",
        "--think-budget",
        "2",
        "--close-text",
        "</think>\\n\\n",
        "--choice",
        "sí,no",
        "--seed",
        "3",
    )
    line = result.json_lines()[0]
    assert line["answer"] in ("sí", "no") and "Considering" not in line["text"]


def test_structured_user_errors(cli, tiny_kit, tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "array", "uniqueItems": True}))
    refused = cli("generate", str(tiny_kit), "--prompt", "x", "--schema", str(schema))
    assert refused.code == 2 and "uniqueItems" in refused.stderr and "$" in refused.stderr
    both = cli("generate", str(tiny_kit), "--prompt", "x", "--regex", "a", "--choice", "a,b")
    assert both.code == 2 and "at most one" in both.stderr
    plain = cli(
        "generate", str(tiny_kit), "--prompt", "x", "--choice", "a,b", "--temperature", "0.5"
    )
    assert plain.code == 2 and "--answer-" in plain.stderr


def test_greedy_lines_are_the_same_every_call_and_across_decoders(cli, tiny_kit):
    """Greedy draws nothing: no seed (null), so two calls print the same lines; prompt
    lookup's lines carry the same keys as plain ones (plus its own counters)."""
    args = ("generate", str(tiny_kit), "--prompt", "Hola", "--temperature", "0",
            "--max-new-tokens", "8")  # fmt: skip
    first, second = cli(*args), cli(*args)
    assert first.code == 0 and second.code == 0, first.stderr
    assert first.stdout == second.stdout
    (plain,) = first.json_lines()
    assert plain["seed"] is None
    assert "1 sample, " in first.stderr  # not "1 samples"
    lookup = cli(*args, "--prompt-lookup", "4")
    assert lookup.code == 0, lookup.stderr
    (drafted,) = lookup.json_lines()
    assert set(plain) <= set(drafted) and drafted["seed"] is None
    assert drafted["token_ids"] == plain["token_ids"]
    assert drafted["stop_reason"] == plain["stop_reason"]
