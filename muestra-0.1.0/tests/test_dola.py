"""DoLa in the batched engine against a plain reference: HF v4's algorithm written out
with one full forward per step (all hidden states, no cache), batch size 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from muestra.engine import Engine, GenerationRequest, SamplingParams
from muestra.engine.dola import candidate_layers
from muestra.errors import InputError
from test_engine import PROMPTS, encode

# ---- the reference: HF v4's functions, verbatim in substance --------------------------------


def reference_relative_top_filter(scores, baseline_scores, relative_top=0.1):
    scores_normalized = scores.log_softmax(dim=-1)
    baseline_scores_normalized = baseline_scores.log_softmax(dim=-1)
    sorted_logits, _ = torch.sort(scores_normalized, descending=True)
    min_thresh = sorted_logits[..., 0]
    probs_max = torch.max(scores_normalized, dim=-1).values
    probs_thresh = torch.min(min_thresh, probs_max + np.log(relative_top)).unsqueeze(-1)
    baseline_scores_normalized[scores_normalized < probs_thresh] = -1e-3
    scores_normalized[scores_normalized < probs_thresh] = -float("inf")
    return scores_normalized, baseline_scores_normalized


def reference_select_contrast(layers, premature, final):
    if len(layers) == 1:
        final, base = reference_relative_top_filter(final, premature[layers[0]])
        return final - base
    stacked = torch.stack([premature[i] for i in layers], dim=0)
    avg = 0.5 * (F.softmax(final, dim=-1)[None, :, :] + F.softmax(stacked, dim=-1))
    kl1 = F.kl_div(F.log_softmax(final, dim=-1)[None, :, :], avg, reduction="none").mean(-1)
    kl2 = F.kl_div(F.log_softmax(stacked, dim=-1), avg, reduction="none").mean(-1)
    js = (0.5 * (kl1 + kl2)).mean(-1)
    base = premature[layers[int(js.argmax().item())]]
    final, base = reference_relative_top_filter(final, base)
    return final - base


@torch.inference_mode()
def reference_dola(loaded, prompt, layers, steps, repetition_penalty, eos):
    model, ids = loaded.model, list(prompt)
    head = model.get_output_embeddings()
    out_tokens = []
    for _ in range(steps):
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        final = out.logits[:, -1, :].float()
        premature = {i: head(out.hidden_states[i][:, -1, :]).float() for i in layers}
        scores = reference_select_contrast(list(layers), premature, final)
        if repetition_penalty != 1.0:  # HF's RepetitionPenaltyLogitsProcessor
            seen = torch.tensor([ids])
            score = torch.gather(scores, 1, seen)
            score = torch.where(score < 0, score * repetition_penalty, score / repetition_penalty)
            scores = scores.scatter(1, seen, score)
        token = int(scores.argmax(dim=-1))
        out_tokens.append(token)
        ids.append(token)
        if token in eos:
            break
    return out_tokens


# ---- layers ---------------------------------------------------------------------------------


def test_candidate_layers_follow_hf_rules(qwen, gpt2, smol):
    for loaded in (qwen, gpt2, smol):
        n = loaded.model.config.num_hidden_layers
        start = 2 if n > 2 else (1 if n == 2 else 0)  # every kit ties its embeddings
        low = (start,) if start == n // 2 else tuple(range(start, n // 2, 2))
        assert candidate_layers(loaded.model.config, "low") == low
        assert candidate_layers(loaded.model.config, "high") == tuple(range(n // 2, n, 2))
    assert candidate_layers(smol.model.config, "high") == (15, 17, 19, 21, 23, 25, 27, 29)
    assert candidate_layers(smol.model.config, (3, 50, 8)) == (3, 8)
    with pytest.raises(InputError, match="no index below"):
        candidate_layers(smol.model.config, (30, 31))


@pytest.mark.parametrize("bad", ["middle", (), (-1,), (1.5,), [2, 4], (True,)], ids=str)
def test_bad_dola_layers_are_refused_by_name(bad):
    with pytest.raises(InputError, match="dola_layers"):
        SamplingParams(dola_layers=bad)


# ---- the oracle -----------------------------------------------------------------------------


def assert_like_reference(loaded, texts, dola, penalty, steps=12):
    engine = Engine.from_loaded(loaded)
    params = SamplingParams(temperature=0, repetition_penalty=penalty, dola_layers=dola)
    prompts = [encode(loaded, t) for t in texts]
    batched = engine.generate(
        [GenerationRequest(p, params=params, max_new_tokens=steps) for p in prompts]
    )
    layers = candidate_layers(loaded.model.config, dola)
    for prompt, samples in zip(prompts, batched, strict=True):
        reference = reference_dola(loaded, prompt, layers, steps, penalty, engine.eos_token_ids)
        assert samples[0].token_ids == reference


@pytest.mark.parametrize("arch", ["qwen", "gpt2"])
@pytest.mark.parametrize(
    ("dola", "penalty"), [("low", 1.0), ("high", 1.2), ((0, 1, 3), 1.2), ((1,), 1.0)], ids=str
)
def test_dola_matches_the_reference_on_kits(arch, dola, penalty, request):
    assert_like_reference(request.getfixturevalue(arch), PROMPTS[:3], dola, penalty)


@pytest.mark.parametrize("dola", ["high", "low"])
def test_dola_matches_the_reference_on_the_real_model(smol, dola):
    # one prompt, 8 steps: the reference recomputes every layer without a cache (the kits
    # cover batches and longer runs; `make test` has a time budget)
    texts = ["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"]
    assert_like_reference(smol, texts, dola, 1.2, steps=8)


def test_dola_changes_what_the_real_model_says(smol):
    engine = Engine.from_loaded(smol)
    prompt = encode(smol, "The three primary colours are")
    plain = engine.generate(
        [GenerationRequest(prompt, params=SamplingParams(temperature=0), max_new_tokens=16)]
    )
    dola = engine.generate(
        [
            GenerationRequest(
                prompt,
                params=SamplingParams(temperature=0, dola_layers="high", repetition_penalty=1.2),
                max_new_tokens=16,
            )
        ]
    )
    assert plain[0][0].token_ids != dola[0][0].token_ids


def test_sampled_dola_rows_do_not_depend_on_their_batch(smol):
    # the real model: on the random-weight kits a near-uniform 151k-token draw can flip
    # on the last bits of a batched product, with or without DoLa (see README, engine)
    engine = Engine.from_loaded(smol)
    prompts = [encode(smol, t) for t in PROMPTS]
    dola = SamplingParams(temperature=0.8, top_p=0.9, dola_layers="high")
    plain = SamplingParams(temperature=0.8)
    mixed = [
        GenerationRequest(p, n=2, params=dola if i % 2 == 0 else plain, max_new_tokens=10, seed=7)
        for i, p in enumerate(prompts)
    ]
    together = [[s.token_ids for s in r] for r in engine.generate(mixed)]
    alone = [[s.token_ids for s in engine.generate([r])[0]] for r in mixed]
    assert together == alone


def test_the_server_and_the_cli_take_dola_layers(smol_kit, smol, cli):
    from test_server import in_process

    engine = Engine.from_loaded(smol)
    text = "The three primary colours are"
    params = SamplingParams(temperature=0, dola_layers="high", repetition_penalty=1.2)
    direct = engine.generate(
        [GenerationRequest(encode(smol, text), params=params, max_new_tokens=12)]
    )
    expected = smol.tokenizer.decode(direct[0][0].token_ids)
    body = {"model": "s", "prompt": text, "max_tokens": 12, "temperature": 0,
            "repetition_penalty": 1.2, "dola_layers": "high"}  # fmt: skip
    with in_process(smol_kit, "s") as http:
        served = http.post("/v1/completions", json=body)
        assert served.status_code == 200, served.text
        assert served.json()["choices"][0]["text"] == expected
        for bad in ("mid", [], [99], [-1], ["2"]):
            refused = http.post("/v1/completions", json={**body, "dola_layers": bad})
            assert refused.status_code == 400 and "dola_layers" in refused.text, refused.text
    result = cli(
        "generate", str(smol_kit), "--prompt", text, "--raw", "--temperature", "0",
        "--max-new-tokens", "12", "--repetition-penalty", "1.2", "--dola-layers", "high",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    assert result.json_lines()[0]["token_ids"] == direct[0][0].token_ids
