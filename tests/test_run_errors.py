"""A model that cannot load fails with one line and exit code 2, and leaves no trace in
the store: no new store file, no new run in an existing one."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from muestra.errors import InputError, ModelLoadError, ModelNotFoundError, UnsafeModelError
from muestra.models.loading import load_model, load_tokenizer
from test_experiments import write_spec


def remote_code_model(tiny_kit: Path, folder: Path) -> Path:
    """The tiny kit, with a config that names a model type only its own code defines."""
    shutil.copytree(tiny_kit, folder)
    config = json.loads((folder / "config.json").read_text("utf-8"))
    config["model_type"] = "muestra_custom_lm"
    config["auto_map"] = {
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def without_weights(tiny_kit: Path, folder: Path) -> Path:
    shutil.copytree(tiny_kit, folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    return folder


def run_count(store: Path) -> int:
    db = sqlite3.connect(store)
    try:
        return int(db.execute("SELECT count(*) FROM runs").fetchone()[0])
    finally:
        db.close()


def assert_one_line_error(result, *words: str) -> None:
    assert result.code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize("load", [load_model, load_tokenizer])
def test_remote_code_model_refused_without_trust(load, tiny_kit, tmp_path):
    folder = remote_code_model(tiny_kit, tmp_path / "custom")
    with pytest.raises(UnsafeModelError) as caught:
        load(str(folder))
    message = str(caught.value)
    assert str(folder) in message and "--trust-remote-code" in message
    assert "\n" not in message


def test_tokenizer_config_with_auto_map_refused_without_trust(tiny_kit, tmp_path):
    folder = tmp_path / "custom-tok"
    shutil.copytree(tiny_kit, folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text("utf-8"))
    settings["auto_map"] = {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    with pytest.raises(UnsafeModelError, match="--trust-remote-code"):
        load_tokenizer(str(folder))


def test_unknown_model_type_without_code_is_one_line_error(tiny_kit, tmp_path):
    folder = remote_code_model(tiny_kit, tmp_path / "unknown")
    config = json.loads((folder / "config.json").read_text("utf-8"))
    del config["auto_map"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="'muestra_custom_lm'.*Upgrade transformers"):
        load_model(str(folder))


def test_run_with_remote_code_model_leaves_no_store(cli, tiny_kit, tmp_path):
    spec = write_spec(tmp_path, remote_code_model(tiny_kit, tmp_path / "custom"), samples=1)
    store = tmp_path / "new.db"
    result = cli("run", str(spec), "--out", str(store))
    assert_one_line_error(result, "--trust-remote-code")
    assert not store.exists()


def test_run_without_weights_leaves_no_store(cli, tiny_kit, tmp_path):
    spec = write_spec(tmp_path, without_weights(tiny_kit, tmp_path / "empty"), samples=1)
    store = tmp_path / "new.db"
    result = cli("run", str(spec), "--out", str(store))
    assert_one_line_error(result, "no weights")
    assert not store.exists()
    assert not list(tmp_path.glob("new.db*"))  # nor its -wal / -shm files


def test_run_with_uncached_hub_id_offline_leaves_no_store(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = write_spec(tmp_path, Path("muestra-tests/not-in-any-cache"), samples=1)
    store = tmp_path / "new.db"
    result = cli("run", str(spec), "--out", str(store))
    assert_one_line_error(result, "muestra-tests/not-in-any-cache", "HF_HUB_OFFLINE")
    assert not store.exists()


def test_failing_model_adds_no_run_to_an_existing_store(cli, tiny_kit, tmp_path):
    spec = write_spec(tmp_path, tiny_kit, samples=1)
    store = tmp_path / "kept.db"
    assert cli("run", str(spec), "--out", str(store)).code == 0
    before = run_count(store)
    assert before == 1
    broken = without_weights(tiny_kit, tmp_path / "empty")
    result = cli("run", str(spec), "--out", str(store), "--model", str(broken), "--force-new")
    assert_one_line_error(result, "no weights")
    assert run_count(store) == before
    db = sqlite3.connect(store)
    labels = [row[0] for row in db.execute("SELECT label FROM models")]
    db.close()
    assert labels == [str(tiny_kit)]


def test_missing_model_error_type(tiny_kit, tmp_path):
    with pytest.raises(ModelNotFoundError, match="no weights"):
        load_model(str(without_weights(tiny_kit, tmp_path / "empty")))


# ---- models that pass the checks but fail to load -----------------------------------------

CUSTOM_CONFIG = """
from transformers import Qwen3Config


class CustomConfig(Qwen3Config):
    model_type = "muestra_custom_lm"
"""
CUSTOM_MODEL = """
from transformers import Qwen3ForCausalLM

from .configuration_custom import CustomConfig


class CustomForCausalLM(Qwen3ForCausalLM):
    config_class = CustomConfig
"""


def damaged_weights(tiny_kit: Path, folder: Path) -> Path:
    shutil.copytree(tiny_kit, folder)
    (folder / "model.safetensors").write_bytes(b"\xff" * 1000)
    return folder


def assert_ends_in_one_line_error(result, *words: str) -> None:
    """The run's plan line, its memory plan when the files could be read (a note, indented
    lines under it), then one error line: the model loads after the plans."""
    assert result.code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error:"), result.stderr
    if len(lines) > 2:
        assert lines[1].startswith("note: memory plan"), result.stderr
        assert all(line.startswith("  ") for line in lines[2:-1]), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[-1]


def test_damaged_weights_are_a_one_line_error(tiny_kit, tmp_path):
    folder = damaged_weights(tiny_kit, tmp_path / "damaged")
    with pytest.raises(ModelLoadError) as caught:
        load_model(str(folder))
    message = str(caught.value)
    assert str(folder) in message and "SafetensorError" in message and "\n" not in message


def test_a_model_that_fails_to_load_leaves_no_new_store(cli, tiny_kit, tmp_path):
    spec = write_spec(tmp_path, damaged_weights(tiny_kit, tmp_path / "damaged"), samples=1)
    store = tmp_path / "new.db"
    result = cli("run", str(spec), "--out", str(store))
    assert_ends_in_one_line_error(result, "did not load", "damaged")
    assert not list(tmp_path.glob("new.db*"))  # store, -wal, -shm and .lock


def test_a_model_that_fails_to_load_adds_no_run_to_an_existing_store(cli, tiny_kit, tmp_path):
    spec = write_spec(tmp_path, tiny_kit, samples=1)
    store = tmp_path / "kept.db"
    assert cli("run", str(spec), "--out", str(store)).code == 0
    damaged = damaged_weights(tiny_kit, tmp_path / "damaged")
    result = cli("run", str(spec), "--out", str(store), "--model", str(damaged), "--force-new")
    assert_ends_in_one_line_error(result, "did not load")
    assert run_count(store) == 1
    db = sqlite3.connect(store)
    models = db.execute("SELECT count(*) FROM models").fetchone()[0]
    samples = db.execute("SELECT count(*) FROM samples").fetchone()[0]
    db.close()
    assert (models, samples) == (1, 2)


def test_run_trusts_remote_code_only_when_told(cli, tiny_kit, tmp_path):
    folder = remote_code_model(tiny_kit, tmp_path / "custom")
    (folder / "configuration_custom.py").write_text(CUSTOM_CONFIG)
    (folder / "modeling_custom.py").write_text(CUSTOM_MODEL)
    spec = write_spec(tmp_path, folder, samples=1)
    store = tmp_path / "custom.db"
    refused = cli("run", str(spec), "--out", str(store))
    assert_one_line_error(refused, "--trust-remote-code", "trust_remote_code = true")
    assert not store.exists()
    trusted = cli("run", str(spec), "--out", str(store), "--trust-remote-code")
    assert trusted.code == 0, trusted.stderr
    db = sqlite3.connect(store)
    assert db.execute("SELECT count(*) FROM samples").fetchone()[0] == 2
    db.close()
    # the same, said in the spec
    trusted_id = f'id = "{folder}"\ntrust_remote_code = true'
    spec.write_text(spec.read_text().replace(f'id = "{folder}"', trusted_id))
    in_spec = cli("run", str(spec), "--out", str(tmp_path / "in-spec.db"))
    assert in_spec.code == 0, in_spec.stderr


def over_context_spec(folder: Path, model: Path) -> Path:
    """A spec the model loads for and then refuses on its first batch: a prompt longer
    than the tiny kit's 4,096-token context."""
    spec = folder / "long.toml"
    spec.write_text(f"""
name = "largo"
samples = 2
[model]
id = "{model}"
[prompt]
user = "{"palabra " * 4500}"
[[prompt.items]]
id = "a"
[answer]
max_tokens = 4
""")
    return spec


def test_a_run_refused_after_the_store_opened_leaves_no_store(cli, tiny_kit, tmp_path):
    """It left a store with one failed run and no samples (and its .lock)."""
    result = cli("run", str(over_context_spec(tmp_path, tiny_kit)), "--out", str(tmp_path / "l.db"))
    assert_ends_in_one_line_error(result, "over the model's context")
    assert not list(tmp_path.glob("l.db*"))


def test_a_run_refused_after_the_store_opened_adds_no_run(cli, tiny_kit, tmp_path):
    store = tmp_path / "kept.db"
    assert cli("run", str(write_spec(tmp_path, tiny_kit, samples=1)), "--out", str(store)).code == 0
    long = over_context_spec(tmp_path, tiny_kit)
    result = cli("run", str(long), "--out", str(store), "--force-new")
    assert_ends_in_one_line_error(result, "over the model's context")
    assert run_count(store) == 1
