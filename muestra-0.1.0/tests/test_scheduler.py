"""Continuous batching: requests join a running batch between steps and get exactly the
samples they would get alone; cancelled requests leave at once."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from muestra.engine import Engine, GenerationRequest, SamplingParams
from muestra.engine.scheduler import Scheduler, Update
from muestra.models.runtime.kv_cache import GrowingCache, merge_left_padded

PROMPTS = ["Hola", "Había una vez, en un reino muy lejano,", "def f(x):", "Lista: rojo, azul"]


@pytest.fixture(scope="module")
def engine(qwen):
    return Engine.from_loaded(qwen, max_batch=64)


def requests_for(qwen, params, tokens=24):
    encode = qwen.tokenizer
    return [
        GenerationRequest(
            encode(text, add_special_tokens=False)["input_ids"],
            n=3,
            params=params,
            max_new_tokens=tokens + 5 * i,  # different lengths: rows leave at different steps
            seed=7,
            prompt_index=i,
            logprobs=2 if i == 0 else None,
        )
        for i, text in enumerate(PROMPTS)
    ]


class Collector:
    def __init__(self) -> None:
        self.samples = []
        self.steps = 0
        self.error = None
        self.done = threading.Event()
        self.expected = 0

    def __call__(self, update: Update) -> None:
        self.steps += bool(update.tokens)
        self.samples += update.finished
        self.error = self.error or update.error
        if self.error or len(self.samples) == self.expected:
            self.done.set()


@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(top_k=20)])
def test_staggered_requests_equal_a_single_batch(qwen, engine, params):
    """Each request is submitted on its own, while the earlier ones are mid-decode
    (they join the running batch). Tokens equal one `generate` call over all of them."""
    requests = requests_for(qwen, params)
    alone = engine.generate(requests)
    scheduler = Scheduler(engine)
    try:
        collectors = []
        for request in requests:
            collector = Collector()
            collector.expected = request.n
            scheduler.submit([request], collector)
            collectors.append(collector)
            while collector.steps < 3 and not collector.done.is_set():
                time.sleep(0.001)  # let it decode a few steps before the next one arrives
        for collector in collectors:
            assert collector.done.wait(60) and collector.error is None
        assert scheduler.stats["admissions"] == len(requests)
        assert scheduler.stats["max_rows"] > 3  # rows of different requests shared steps
        for request_samples, collector in zip(alone, collectors, strict=True):
            got = sorted(collector.samples, key=lambda s: s.sample_index)
            assert [s.token_ids for s in got] == [s.token_ids for s in request_samples]
            assert [s.seed for s in got] == [s.seed for s in request_samples]
        first = sorted(collectors[0].samples, key=lambda s: s.sample_index)[0]
        assert first.logprobs[3].raw_logprob == pytest.approx(
            alone[0][0].logprobs[3].raw_logprob, abs=1e-4
        )
    finally:
        scheduler.close()


def test_cancel_frees_rows_at_once(qwen, engine):
    long = GenerationRequest(
        qwen.tokenizer("Hola", add_special_tokens=False)["input_ids"],
        n=4,
        max_new_tokens=400,
        seed=1,
        ignore_eos=True,
    )
    scheduler = Scheduler(engine)
    try:
        collector = Collector()
        collector.expected = 4
        submission = scheduler.submit([long], collector)
        assert scheduler.open_rows == 4
        while collector.steps < 2:
            time.sleep(0.001)
        scheduler.cancel(submission)
        assert submission.done.wait(10)
        assert scheduler.open_rows == 0
        steps_at_cancel = scheduler.stats["steps"]
        time.sleep(0.2)
        assert scheduler.stats["steps"] == steps_at_cancel  # nothing left running
        assert not collector.samples  # cancelled rows are never reported as finished
        # the scheduler keeps serving
        after = Collector()
        after.expected = 1
        scheduler.submit([GenerationRequest(long.prompt_ids, max_new_tokens=5, seed=2)], after)
        assert after.done.wait(30) and len(after.samples) == 1
    finally:
        scheduler.close()


def test_more_rows_than_max_batch_wait_their_turn(qwen, engine):
    scheduler = Scheduler(engine, max_batch=4)
    try:
        request = requests_for(qwen, SamplingParams(top_p=0.9), tokens=8)[1]
        request = GenerationRequest(**{**request.__dict__, "n": 10})
        collector = Collector()
        collector.expected = 10
        scheduler.submit([request], collector)
        assert collector.done.wait(60) and collector.error is None
        assert scheduler.stats["max_rows"] == 4
        alone = engine.generate([request])[0]
        got = sorted(collector.samples, key=lambda s: s.sample_index)
        assert [s.token_ids for s in got] == [s.token_ids for s in alone]
    finally:
        scheduler.close()


def test_merge_left_pads_the_shorter_cache():
    first, second = GrowingCache(1, 8), GrowingCache(1, 8)
    first.layers[0].update(torch.ones(2, 1, 3, 4), torch.ones(2, 1, 3, 4))
    second.layers[0].update(torch.full((1, 1, 5, 4), 2.0), torch.full((1, 1, 5, 4), 2.0))
    merged = merge_left_padded(first, second, room=4)
    layer = merged.layers[0]
    assert layer.keys.shape == (3, 1, 5, 4) and layer.get_seq_length() == 5
    assert (layer.keys[:2, :, :2] == 0).all() and (layer.keys[:2, :, 2:] == 1).all()
    assert (layer.keys[2] == 2).all()
    assert layer.key_buffer.shape[-2] == 9  # room for 4 more without a copy
