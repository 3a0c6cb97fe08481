"""The engine against HF generate (greedy oracle) and its own promises, on kit models."""

from __future__ import annotations

import pytest
import torch

from helpers import hf_generate
from muestra.answers.generation import TextGenerator
from muestra.engine import Engine, GenerationRequest, NoHook, SamplingParams
from muestra.errors import ContextLengthError

GREEDY = SamplingParams(temperature=0)
PROMPTS = [
    "Lista de colores: rojo, azul",
    "Hola",
    "Había una vez, en un reino muy lejano, un dragón que vivía en",
    "def fibonacci(n):",
]


@pytest.fixture(scope="module")
def generator(qwen):
    return TextGenerator(qwen)


def encode(loaded, text):
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


def hf_greedy(loaded, prompts, max_new_tokens, **kwargs):
    """HF generate on a left-padded batch; returns the new tokens of each row."""
    out, width = hf_generate(loaded, prompts, 151643, max_new_tokens=max_new_tokens, **kwargs)
    return [row[width:].tolist() for row in out]


def trim_hf(row, eos_ids):
    for i, token in enumerate(row):
        if token in eos_ids:
            return row[: i + 1]
    return row


@pytest.mark.parametrize("arch", ["qwen", "gpt2"])
def test_greedy_matches_hf_generate_padded_batch(arch, request):
    loaded = request.getfixturevalue(arch)
    engine = Engine.from_loaded(loaded)
    prompts = [encode(loaded, p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts), "prompts should differ in length"
    ours = engine.generate(
        [GenerationRequest(p, params=GREEDY, max_new_tokens=24) for p in prompts]
    )
    reference = hf_greedy(loaded, prompts, 24)
    for samples, hf in zip(ours, reference, strict=True):
        assert samples[0].token_ids == trim_hf(hf, engine.eos_token_ids)


@pytest.mark.parametrize("arch", ["qwen", "gpt2"])
def test_greedy_matches_hf_one_by_one(arch, request):
    loaded = request.getfixturevalue(arch)
    engine = Engine.from_loaded(loaded)
    for text in PROMPTS:
        prompt = encode(loaded, text)
        ours = engine.generate([GenerationRequest(prompt, params=GREEDY, max_new_tokens=16)])
        assert ours[0][0].token_ids == trim_hf(
            hf_greedy(loaded, [prompt], 16)[0], engine.eos_token_ids
        )


def test_repetition_penalty_matches_hf(qwen):
    engine = Engine.from_loaded(qwen)
    prompt = encode(qwen, PROMPTS[2])
    params = SamplingParams(temperature=0, repetition_penalty=1.5)
    ours = engine.generate([GenerationRequest(prompt, params=params, max_new_tokens=20)])
    hf = hf_greedy(qwen, [prompt], 20, repetition_penalty=1.5)[0]
    assert ours[0][0].token_ids == trim_hf(hf, engine.eos_token_ids)


def sampled(prompt, n=4, seed=7, first=0, **kw):
    params = SamplingParams(temperature=1.0, top_k=50)
    return GenerationRequest(
        prompt, n=n, params=params, max_new_tokens=12, seed=seed, first_sample=first, **kw
    )


def test_same_seed_same_tokens_and_samples_differ(qwen):
    engine = Engine.from_loaded(qwen)
    prompt = encode(qwen, "Hola")
    first = [s.token_ids for s in engine.generate([sampled(prompt)])[0]]
    again = [s.token_ids for s in engine.generate([sampled(prompt)])[0]]
    other = [s.token_ids for s in engine.generate([sampled(prompt, seed=8)])[0]]
    assert first == again
    assert len({tuple(t) for t in first}) == len(first), "samples of one prompt should differ"
    assert first != other


def test_sample_alone_equals_sample_in_batch_of_32(qwen):
    engine = Engine.from_loaded(qwen)
    prompt = encode(qwen, "Soy una persona amigable.")
    params = SamplingParams(temperature=1.0)
    batch = engine.generate(
        [GenerationRequest(prompt, n=32, params=params, max_new_tokens=16, seed=3, logprobs=0)]
    )[0]
    for index in (0, 5, 31):
        alone = engine.generate(
            [
                GenerationRequest(
                    prompt,
                    n=1,
                    params=params,
                    max_new_tokens=16,
                    seed=3,
                    first_sample=index,
                    logprobs=0,
                )
            ]
        )[0][0]
        assert alone.seed == batch[index].seed
        assert alone.token_ids == batch[index].token_ids
        # documented bound: batch size may change fp32 rounding of the logits, not the draw
        drift = max(
            abs(a.raw_logprob - b.raw_logprob)
            for a, b in zip(alone.logprobs, batch[index].logprobs, strict=True)
        )
        assert drift < 1e-4


def test_rows_finish_at_different_steps(qwen):
    engine = Engine.from_loaded(qwen)
    prompts = [encode(qwen, p) for p in PROMPTS[:3]]
    budgets = [3, 7, 12]
    together = engine.generate(
        [
            GenerationRequest(
                p, n=2, params=SamplingParams(), max_new_tokens=b, seed=1, prompt_index=i
            )
            for i, (p, b) in enumerate(zip(prompts, budgets, strict=True))
        ]
    )
    for i, (p, b) in enumerate(zip(prompts, budgets, strict=True)):
        alone = engine.generate(
            [
                GenerationRequest(
                    p, n=2, params=SamplingParams(), max_new_tokens=b, seed=1, prompt_index=i
                )
            ]
        )[0]
        assert [s.token_ids for s in together[i]] == [s.token_ids for s in alone]
        for s in together[i]:
            assert s.finish_reason == "stop" or s.num_tokens == b


def test_max_tokens_and_length_finish(qwen):
    engine = Engine.from_loaded(qwen)
    out = engine.generate(
        [GenerationRequest(encode(qwen, "Hola"), n=3, max_new_tokens=5, ignore_eos=True)]
    )[0]
    assert all(s.num_tokens == 5 and s.finish_reason == "length" for s in out)


def test_every_eos_id_stops_and_ignore_eos(qwen):
    engine = Engine.from_loaded(qwen)
    prompt = encode(qwen, "Hola")
    for eos in (151645, 151643):
        params = SamplingParams(temperature=0, logit_bias={eos: 1000.0})
        out = engine.generate([GenerationRequest(prompt, params=params, max_new_tokens=5)])[0][0]
        assert (out.token_ids, out.finish_reason, out.stop_reason) == ([eos], "stop", eos)
        kept = engine.generate(
            [GenerationRequest(prompt, params=params, max_new_tokens=5, ignore_eos=True)]
        )[0][0]
        assert kept.token_ids == [eos] * 5 and kept.finish_reason == "length"


def test_stop_string_across_token_boundary(qwen, generator):
    prompt = encode(qwen, PROMPTS[0])
    free = generator.generate([GenerationRequest(prompt, params=GREEDY, max_new_tokens=10)])[0]
    pieces = [generator.token_bytes[t].decode() for t in free.token_ids]
    left, right = pieces[2], pieces[3]
    assert len(left) >= 2 and len(right) >= 2, pieces
    stop = left[-2:] + right[:2]
    text = "".join(pieces)
    expected = text[: text.index(stop)]
    out = generator.generate(
        [GenerationRequest(prompt, params=GREEDY, max_new_tokens=10, stop=(stop,))]
    )[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == expected
    assert out.token_ids == free.token_ids[:4]


def test_context_overflow_is_a_clear_error(qwen):
    engine = Engine.from_loaded(qwen)
    with pytest.raises(ContextLengthError, match="4096"):
        engine.generate([GenerationRequest([1, 2, 3], max_new_tokens=4094)])


class ForceAndMask(NoHook):
    """Forces three tokens on row sample 0, then lets it pick only from {5, 6}."""

    def __init__(self):
        self.seen_forced = []

    def before_step(self, rows):
        for row in rows:
            if row.sample_index == 0 and not row.tokens:
                row.forced_queue.extend([11, 12, 13])

    def mask_logits(self, logits, rows):
        for i, row in enumerate(rows):
            if row.sample_index == 0 and len(row.tokens) >= 3:
                allowed = torch.full_like(logits[i], float("-inf"))
                allowed[[5, 6]] = 0
                logits[i] += allowed

    def after_token(self, row, token_id, forced):
        self.seen_forced.append((row.sample_index, token_id, forced))


def test_hooks_force_tokens_and_mask_logits(qwen):
    engine = Engine.from_loaded(qwen)
    hook = ForceAndMask()
    out = engine.generate(
        [GenerationRequest(encode(qwen, "Hola"), n=2, max_new_tokens=8, ignore_eos=True, seed=2)],
        hook,
    )[0]
    row0, row1 = out
    assert row0.token_ids[:3] == [11, 12, 13]
    assert row0.forced == [True] * 3 + [False] * 5
    assert set(row0.token_ids[3:]) <= {5, 6}
    assert not any(row1.forced)
    assert (0, 11, True) in hook.seen_forced


def test_logprobs_raw_and_processed(qwen):
    engine = Engine.from_loaded(qwen)
    prompt = encode(qwen, "Hola")
    params = SamplingParams(temperature=0.7, top_k=3)
    out = engine.generate(
        [GenerationRequest(prompt, params=params, max_new_tokens=4, seed=1, logprobs=5)]
    )[0][0]
    with torch.no_grad():
        logits = qwen.model(torch.tensor([prompt])).logits[0, -1].float()
    raw = logits.log_softmax(-1)
    first = out.logprobs[0]
    assert first.raw_logprob == pytest.approx(float(raw[out.token_ids[0]]), abs=1e-5)
    assert [i for i, _ in first.raw_top] == raw.topk(5).indices.tolist()
    processed = (logits / 0.7).topk(3)
    expected = processed.values.log_softmax(-1)
    assert [i for i, _ in first.top[:3]] == processed.indices.tolist()
    assert [v for _, v in first.top[:3]] == pytest.approx(expected.tolist(), abs=1e-5)
    assert all(v == float("-inf") for _, v in first.top[3:])
    assert sum(torch.tensor([v for _, v in first.top[:3]]).exp().tolist()) == pytest.approx(
        1, abs=1e-5
    )


def test_stream_events_build_the_same_samples(qwen):
    engine = Engine.from_loaded(qwen)
    request = sampled(encode(qwen, "Hola"), n=3)
    tokens = {0: [], 1: [], 2: []}
    finished = []
    for event in engine.stream([request]):
        for t in event.tokens:
            tokens[t.sample_index].append(t.token_id)
        finished += event.finished
    direct = engine.generate([request])[0]
    assert [tokens[i] for i in range(3)] == [s.token_ids for s in direct]
    assert sorted(s.sample_index for s in finished) == [0, 1, 2]


def test_stream_text_equals_final_text(generator, qwen):
    prompt = encode(qwen, PROMPTS[2])
    request = GenerationRequest(
        prompt, params=SamplingParams(temperature=1.0), max_new_tokens=20, seed=5
    )
    deltas, final = [], None
    for delta, done in generator.stream_text(request):
        deltas.append(delta)
        final = done or final
    assert final is not None and "".join(deltas) == final.text


def test_waves_beyond_max_batch(qwen):
    small = Engine.from_loaded(qwen, max_batch=3)
    big = Engine.from_loaded(qwen, max_batch=64)
    request = sampled(encode(qwen, "Hola"), n=7)
    assert [s.token_ids for s in small.generate([request])[0]] == [
        s.token_ids for s in big.generate([request])[0]
    ]
