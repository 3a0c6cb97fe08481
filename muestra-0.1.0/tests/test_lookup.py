"""Prompt-lookup decoding gives plain greedy decoding's tokens, in fewer forwards when the
answer copies its prompt."""

from __future__ import annotations

import pytest
import torch

from muestra.engine import Engine, GenerationRequest, SamplingParams
from muestra.engine.lookup import find_draft, lookup_decode, lookup_greedy
from muestra.errors import InputError
from muestra.models.runtime.kv_cache import GrowingCache
from test_engine import PROMPTS, encode

GREEDY = SamplingParams(temperature=0)
COPY = (
    "Repeat this text exactly, word for word:\n\nThe quick brown fox jumps over the lazy "
    "dog. Muestra samples language models many times under exact control and measures what "
    "comes out, so that a researcher can tell whether a model's preference is real or noise."
)


def test_find_draft_takes_the_first_earlier_match_longest_ngram_first():
    context = [1, 2, 3, 9, 2, 3, 7, 8, 1, 2, 3]
    assert find_draft(context, 3, 2) == [9, 2, 3]  # "2 3" first follows at index 3
    assert find_draft(context, 10, 1) == [9, 2, 3, 7, 8, 1, 2, 3]  # "3" first at index 2
    assert find_draft([5, 6, 7], 4, 2) == []  # nothing repeats
    assert find_draft([4, 4], 3, 2) == [4]  # the match may overlap the tail


def test_growing_cache_crop_forgets_the_last_positions():
    cache = GrowingCache(1, capacity=8)
    layer = cache.layers[0]
    keys = torch.arange(2 * 5, dtype=torch.float32).view(1, 1, 5, 2)
    layer.update(keys, keys + 100)
    cache.crop(-2)
    assert layer.length == 3 and torch.equal(layer.keys, keys[:, :, :3])
    new = torch.full((1, 1, 1, 2), -1.0)
    got_keys, got_values = layer.update(new, new)
    assert torch.equal(got_keys, torch.cat([keys[:, :, :3], new], dim=2))
    assert torch.equal(got_values[:, :, :3], keys[:, :, :3] + 100)
    with pytest.raises(ValueError):
        cache.crop(1)


def lookup_equals_greedy(loaded, prompt, max_new_tokens=40, **options):
    engine = Engine.from_loaded(loaded)
    request = GenerationRequest(prompt, params=GREEDY, max_new_tokens=max_new_tokens)
    plain = engine.generate([request])[0][0]
    result = lookup_greedy(engine, request, **options)
    assert result.token_ids == plain.token_ids
    assert result.finish_reason == plain.finish_reason
    return result


def test_on_the_real_model_a_copy_task_takes_fewer_forwards(smol):
    prompt = smol.tokenizer.apply_chat_template(
        [{"role": "user", "content": COPY}], add_generation_prompt=True, tokenize=False
    )
    ids = encode(smol, prompt)
    result = lookup_equals_greedy(smol, ids, max_new_tokens=48)
    assert result.forwards < len(result.token_ids) / 2  # several tokens per forward
    assert result.accepted > 0 and 0 < result.acceptance_rate <= 1
    lookup_equals_greedy(smol, ids, 24, num_tokens=3, max_ngram=3)


def test_a_prompt_with_nothing_to_copy_is_still_greedy(smol):
    lookup_equals_greedy(smol, encode(smol, "The three primary colours are"), 32)


@pytest.mark.parametrize("arch", ["qwen", "gpt2"])
def test_on_the_kits(arch, request):
    loaded = request.getfixturevalue(arch)
    for text in PROMPTS[:3]:
        ids = encode(loaded, text)
        lookup_equals_greedy(loaded, ids + ids, 24)  # the prompt repeats: drafts happen


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"params": SamplingParams(temperature=0.7)}, "greedy"),
        ({"n": 2}, "n=1"),
        ({"stop": ("x",)}, "stop strings"),
        ({"params": SamplingParams(temperature=0, repetition_penalty=1.2)}, "penalties"),
    ],
)
def test_what_prompt_lookup_cannot_do_is_refused(smol, change, words):
    request = GenerationRequest([1, 2, 3], **{"params": GREEDY, **change})
    with pytest.raises(InputError, match=words):
        lookup_greedy(Engine.from_loaded(smol), request)


def test_the_cli_reports_forwards_and_acceptance(cli, smol_kit, smol):
    result = cli(
        "generate", str(smol_kit), "--prompt", COPY, "--temperature", "0",
        "--max-new-tokens", "24", "--prompt-lookup", "8",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    line = result.json_lines()[0]
    plain = cli(
        "generate", str(smol_kit), "--prompt", COPY, "--temperature", "0",
        "--max-new-tokens", "24",
    )  # fmt: skip
    assert line["token_ids"] == plain.json_lines()[0]["token_ids"]
    assert line["prompt_lookup"]["forwards"] < len(line["token_ids"])


def test_a_ragged_batch_of_requests_is_each_decoded_alone(smol, qwen):
    """A copy task, a prompt with nothing to copy and a 5-token budget in one batch: every
    row equals plain greedy and takes the forwards it takes alone."""
    copy = smol.tokenizer.apply_chat_template(
        [{"role": "user", "content": COPY}], add_generation_prompt=True, tokenize=False
    )
    engine = Engine.from_loaded(smol)
    requests = [
        GenerationRequest(encode(smol, copy), params=GREEDY, max_new_tokens=32),
        GenerationRequest(
            encode(smol, "The three primary colours are"), params=GREEDY, max_new_tokens=16
        ),
        GenerationRequest(encode(smol, "Once upon a time"), params=GREEDY, max_new_tokens=5),
    ]
    batched = lookup_decode(engine, requests)
    for request, (result,) in zip(requests, batched, strict=True):
        assert result.token_ids == engine.generate([request])[0][0].token_ids
        assert result.forwards == lookup_greedy(engine, request).forwards
    assert batched[0][0].forwards < len(batched[0][0].token_ids) / 2
    ids = encode(qwen, PROMPTS[0])
    tiny = Engine.from_loaded(qwen)
    kit = [GenerationRequest(ids + ids, params=GREEDY, max_new_tokens=n) for n in (3, 20)]
    for request, (result,) in zip(kit, lookup_decode(tiny, kit), strict=True):
        assert result.token_ids == tiny.generate([request])[0][0].token_ids


def test_the_server_takes_prompt_lookup_as_an_extension(smol_kit):
    from test_server import in_process

    body = {
        "model": "s",
        "prompt": ["Repeat: the cat sat on the mat. Repeat: the cat", "The primary colours are"],
        "max_tokens": 16,
        "temperature": 0,
    }
    with in_process(smol_kit, "s") as http:
        plain = http.post("/v1/completions", json=body)
        fast = http.post("/v1/completions", json={**body, "prompt_lookup": 5})
        assert plain.status_code == 200 and fast.status_code == 200, fast.text
        assert [c["text"] for c in fast.json()["choices"]] == [
            c["text"] for c in plain.json()["choices"]
        ]
        stats = fast.json()["choices"][0]["muestra"]["prompt_lookup"]
        assert stats["forwards"] >= 1 and 0 <= stats["acceptance_rate"] <= 1
        chat = {"model": "s", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
        greedy = http.post("/v1/chat/completions", json={**chat, "temperature": 0})
        looked = http.post(
            "/v1/chat/completions", json={**chat, "temperature": 0, "prompt_lookup": 3}
        )
        assert looked.status_code == 200, looked.text
        content = looked.json()["choices"][0]["message"]["content"]
        assert content == greedy.json()["choices"][0]["message"]["content"]
        for change, word in (
            ({"temperature": 0.7}, "temperature"),
            ({"n": 2}, "n"),
            ({"stop": ["x"]}, "stop"),
            ({"prompt_lookup": 0}, "prompt_lookup"),
        ):
            refused = http.post("/v1/completions", json={**body, "prompt_lookup": 5, **change})
            assert refused.status_code == 400 and word in refused.text, refused.text
