"""Prompt-lookup decoding gives plain greedy decoding's tokens, in fewer forwards when the
answer copies its prompt."""

from __future__ import annotations

import pytest
import torch

from muestra.engine import Engine, GenerationRequest, SamplingParams
from muestra.engine.kv_cache import GrowingCache
from muestra.engine.lookup import find_draft, lookup_greedy
from muestra.errors import InputError
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
    lookup_equals_greedy(smol, ids, 48, num_tokens=3, max_ngram=3)


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
