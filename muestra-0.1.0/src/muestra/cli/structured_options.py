"""Think-then-answer options of `muestra generate`, turned into library objects."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from muestra.cli.common import plural, print_json, stderr
from muestra.errors import InputError

if TYPE_CHECKING:  # the heavy modules (torch) load only when a command needs them
    from muestra.answers.grammar import GrammarSpec
    from muestra.answers.phases import AnswerConfig, ThinkConfig


def grammar_spec(
    schema: Path | None, regex: str | None, choice: str | None, grammar: Path | None
) -> GrammarSpec | None:
    from muestra.answers.grammar import GrammarSpec

    options = [c.strip() for c in choice.split(",")] if choice is not None else None
    return GrammarSpec.from_options(
        schema=Path(schema) if schema is not None else None,
        regex=regex,
        choice=options,
        ebnf=Path(grammar) if grammar is not None else None,
    )


def think_config(
    loaded: Any,
    budget: int | None,
    close_text: str | None,
    mode: str,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    min_p: float | None,
    dola_layers: str | tuple[int, ...] | None = None,
) -> ThinkConfig:
    """The think phase asked for; "auto" is settled here: the model's think tags, else
    plain-text reasoning when --think-budget asks for reasoning, else none."""
    from muestra.answers.phases import ThinkConfig
    from muestra.answers.structured import resolve_think, think_from_generation_config

    if mode == "auto" and budget is None:
        mode = "tags"  # a grammar alone asks for an answer, not for reasoning
    think = think_from_generation_config(
        loaded,
        budget if budget is not None else ThinkConfig().budget,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        dola_layers=dola_layers,
    )
    think = resolve_think(loaded.tokenizer, ThinkConfig(think.params, think.budget, mode=mode))
    assert think is not None
    if close_text is not None:
        text = close_text.replace("\\n", "\n")
        if think.mode == "tags" and "</think>" not in text:
            raise InputError(f"--close-text {close_text!r} must contain </think>")
        think = replace(think, close_text=text)
    return think


def answer_config(
    temperature: float,
    top_p: float,
    top_k: int,
    min_p: float,
    max_tokens: int,
    dola_layers: str | tuple[int, ...] | None = None,
) -> AnswerConfig:
    from muestra.answers.phases import AnswerConfig
    from muestra.engine import SamplingParams

    params = SamplingParams(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, dola_layers=dola_layers
    )
    return AnswerConfig(params=params, max_tokens=max_tokens)


def run(
    loaded: Any,
    ids: list[int],
    *,
    n: int,
    seed: int | None,
    think: ThinkConfig,
    answer: AnswerConfig,
    grammar: GrammarSpec | None,
    field_probs: bool,
    max_batch: int,
    think_beams: Any = None,
    answer_beams: Any = None,
) -> None:
    """Sample and print; `think_beams`/`answer_beams` (BeamParams) beam-search a phase."""
    from muestra.answers.structured import StructuredGenerator

    started = time.perf_counter()
    generator = StructuredGenerator(loaded, max_batch=max_batch)
    if think_beams is None and answer_beams is None:
        samples = generator.run(
            [ids],
            n=n,
            seed=seed,
            think=think,
            answer=answer,
            grammar=grammar,
            field_probs=field_probs,
        )
    else:
        from muestra.answers.beam_phases import run_beam_phases
        from muestra.engine.seeds import fresh_run_seed

        samples = run_beam_phases(
            generator,
            [ids],
            counts=[n],
            seed=fresh_run_seed() if seed is None else seed,
            think=think,
            think_beams_params=think_beams,
            answer=answer,
            answer_beams=answer_beams,
            grammar=grammar,
            field_probs=field_probs,
        )
    for sample in samples:
        data = sample.as_dict()
        data.pop("prompt_index")
        print_json(data)
    for note in generator.notes:
        stderr.print(f"note: {note}", markup=False)
    elapsed = time.perf_counter() - started
    errors = sum(s.error is not None for s in samples)
    hits = sum(s.budget_hit for s in samples)
    stderr.print(
        f"{len(samples)} {plural(len(samples), 'sample')} in {elapsed:.2f}s; budget hit {hits}, "
        f"errors {errors}",
        markup=False,
    )
