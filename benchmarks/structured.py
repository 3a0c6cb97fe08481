"""Structured-answer benchmarks (issue 3/6), on the kit's `qwen3-0.6b` in bf16.

1. Answer-phase step time at batch 32 with grammar masks vs the same steps unconstrained.
2. Mask fill time per row-token (median, p99), measured around xgrammar's batch fill.
3. Schema compile: cold, cached in memory, cached on disk.
4. Seed 000's whole workload (its prompt, think budget 64 at T 1.3, the Personaje schema,
   greedy answer, 32 samples): muestra vs a faithful re-implementation of the notebook's
   loop (batch 1, one xgrammar matcher per sample, `</think>` forced by id). Random
   weights never stop a free string, so both cap the answer at 64 tokens; the notebook
   loop is sequential and is timed on `seed_loop_samples` samples, scaled to 32.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import median_time, seed_000_messages
from muestra.answers.grammar import GrammarBackend, GrammarSpec
from muestra.answers.phases import AnswerConfig, ThinkConfig
from muestra.answers.structured import StructuredGenerator
from muestra.engine import SamplingParams
from muestra.models.inspection import render_chat
from muestra.models.loading import LoadedModel

PERSONAJE = {
    "$defs": {
        "Clase": {"enum": ["guerrero", "soporte", "tanque"], "title": "Clase", "type": "string"},
        "Sexo": {"enum": ["masculino", "femenino"], "title": "Sexo", "type": "string"},
    },
    "properties": {
        "nombre": {"title": "Nombre", "type": "string"},
        "sexo": {"$ref": "#/$defs/Sexo"},
        "edad": {
            "exclusiveMaximum": 99,
            "exclusiveMinimum": 18,
            "title": "Edad",
            "type": "integer",
        },
        "clase": {"$ref": "#/$defs/Clase"},
        "nivel": {
            "exclusiveMaximum": 10,
            "exclusiveMinimum": 1,
            "title": "Nivel",
            "type": "integer",
        },
    },
    "required": ["nombre", "sexo", "edad", "clase", "nivel"],
    "title": "Personaje",
    "type": "object",
}
FREE_TEXT = {"type": "object", "properties": {"texto": {"type": "string"}}, "required": ["texto"]}


class TimedBackend(GrammarBackend):
    """Records how long each batch mask fill + apply takes, per row."""

    per_row: list[float]

    def fill_and_apply(self, logits: torch.Tensor, matchers: list[Any], indices: list[int]) -> None:
        start = time.perf_counter()
        super().fill_and_apply(logits, matchers, indices)
        self.per_row.append((time.perf_counter() - start) / len(indices))


def _answer_steps(
    generator: StructuredGenerator, prompt: list[int], grammar: GrammarSpec | None, steps: int
) -> list[float]:
    from muestra.answers.phases import PhaseController
    from muestra.engine import GenerationRequest

    compiled = (generator.backend, generator.backend.compile(grammar)) if grammar else None
    controller = PhaseController(
        None, AnswerConfig(max_tokens=steps), None, generator.loaded.eos_token_ids, compiled
    )
    request = GenerationRequest(
        prompt, n=32, params=SamplingParams(temperature=0), max_new_tokens=steps, seed=1
    )
    stamps = []
    for _ in generator.text.engine.stream([request], controller):
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def bench_masks(loaded: LoadedModel, repeats: int) -> dict[str, Any]:
    generator = StructuredGenerator(loaded)
    backend = TimedBackend(
        loaded.tokenizer,
        loaded.vocab_size,
        loaded.eos_token_ids,
        disk_cache=Path(tempfile.mkdtemp()),
    )
    backend.per_row = []
    generator._backend = backend
    prompt = generator.text.encode_messages(
        [{"role": "user", "content": "Escribe un texto."}], enable_thinking=False
    )
    masked, free = [], []
    for _ in range(repeats):
        masked += _answer_steps(generator, prompt, GrammarSpec.json_schema(FREE_TEXT), 24)
        free += _answer_steps(generator, prompt, None, 24)
    fills = sorted(backend.per_row)
    return {
        "workload": "answer phase, 32 rows, 24 steps, JSON schema with a free string",
        "masked_step_s": statistics.median(masked),
        "free_step_s": statistics.median(free),
        "ratio": statistics.median(masked) / statistics.median(free),
        "fill_per_row_token_us_median": 1e6 * statistics.median(fills),
        "fill_per_row_token_us_p99": 1e6 * fills[int(0.99 * (len(fills) - 1))],
    }


def bench_compile(loaded: LoadedModel) -> dict[str, Any]:
    """Cold compile of seed 000's schema, then a memory-cache hit (there is no disk cache:
    see muestra.answers.grammar)."""
    spec = GrammarSpec.json_schema(PERSONAJE)
    backend = GrammarBackend(loaded.tokenizer, loaded.vocab_size, loaded.eos_token_ids)
    start = time.perf_counter()
    backend.compile(spec)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    backend.compile(spec)
    memory = time.perf_counter() - start
    return {"cold_s": cold, "memory_cached_s": memory, "stats": backend.stats}


@torch.inference_mode()
def notebook_loop(
    loaded: LoadedModel,
    prompt: list[int],
    compiled: Any,
    info_vocab: int,
    think_budget: int,
    answer_cap: int,
) -> None:
    """Seed 000's `structured_generation_loop`, batch 1, with the answer capped."""
    import xgrammar as xgr

    model = loaded.model
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, info_vocab)
    past, step_input = None, torch.tensor([prompt])
    for _ in range(think_budget):
        out = model(input_ids=step_input, cache=past, use_cache=True)
        past = out.cache
        probs = torch.softmax(out.logits[0, -1, :].float() / 1.3, dim=-1)
        token = torch.multinomial(probs, num_samples=1)
        step_input = token.view(1, 1)
        if token.item() == 151668:
            break
    step_input = torch.tensor([[151668]])
    for _ in range(answer_cap):
        if matcher.is_terminated():
            break
        out = model(input_ids=step_input, cache=past, use_cache=True)
        past = out.cache
        logits = out.logits[0, -1, :].float()
        matcher.fill_next_token_bitmask(bitmask)
        xgr.apply_token_bitmask_inplace(logits, bitmask)
        token = torch.argmax(torch.softmax(logits, dim=-1), dim=-1)
        matcher.accept_token(token.item())
        step_input = token.view(1, 1)


def bench_seed_000(loaded: LoadedModel, repeats: int, seed_loop_samples: int) -> dict[str, Any]:
    generator = StructuredGenerator(loaded)
    _, prompt = render_chat(loaded.tokenizer, seed_000_messages())
    spec = GrammarSpec.json_schema(PERSONAJE)
    think = ThinkConfig(params=SamplingParams(temperature=1.3), budget=64, close_text="</think>")
    answer = AnswerConfig(max_tokens=64)

    def ours(field_probs: bool) -> None:
        generator.run(
            [prompt],
            n=32,
            seed=1,
            think=think,
            answer=answer,
            grammar=spec,
            field_probs=field_probs,
        )

    plain, _ = median_time(lambda: ours(False), repeats)
    with_probs, _ = median_time(lambda: ours(True), 1, warmup=0)
    compiled = generator.backend.compile(spec)

    def loop() -> None:
        for _ in range(seed_loop_samples):
            notebook_loop(loaded, prompt, compiled, loaded.vocab_size, 64, 64)

    loop_time, _ = median_time(loop, max(1, repeats // 2), warmup=0)
    loop_32 = loop_time * 32 / seed_loop_samples
    return {
        "workload": "seed 000: its prompt, think 64 at T 1.3, Personaje schema, greedy answer "
        "(capped at 64 tokens), 32 samples",
        "muestra_s": plain,
        "muestra_with_field_probs_s": with_probs,
        "notebook_loop_s_scaled_to_32": loop_32,
        "notebook_loop_samples_timed": seed_loop_samples,
        "speedup_vs_notebook": loop_32 / plain,
    }
