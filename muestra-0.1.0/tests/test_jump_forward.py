"""Grammar jump-forward: the text a grammar forces is fed in one forward as draft tokens,
and each is kept only if the row samples it; answers do not change, forwards drop."""

from __future__ import annotations

import copy
import json
import threading
from importlib.resources import files
from typing import Any

import pytest
import torch

from muestra.answers.grammar import GrammarSpec
from muestra.answers.phases import AnswerConfig, ThinkConfig
from muestra.answers.structured import StructuredGenerator
from muestra.engine import Engine, GenerationRequest, SamplingParams
from muestra.engine.engine import drafts_off_note
from muestra.models.loading import load_model

PERSONAJE = json.loads(files("muestra.data").joinpath("personaje.schema.json").read_text())
CHARACTER = json.loads(files("muestra.data").joinpath("character.schema.json").read_text())
FICHA = {  # nested object, array, enum, pattern, anyOf, boolean, number
    "type": "object",
    "properties": {
        "origen": {
            "type": "object",
            "properties": {
                "región": {"enum": ["norte", "sur", "montaña"]},
                "código": {"type": "string", "pattern": "^[A-Z]{2}[0-9]$"},
            },
            "required": ["región", "código"],
        },
        "rasgos": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2},
        "valor": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]},
        "peso": {"type": "number"},
        "activo": {"type": "boolean"},
    },
    "required": ["origen", "rasgos", "valor", "peso", "activo"],
}
SPECS = {
    "personaje": GrammarSpec.json_schema(PERSONAJE),
    "ficha": GrammarSpec.json_schema(FICHA),
    "choice": GrammarSpec.choice(["guerrero", "soporte", "tanque", "tanque pesado"]),
}


def counting(model: torch.nn.Module) -> tuple[list[int], Any]:
    """Counts the model's forward calls (and how many tokens each fed per row): the
    list, and the hook's handle (remove it: other tests share the model)."""
    calls: list[int] = []

    def count(_: Any, args: Any, kwargs: Any) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        calls.append(ids.shape[1])

    return calls, model.register_forward_pre_hook(count, with_kwargs=True)


def chat(generator: StructuredGenerator, text: str) -> list[int]:
    return generator.text.encode_messages([{"role": "user", "content": text}])


def both_ways(generator, monkeypatch, calls, **kwargs):
    """The same run one token a step and with jump-forward: (off, on, forwards off/on)."""
    runs, forwards = [], []
    for jump in (False, True):
        monkeypatch.setattr(generator, "jump_forward", jump)
        calls.clear()
        runs.append(generator.run(**kwargs))
        forwards.append(len(calls))
    return runs[0], runs[1], forwards


def assert_same(off, on, probs_tolerance=1e-5):
    assert len(off) == len(on)
    for a, b in zip(off, on, strict=True):
        assert a.token_ids == b.token_ids
        assert (a.answer, a.error, a.finish_reason) == (b.answer, b.error, b.finish_reason)
        assert (a.field_probs is None) == (b.field_probs is None)
        for name, values in (a.field_probs or {}).items():
            assert values == pytest.approx(b.field_probs[name], abs=probs_tolerance), name


@pytest.fixture(scope="module")
def tiny(tiny_kit):
    generator = StructuredGenerator(load_model(str(tiny_kit)))
    calls, handle = counting(generator.loaded.model)
    yield generator, calls
    handle.remove()


@pytest.mark.parametrize("kind", list(SPECS))
@pytest.mark.parametrize(
    "temperature",
    [pytest.param(0.0, marks=pytest.mark.long), 0.5],  # greedy: in CI
)
def test_answers_equal_token_by_token_on_the_tiny_kit(tiny, monkeypatch, kind, temperature):
    """Random weights rarely pick the grammar's own tokenization, so drafts are often
    refused part-way: every sample (greedy and sampled, same seeds), its answer and
    its field_probs stay those of one-token-a-step decoding. The forced closing text of
    the reasoning goes several tokens a forward too. (At T 1 the random model's
    free strings are near-uniform over 151k tokens, and the last bits of a logit decide
    some inverse-CDF draws: then the batch's shape alone, jump-forward or not, changes
    a few samples; at T 0.5 no draw is that close.)"""
    generator, calls = tiny
    off, on, forwards = both_ways(
        generator,
        monkeypatch,
        calls,
        prompts=[chat(generator, "Genera un personaje"), chat(generator, "Otro")],
        n=8,
        seed=3,
        think=ThinkConfig(budget=3),
        answer=AnswerConfig(params=SamplingParams(temperature=temperature), max_tokens=80),
        grammar=SPECS[kind],
    )
    assert_same(off, on)
    assert any(s.error is None for s in on)
    # the 26 tokens of Qwen's closing text, forced at the budget, take three forwards
    assert forwards[1] <= forwards[0] - 20, forwards


def test_a_run_that_cannot_jump_forward_says_why(tiny):
    """DoLa (each token contrasts its own premature layers) and a cache with sliding-window
    layers keep drafts off: the run then feeds one token a forward and leaves a one-line
    note; a run that does jump forward leaves none."""
    generator, calls = tiny
    prompt = chat(generator, "Genera una ficha")
    runs = {
        "plain": SamplingParams(temperature=0),
        "dola": SamplingParams(temperature=0, dola_layers="high"),
    }
    fed = {}
    for name, params in runs.items():
        calls.clear()
        generator.run(
            [prompt], seed=1, answer=AnswerConfig(params, max_tokens=40), grammar=SPECS["ficha"]
        )
        fed[name] = (calls[1:], generator.notes)
    assert max(fed["plain"][0]) > 1 and fed["plain"][1] == []
    assert set(fed["dola"][0]) == {1}
    assert len(fed["dola"][1]) == 1 and "DoLa" in fed["dola"][1][0]

    config = copy.deepcopy(generator.loaded.model.config)
    assert drafts_off_note(config, [runs["plain"]]) is None
    config.layer_types = ["sliding_attention", "full_attention"]
    assert "sliding-window" in drafts_off_note(config, [runs["plain"]])


def test_a_refused_draft_leaves_holes_the_rows_never_see(tiny_kit):
    """An engine-level hook that drafts wrong tokens every step, with penalties and
    logprobs on: the rows' tokens and logprobs equal a run without drafts."""
    engine = Engine.from_loaded(load_model(str(tiny_kit)))

    class Drafting:
        def __init__(self, drafts: bool) -> None:
            self.drafts = drafts

        def before_step(self, rows):
            return None

        def mask_logits(self, logits, rows):
            return None

        def after_token(self, row, token_id, forced):
            return None

        def draft(self, row):  # the row's own last tokens, a few of them right by chance
            return row.tokens[-3:][::-1] if self.drafts and len(row.tokens) % 3 else []

    params = SamplingParams(temperature=0.9, top_k=50, repetition_penalty=1.3)
    # Not T 1 over the whole vocabulary: the random model's near-uniform draws are then
    # decided by a logit's last bits, which the forward's width (and torch's thread
    # count) can change.
    cool = SamplingParams(temperature=0.5)
    requests = [
        GenerationRequest([1, 5, 9, 11], n=3, params=params, max_new_tokens=40, logprobs=2),
        GenerationRequest([7, 3], n=2, params=cool, max_new_tokens=33, seed=5),
    ]
    widths, handle = counting(engine.model)
    plain = engine.generate(requests, Drafting(False))
    assert widths[0] == 4 and set(widths[1:]) == {1}  # the prefill, then a token a forward
    widths.clear()
    drafted = engine.generate(requests, Drafting(True))
    handle.remove()
    assert max(widths[1:]) >= 4  # drafts were fed
    for a_row, b_row in zip(plain, drafted, strict=True):
        for a, b in zip(a_row, b_row, strict=True):
            assert a.token_ids == b.token_ids
            assert a.finish_reason == b.finish_reason
            for x, y in zip(a.logprobs or [], b.logprobs or [], strict=True):
                assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
                assert x.raw_logprob == pytest.approx(y.raw_logprob, abs=1e-4)


def test_draft_width_feeds_drafts_only_where_they_fill_the_forward():
    from muestra.engine.engine import draft_width

    assert draft_width([]) == draft_width([0, 0]) == 1
    assert draft_width([1]) == 1  # two tokens at batch 1 cost about two forwards
    assert draft_width([5]) == 6
    assert draft_width([5] * 32) == 6
    assert draft_width([10] + [0] * 31) == 1  # one row drafting: the others would pad
    assert draft_width([2] * 32) == 1  # width 3 at batch 32 costs more than it saves
    assert draft_width([12] * 20 + [0] * 12) == 9  # real tokens fill two thirds


@pytest.fixture(scope="module")
def real(smol):
    generator = StructuredGenerator(smol)
    calls, handle = counting(smol.model)
    yield generator, calls
    handle.remove()


CHARACTER_PROMPTS = [
    "Create a role-playing game character for the following description: "
    f"<{text}> Answer with the character as JSON."
    for text in ("I am a calm person who likes to read.", "I like long walks.")
]


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_the_real_model_answers_unchanged_in_fewer_forwards(real, monkeypatch, temperature):
    """The character schema on SmolLM2: the same answers and field_probs, in at least
    1.5 times fewer forward passes over the answer (the goal of the performance issue)."""
    generator, calls = real
    prompts = [chat(generator, text) for text in CHARACTER_PROMPTS]
    off, on, forwards = both_ways(
        generator,
        monkeypatch,
        calls,
        prompts=prompts,
        n=4,
        seed=8,
        answer=AnswerConfig(params=SamplingParams(temperature=temperature), max_tokens=96),
        grammar=GrammarSpec.json_schema(CHARACTER),
    )
    assert_same(off, on)
    assert sum(s.error is None for s in on) >= 6
    assert forwards[0] >= 1.5 * forwards[1], forwards
    assert generator.field_probs_counts["in_loop"] == sum(s.field_probs is not None for s in on)


def test_the_scheduler_jumps_forward_with_other_requests_in_the_batch(real):
    """Continuous batching (the server's path): structured submissions with jump-forward
    join a running batch beside a free-text one, one hook each; every sample equals
    one-token-a-step decoding, and rows took several tokens in one step."""
    from muestra.answers.phases import PhaseController
    from muestra.engine.scheduler import Scheduler

    generator, calls = real
    engine = generator.text.engine
    backend = generator.backend
    compiled = backend.compile(GrammarSpec.json_schema(CHARACTER))
    eos = generator.loaded.eos_token_ids
    prompts = [chat(generator, text) for text in CHARACTER_PROMPTS]
    answers = [
        AnswerConfig(params=SamplingParams(temperature=t), max_tokens=96) for t in (0.0, 0.7)
    ]
    structured = [
        GenerationRequest(p, n=2, params=a.params, max_new_tokens=96, seed=5, prompt_index=i)
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
    ]
    free = GenerationRequest(
        prompts[0], n=2, params=SamplingParams(temperature=0.7), max_new_tokens=48, seed=6
    )

    def hook(answer, jump):
        encode = generator.text.encode_text if jump else None
        return PhaseController(None, answer, None, eos, (backend, compiled), jump_forward=encode)

    alone = [
        engine.generate([r], hook(a, False))[0] for r, a in zip(structured, answers, strict=True)
    ]
    alone.append(engine.generate([free])[0])
    tokens = []
    scheduler = Scheduler(engine)
    try:
        done = threading.Event()
        got: dict[int, list] = {}

        def collect(index):
            def deliver(update):
                got.setdefault(index, []).extend(update.finished)
                tokens.append(len(update.tokens))
                if sum(map(len, got.values())) == 6:
                    done.set()

            return deliver

        scheduler.submit([free], collect(2))
        for index, (request, answer) in enumerate(zip(structured, answers, strict=True)):
            scheduler.submit([request], collect(index), hook(answer, True))
        assert done.wait(300)
        stepped = scheduler.stats["rows_stepped"]
    finally:
        scheduler.close()
    for index, samples in enumerate(alone):
        mine = sorted(got[index], key=lambda s: s.sample_index)
        assert [s.token_ids for s in mine] == [s.token_ids for s in samples]
    assert sum(tokens) > 1.3 * stepped  # tokens delivered vs rows sampled once a step
