"""Speculative decoding: greedy output equals plain greedy token for token; sampled output
follows the target's distribution (χ² on the rejection rule itself and end to end)."""

from __future__ import annotations

import hashlib

import pytest
import torch
from scipy.stats import chisquare

from muestra.engine import Engine, GenerationRequest, SamplingParams
from muestra.engine.seeds import generator_for
from muestra.engine.speculative import (
    layer_draft,
    speculative_decode,
    speculative_generate,
    verify,
)
from muestra.errors import InputError
from test_engine import PROMPTS, encode

GREEDY = SamplingParams(temperature=0)


def test_the_rejection_rule_emits_the_target_distribution():
    """Draft tokens drawn from q, verified against p: the emitted first and second tokens
    follow p_0 and p_1 whatever q is (q very unlike p here)."""
    p = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.05, 0.05], [0.05, 0.05, 0.1, 0.1, 0.2, 0.5]])
    ps = torch.cat([p, p[:1]])  # a bonus row
    q = torch.tensor([0.05, 0.05, 0.1, 0.2, 0.3, 0.3])
    rng = generator_for(1234)
    firsts, seconds = torch.zeros(6), torch.zeros(6)
    draws = 20000
    for _ in range(draws):
        drafted = torch.multinomial(torch.stack([q, q]), 1, generator=rng).flatten().tolist()
        new = verify(drafted, [q, q], ps, greedy=False, rng=rng)
        firsts[new[0]] += 1
        if len(new) > 1:
            seconds[new[1]] += 1
    assert chisquare(firsts.numpy(), p[0].numpy() * draws).pvalue > 0.001
    n = seconds.sum()
    assert chisquare(seconds.numpy(), p[1].numpy() * n.item()).pvalue > 0.001


def test_greedy_verification_keeps_the_targets_argmax():
    ps = torch.nn.functional.one_hot(torch.tensor([3, 1, 4]), 6).float()
    q = torch.full((6,), 1 / 6)
    rng = generator_for(0)
    assert verify([3, 1], [q, q], ps, greedy=True, rng=rng) == [3, 1, 4]
    assert verify([3, 2], [q, q], ps, greedy=True, rng=rng) == [3, 1]
    assert verify([0, 1], [q, q], ps, greedy=True, rng=rng) == [3]


def test_a_layer_draft_shares_the_weights_and_equals_an_early_exit(smol):
    model = smol.model
    draft = layer_draft(model, 10)
    assert draft.model.embed_tokens.weight is model.model.embed_tokens.weight
    assert draft.model.layers[9].mlp.up_proj.weight is model.model.layers[9].mlp.up_proj.weight
    ids = torch.tensor([encode(smol, "The capital of France is")])
    with torch.inference_mode():
        hidden = model(ids, output_hidden_states=True).hidden_states[10]
        manual = model.lm_head(model.model.norm(hidden))
        assert torch.allclose(draft(ids).logits, manual, atol=1e-4)
    with pytest.raises(InputError, match="layer draft"):
        layer_draft(model, 30)


def test_greedy_output_equals_plain_greedy_on_the_real_model(smol, k=4):
    engine = Engine.from_loaded(smol)
    draft = layer_draft(smol.model, 24)
    for text in ("The capital of France is", "Había una vez"):
        request = GenerationRequest(encode(smol, text), params=GREEDY, max_new_tokens=24)
        plain = engine.generate([request])[0][0]
        result = speculative_generate(engine, draft, request, k)
        assert result.token_ids == plain.token_ids
        assert result.finish_reason == plain.finish_reason
        assert result.rounds <= len(result.token_ids)


def test_a_layer_draft_of_gemma_shares_its_non_persistent_buffers(gemma_kit):
    """Gemma keeps its embedding scale (and rotary frequencies) in non-persistent buffers,
    which no state dict carries: the draft shares the target's instead of leaving them on
    the meta device (it failed with "Tensor on device meta"). Greedy stays plain greedy."""
    from muestra.models.loading import load_model

    gemma = load_model(str(gemma_kit), device="cpu", dtype="float32")
    draft = layer_draft(gemma.model, 6)
    assert not any(b.is_meta for b in draft.buffers())
    engine = Engine.from_loaded(gemma)
    request = GenerationRequest(
        gemma.tokenizer.encode("Lista de colores: rojo, azul"), params=GREEDY, max_new_tokens=12
    )
    plain = engine.generate([request])[0][0]
    assert speculative_generate(engine, draft, request, 4).token_ids == plain.token_ids


def test_greedy_on_the_gpt2_kit(gpt2):
    loaded = gpt2
    engine = Engine.from_loaded(loaded)
    draft = layer_draft(loaded.model, 1)
    for text in PROMPTS[:2]:
        request = GenerationRequest(encode(loaded, text), params=GREEDY, max_new_tokens=16)
        assert (
            speculative_generate(engine, draft, request, 3).token_ids
            == engine.generate([request])[0][0].token_ids
        )


@pytest.mark.parametrize(
    ("arch", "layers"), [pytest.param("qwen", 1, marks=pytest.mark.long), ("smol", 24)]
)
def test_sampled_first_tokens_follow_the_targets_distribution(arch, layers, request):
    """End to end on the tiny kit (a one-layer draft of two) and the real model (24 of 30
    layers): the first token of 300 speculative samples (T 1, top-k 6), decoded as one
    batch, against the target's exact processed distribution (χ²)."""
    from muestra.engine.sampling import SamplingBatch

    loaded = request.getfixturevalue(arch)
    engine = Engine.from_loaded(loaded)
    draft = layer_draft(loaded.model, layers)
    params = SamplingParams(temperature=1.0, top_k=6)
    text = PROMPTS[0] if arch == "qwen" else "My favourite colour is"
    prompt = encode(loaded, text)
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([prompt])).logits[:, -1, :].float()
    probs = SamplingBatch.build([params], engine.vocab_size, engine.device).warp(logits)
    probs = probs.logits.softmax(-1)[0]
    support = probs.nonzero().flatten().tolist()
    counts = dict.fromkeys(support, 0)
    draws = 300  # one ragged batch of 300 rows, each with its own seed
    request = GenerationRequest(prompt, n=draws, params=params, max_new_tokens=2, seed=5)
    for result in speculative_decode(engine, draft, [request], 1)[0]:
        counts[result.token_ids[0]] += 1
    mass = sum(float(probs[t]) for t in support)
    expected = [float(probs[t]) / mass * draws for t in support]
    assert chisquare([counts[t] for t in support], expected).pvalue > 0.001


@pytest.mark.parametrize(
    ("params", "words"),
    [
        (SamplingParams(temperature=0, repetition_penalty=1.2), "penalties"),
        (SamplingParams(temperature=0, dola_layers="high"), "DoLa"),
    ],
)
def test_what_speculation_cannot_do_is_refused(smol, params, words):
    request = GenerationRequest([1, 2, 3], params=params)
    with pytest.raises(InputError, match=words):
        speculative_generate(Engine.from_loaded(smol), layer_draft(smol.model, 4), request)


def test_the_cli_speculates_with_a_layer_draft_or_a_model(cli, smol_kit, tiny_kit):
    base = ["generate", str(smol_kit), "--prompt", "Name a colour.", "--max-new-tokens", "12"]
    plain = cli(*base, "--temperature", "0")
    fast = cli(*base, "--temperature", "0", "--draft-model", "layers:24")
    assert plain.code == 0 and fast.code == 0, fast.stderr
    assert fast.json_lines()[0]["token_ids"] == plain.json_lines()[0]["token_ids"]
    assert set(fast.json_lines()[0]["speculative"]) >= {"rounds", "acceptance_rate"}
    sampled = cli(*base, "--seed", "3", "--draft-model", "layers:24")
    three = cli(*base, "--seed", "3", "--n", "3", "--draft-model", "layers:24")
    assert three.code == 0, three.stderr
    assert [line["sample"] for line in three.json_lines()] == [0, 1, 2]
    assert sampled.json_lines()[0]["token_ids"] == three.json_lines()[0]["token_ids"]
    other = cli(*base, "--temperature", "0", "--draft-model", str(tiny_kit))
    assert other.code == 2 and "vocabulary differs" in other.stderr


def test_a_ragged_batch_is_each_row_decoded_alone(smol, gpt2, monkeypatch):
    """Rows of different prompts and budgets accept different numbers of drafts per round:
    greedy rows equal plain greedy (GPT-2 kit, k = 8 with a one-layer draft: many masked
    holes, so the cache is compacted along the way); sampled rows of the real model equal
    themselves decoded alone (same seeds, same draws)."""
    import muestra.models.runtime.torch_runtime as torch_runtime

    compactions = []
    real_gather = torch_runtime.gather_columns
    monkeypatch.setattr(
        torch_runtime, "gather_columns", lambda *a: compactions.append(1) or real_gather(*a)
    )
    engine = Engine.from_loaded(gpt2)
    draft = layer_draft(gpt2.model, 1)
    requests = [
        GenerationRequest(encode(gpt2, text), params=GREEDY, max_new_tokens=budget)
        for text, budget in ((PROMPTS[0], 60), (PROMPTS[1], 7), (PROMPTS[2], 45))
    ]
    batched = speculative_decode(engine, draft, requests, 8)
    for request, (result,) in zip(requests, batched, strict=True):
        assert result.token_ids == engine.generate([request])[0][0].token_ids
    assert compactions, "no compaction happened: the test does not cover it"

    engine = Engine.from_loaded(smol)
    draft = layer_draft(smol.model, 24)
    sampled = SamplingParams(temperature=0.8, top_p=0.9)
    requests = [
        GenerationRequest(encode(smol, "Once upon a time"), n=2, params=sampled, max_new_tokens=10),
        GenerationRequest(
            encode(smol, "The capital of France is"), params=GREEDY, max_new_tokens=6
        ),
    ]
    batched = speculative_decode(engine, draft, requests, 4)
    alone = speculative_decode(engine, draft, requests[:1], 4)[0]
    assert [r.token_ids for r in batched[0]] == [r.token_ids for r in alone]
    assert batched[0][0].token_ids != batched[0][1].token_ids  # two seeds, two texts
    assert batched[1][0].token_ids == engine.generate(requests[1:])[0][0].token_ids


def test_the_server_speculates_with_its_draft_model(smol_kit):
    from fastapi.testclient import TestClient

    from muestra.models.loading import load_model
    from muestra.server.app import create_app
    from muestra.server.service import ServedModel
    from test_server import in_process

    loaded = load_model(str(smol_kit), dtype="float32")
    served = ServedModel(loaded, "s", draft=layer_draft(loaded.model, 24))
    body = {"model": "s", "prompt": ["The capital of France is", "Once upon"], "max_tokens": 10}
    with TestClient(create_app(served)) as http:
        greedy = {**body, "temperature": 0}
        plain = http.post("/v1/completions", json=greedy)
        fast = http.post("/v1/completions", json={**greedy, "speculative": True})
        assert fast.status_code == 200, fast.text
        assert [c["text"] for c in fast.json()["choices"]] == [
            c["text"] for c in plain.json()["choices"]
        ]
        stats = fast.json()["choices"][0]["muestra"]["speculative"]
        assert stats["rounds"] >= 1 and 0 <= stats["acceptance_rate"] <= 1
        sampled = {**body, "temperature": 0.9, "n": 2, "seed": 3, "speculative": True}
        first = http.post("/v1/completions", json=sampled).json()["choices"]
        again = http.post("/v1/completions", json=sampled).json()["choices"]
        assert [c["index"] for c in first] == [0, 1, 2, 3]
        assert [c["text"] for c in first] == [c["text"] for c in again]  # seeded
        assert first[0]["text"] != first[1]["text"]
        for change, word in (({"stop": ["x"]}, "stop"), ({"logit_bias": {"5": 1}}, "logit_bias")):
            refused = http.post("/v1/completions", json={**sampled, **change})
            assert refused.status_code == 400 and word in refused.text, refused.text
    with in_process(smol_kit, "s") as http:  # no --draft-model
        refused = http.post("/v1/completions", json={**body, "speculative": True})
        assert refused.status_code == 400 and "--draft-model" in refused.text


# ---- experiments: free-text answers by prompt lookup or a draft model ------------------


def drafted_spec(folder, model, answer: str):
    # a name per answer that never collides (`hash() % 1000` did, about once in 300 runs:
    # two specs then shared a store and the second was refused)
    spec = folder / f"drafted-{hashlib.sha256(answer.encode()).hexdigest()[:12]}.toml"
    spec.write_text(f'''
name = "drafted"
seed = 21
samples = 2
[model]
id = "{model}"
[prompt]
user = "Repeat exactly: {{text}}"
[[prompt.items]]
id = "a"
text = "the cat sat on the mat"
[[prompt.items]]
id = "b"
text = "muestra samples models"
[think]
budget = 6
temperature = 0.9
[answer]
max_tokens = 12
{answer}
''')
    return spec


def test_an_experiment_answers_by_prompt_lookup_or_a_draft_like_greedy(cli, smol_kit, tmp_path):
    import sqlite3

    def rows(spec):
        out = tmp_path / (spec.stem + ".db")
        result = cli("run", str(spec), "--out", str(out))
        assert result.code == 0, result.stderr
        db = sqlite3.connect(out)
        try:
            return db.execute(
                "SELECT prompt_id, sample_index, seed, reasoning, answer_text, finish_reason "
                "FROM samples ORDER BY prompt_id, sample_index"
            ).fetchall()
        finally:
            db.close()

    plain = rows(drafted_spec(tmp_path, smol_kit, ""))
    lookup = rows(drafted_spec(tmp_path, smol_kit, "prompt_lookup = 6"))
    draft = rows(drafted_spec(tmp_path, smol_kit, 'draft_model = "layers:24"'))
    assert len(plain) == 4 and all(r[3] for r in plain)  # sampled reasonings
    assert lookup == plain and draft == plain


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        ('prompt_lookup = 4\nchoice = ["a", "b"]', ["answer.prompt_lookup", "choice"]),
        ("prompt_lookup = 4\ntemperature = 0.5", ["greedily", "temperature"]),
        ('draft_model = "layers:2"\nregex = "a+"', ["answer.draft_model", "regex"]),
        ('prompt_lookup = 4\ndraft_model = "layers:2"', ["draft_model"]),
        ("num_speculative_tokens = 3", ["num_speculative_tokens applies"]),
    ],
)
def test_drafted_answer_mistakes_are_refused_by_name(tmp_path, answer, words):
    from muestra.experiments.spec import load_spec

    spec = drafted_spec(tmp_path, "org/model", answer)
    with pytest.raises(InputError) as info:
        load_spec(spec, check_models=False)
    for word in [str(spec), *words]:
        assert word in str(info.value), str(info.value)
