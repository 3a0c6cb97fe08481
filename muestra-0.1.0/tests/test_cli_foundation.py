"""The foundation commands, run as a user types them."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT
from test_kit_tokenizer import SEED_001_IDS, SEED_003_IDS

COMMANDS = [
    [],
    ["kit"],
    ["kit", "build"],
    ["tokens"],
    ["chat"],
    ["next"],
    ["generate"],
    ["run"],
    ["summary"],
    ["export"],
    ["analyze"],
    ["report"],
    ["serve"],
]


def test_version(cli):
    result = cli("--version")
    assert result.code == 0 and result.stdout.startswith("muestra 0.")
    # the installed entry point in a real process too (env= forces a subprocess)
    real = cli("--version", env={})
    assert real.code == 0 and real.stdout == result.stdout
    missing = cli("summary", "/nonexistent/store.db", env={})
    assert missing.code == 2 and "does not exist" in missing.stderr


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "muestra")
def test_help_on_every_command(cli, command):
    result = cli(*command, "--help")
    assert result.code == 0, result.stderr
    assert "Usage" in result.stdout


def test_kit_build_help_says_random(cli):
    assert "RANDOM" in cli("kit", "build", "--help").stdout


def test_kit_build_cli(cli, tmp_path):
    result = cli("kit", "build", "--preset", "gpt2-tiny", "--out", str(tmp_path / "g"))
    assert result.code == 0, result.stderr
    assert (tmp_path / "g" / "model.safetensors").is_file()
    bad = cli("kit", "build", "--preset", "nope")
    assert bad.code == 2 and "choose one of" in bad.stderr


def test_tokens_json_seed_001(cli, tiny_kit):
    result = cli("tokens", str(tiny_kit), "Lista de colores: rojo, azul", "--json")
    assert result.code == 0, result.stderr
    data = result.json()
    assert data["ids"] == SEED_001_IDS and data["count"] == 10
    assert data["tokens"][1] == "Ġde" and data["model"] == str(tiny_kit)


def test_tokens_compare(cli, tiny_kit, gpt2_kit):
    result = cli("tokens", str(tiny_kit), "hola", "--compare", str(gpt2_kit), "--json")
    data = result.json()
    assert [d["model"] for d in data] == [str(tiny_kit), str(gpt2_kit)]
    table = cli("tokens", str(tiny_kit), "hola mundo", "--compare", str(gpt2_kit))
    assert table.code == 0 and "Ġmundo" in table.stdout


def test_chat_json_seed_003(cli, tiny_kit):
    messages = ROOT / "examples" / "messages" / "strawberry.json"
    result = cli("chat", str(tiny_kit), "--messages", str(messages), "--json")
    assert result.code == 0, result.stderr
    assert result.json()["ids"] == SEED_003_IDS


def test_chat_hybrid_switch(cli, hybrid_kit, tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"role": "user", "content": "hola"}]))
    off = cli("chat", str(hybrid_kit), "--messages", str(path), "--no-enable-thinking", "--json")
    assert off.json()["text"].endswith("<think>\n\n</think>\n\n")
    bare = cli("chat", str(hybrid_kit), "--messages", str(path), "--no-generation-prompt", "--json")
    assert bare.json()["text"] == "<|im_start|>user\nhola<|im_end|>\n"


def test_chat_bad_messages_name_file_and_field(cli, tiny_kit, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(
        json.dumps([{"role": "user", "content": "hi"}, {"role": "robot", "content": 1}])
    )
    result = cli("chat", str(tiny_kit), "--messages", str(path))
    assert result.code == 2
    assert str(path) in result.stderr and "[1].role" in result.stderr and "robot" in result.stderr
    syntax = tmp_path / "syntax.json"
    syntax.write_text('[{"role": "user",]')
    result = cli("chat", str(tiny_kit), "--messages", str(syntax))
    assert result.code == 2 and "line 1" in result.stderr


def test_chat_on_base_model_is_a_clear_error(cli, gpt2_kit):
    messages = ROOT / "examples" / "messages" / "strawberry.json"
    result = cli("chat", str(gpt2_kit), "--messages", str(messages))
    assert result.code == 2 and "no chat template" in result.stderr


def test_next_token_table(cli, tiny_kit):
    result = cli("next", str(tiny_kit), "Hola", "--top", "7", "--json")
    assert result.code == 0, result.stderr
    rows = result.json()["candidates"]
    assert [r["rank"] for r in rows] == list(range(1, 8))
    probs = [r["probability"] for r in rows]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert rows[-1]["cumulative"] == pytest.approx(sum(probs), rel=1e-5)
    table = cli("next", str(tiny_kit), "Hola", "--raw", "--top", "3")
    assert table.code == 0 and "prob" in table.stdout


def test_missing_model_path(cli, tmp_path):
    result = cli("next", str(tmp_path / "absent"), "hola")
    assert result.code == 2 and "muestra kit build" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_hub_gives_offline_message(cli, tmp_path):
    env = {
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HUB_CACHE": str(tmp_path),
        "HF_HUB_OFFLINE": "0",
    }
    result = cli("tokens", "nobody/no-such-model", "hola", env=env)
    assert result.code == 2 and "muestra kit build" in result.stderr
