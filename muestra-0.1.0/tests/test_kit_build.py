"""Kit folders: deterministic, complete, honest about random weights."""

from __future__ import annotations

import json

import pytest

from muestra.errors import InputError
from muestra.models.kit import build_kit
from muestra.models.kit.presets import PRESETS


def test_same_preset_same_bytes(tmp_path, tiny_kit):
    again = build_kit("tiny", tmp_path / "again")
    names = sorted(p.name for p in tiny_kit.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (tiny_kit / name).read_bytes() == (again / name).read_bytes(), name


def test_kit_files(tiny_kit):
    config = json.loads((tiny_kit / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["vocab_size"] == 151936
    generation = json.loads((tiny_kit / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [151645, 151643]
    assert (generation["temperature"], generation["top_p"], generation["top_k"]) == (0.6, 0.95, 20)
    assert (tiny_kit / "model.safetensors").is_file()
    assert not list(tiny_kit.glob("*.bin"))
    assert "random" in (tiny_kit / "README.md").read_text().lower()


def test_gpt2_kit_is_a_base_model(gpt2_kit):
    config = json.loads((gpt2_kit / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"]
    assert config["vocab_size"] == 151936
    assert not (gpt2_kit / "chat_template.jinja").exists()


def test_qwen3_06b_preset_has_exact_shapes():
    preset = PRESETS["qwen3-0.6b"]
    c = preset.config
    shapes = (
        c["num_hidden_layers"],
        c["hidden_size"],
        c["intermediate_size"],
        c["num_attention_heads"],
        c["num_key_value_heads"],
        c["head_dim"],
    )
    assert shapes == (28, 1024, 3072, 16, 8, 128)
    assert c["tie_word_embeddings"] and preset.dtype == "bfloat16"


def test_refuses_foreign_folder(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a muestra kit"):
        build_kit("tiny", tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_unknown_preset():
    with pytest.raises(InputError, match="tiny-hybrid"):
        build_kit("huge")
