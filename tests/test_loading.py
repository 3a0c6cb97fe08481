"""Model loading: one code path for kits and Hub snapshots, safe by default."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from muestra.errors import ModelNotFoundError, UnsafeModelError
from muestra.models.loading import load_model, load_tokenizer, resolve_model


def test_kit_loads_with_provenance(tiny_kit):
    loaded = load_model(str(tiny_kit), device="cpu")
    assert type(loaded.model).__name__ == "Qwen3ForCausalLM"
    assert loaded.model.dtype == torch.float32
    assert loaded.eos_token_ids == [151645, 151643]
    assert loaded.vocab_size == 151936
    prov = loaded.provenance
    assert prov.source == "local" and prov.kit_preset == "tiny"
    assert len(prov.weights_sha256) == 64
    assert load_model(str(tiny_kit), device="cpu").provenance.weights_sha256 == prov.weights_sha256


def test_dtype_option(tiny_kit):
    assert load_model(str(tiny_kit), dtype="bfloat16").model.dtype == torch.bfloat16


def test_hub_snapshot_goes_through_the_same_path(tiny_kit, tmp_path, monkeypatch):
    """A Hub id resolves to its cached snapshot folder, then loads like a kit folder."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--muestra--tiny"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(tiny_kit, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    folder, source, revision = resolve_model("muestra/tiny")
    assert (folder, source, revision) == (snapshot, "hub", commit)
    loaded = load_model("muestra/tiny", device="cpu")
    assert loaded.provenance.revision == commit
    assert loaded.provenance.model_id == "muestra/tiny"


def test_pickle_only_folder_is_refused(tiny_kit, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_kit, folder)
    model = load_model(str(tiny_kit), device="cpu").model
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(UnsafeModelError, match="--allow-pickle"):
        load_model(str(folder))
    loaded = load_model(str(folder), allow_pickle=True)
    assert torch.equal(loaded.model.lm_head.weight, model.lm_head.weight)


def test_missing_path_message(tmp_path):
    with pytest.raises(ModelNotFoundError, match="muestra kit build"):
        load_model(str(tmp_path / "nowhere"))


def test_folder_without_weights(tiny_kit, tmp_path):
    folder = tmp_path / "noweights"
    shutil.copytree(tiny_kit, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="no weights"):
        load_model(str(folder))
    assert len(load_tokenizer(str(folder))) == 151669  # tokenizer-only commands still work


def test_uncached_hub_id_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as info:
        load_tokenizer("nobody/no-such-model")
    message = str(info.value)
    assert "muestra kit build" in message and "local folder" in message and "network" in message


def test_a_gguf_file_keeps_its_chat_template(smol_kit):
    """transformers' GGUF tokenizer can leave out `tokenizer.chat_template` (it did for the
    kit's own .gguf, beside the kit's tokenizer files): a chat model run or served from its
    .gguf refused messages as a base model's."""
    (gguf,) = smol_kit.glob("*.gguf")
    messages = [{"role": "user", "content": "hola"}]
    bare, kit = load_tokenizer(str(gguf)), load_tokenizer(str(smol_kit))
    assert bare.apply_chat_template(messages, tokenize=False) == kit.apply_chat_template(
        messages, tokenize=False
    )


def test_a_gguf_s_rebuilt_tokenizer_is_kept_and_read_back_the_same(smol_kit, tmp_path, monkeypatch):
    """Rebuilding a GGUF's tokenizer from its metadata took 9 s for SmolLM2 and 47 s for
    Gemma 3, for every command on a bare .gguf (twice a run). It is kept in muestra's cache
    under a hash of the header and read back: the same vocabulary, special tokens, flags,
    chat template and token ids, without rebuilding; a damaged entry is rebuilt."""
    import muestra.models.gguf as gguf_module
    from muestra.models.gguf import load_gguf_tokenizer

    monkeypatch.setenv("MUESTRA_CACHE", str(tmp_path))
    (file,) = smol_kit.glob("*.gguf")
    rebuilt = load_gguf_tokenizer(file)
    (kept,) = (tmp_path / "tokenizers").iterdir()

    def no_rebuild():
        raise AssertionError("rebuilt from the GGUF although it was kept")

    monkeypatch.setattr(gguf_module, "_parsed_once", no_rebuild)
    again = load_gguf_tokenizer(file)
    assert type(again) is type(rebuilt) and again.get_vocab() == rebuilt.get_vocab()
    assert again.all_special_tokens == rebuilt.all_special_tokens
    assert (again.add_bos_token, again.name_or_path) == (rebuilt.add_bos_token, str(smol_kit))
    messages = [{"role": "user", "content": "¿De qué color es el cielo?"}]
    assert again.apply_chat_template(messages, tokenize=False) == rebuilt.apply_chat_template(
        messages, tokenize=False
    )
    for text in ("Hola, ¿qué tal?  El\tcielo 🎲", "<|im_start|>user\nhi<|im_end|>", " x"):
        assert again(text)["input_ids"] == rebuilt(text)["input_ids"]
    monkeypatch.undo()
    monkeypatch.setenv("MUESTRA_CACHE", str(tmp_path))
    (kept / "tokenizer.json").write_text("{", encoding="utf-8")  # damaged
    assert load_gguf_tokenizer(file).get_vocab() == rebuilt.get_vocab()
    assert json.loads((kept / "tokenizer.json").read_text(encoding="utf-8"))  # rebuilt whole
