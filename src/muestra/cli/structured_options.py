"""`muestra generate`'s think-then-answer mode: its flags as phase settings, then decoded.

The --think-* and --answer-* flags (derived from the settings' declaration:
`cli/sampling_options.py`) become `ThinkSettings` and `AnswerSettings`; the phases come
from `answers.decoding.phases_from` and the samples from its `decode`, as a spec's do.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from muestra.cli.common import plural, print_json, stderr
from muestra.cli.sampling_options import parameter
from muestra.errors import InputError
from muestra.settings import PHASED, AnswerSettings, PhaseSettings, ThinkSettings

if TYPE_CHECKING:  # the heavy modules (torch) load only when a command needs them
    from muestra.answers.decoding import Phases
    from muestra.answers.grammar import GrammarSpec


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


def phase_settings(s: Mapping[str, Any]) -> PhaseSettings:
    """The phases the flags ask for. A think mode "auto" without --think-budget is "tags"
    (a grammar alone asks for an answer, not for reasoning); a sampling flag the mode does
    not apply (a beam-searched phase draws nothing) keeps its setting's default."""
    budget, mode = s["think_budget"], s["think_mode"]
    if mode == "auto" and budget is None:
        mode = "tags"
    close = s["close_text"]
    think = ThinkSettings(
        budget=budget if budget is not None else ThinkSettings.model_fields["budget"].default,
        mode=mode,
        close_text=close.replace("\\n", "\n") if close is not None else None,
        **_given(s, "think_"),
    )
    answer = AnswerSettings(max_tokens=s["answer_max_tokens"], **_given(s, "answer_"))
    return PhaseSettings(think, answer)


def _given(s: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    values = {name: s.get(parameter(name, prefix)) for name in PHASED}
    return {name: value for name, value in values.items() if value is not None}


def phases(settings: PhaseSettings, loaded: Any) -> Phases:
    """`phases_from`, with the closing text held to the resolved mode."""
    from muestra.answers.decoding import phases_from

    found = phases_from(settings, loaded)
    think = found.think
    assert think is not None and settings.think is not None
    given = settings.think.close_text
    if given is not None and think.mode == "tags" and "</think>" not in given:
        shown = given.replace("\n", "\\n")  # as it was typed
        raise InputError(f"--close-text {shown!r} must contain </think>")
    return found


def run(
    loaded: Any,
    ids: list[int],
    *,
    n: int,
    seed: int | None,
    phases: Phases,
    grammar: GrammarSpec | None,
    field_probs: bool,
    max_batch: int,
    think_beams: Any = None,
    answer_beams: Any = None,
) -> None:
    """Sample and print; `think_beams`/`answer_beams` (BeamParams) beam-search a phase."""
    from muestra.answers.decoding import SAMPLED, Beams, PhaseBatch, decode
    from muestra.answers.structured import StructuredGenerator

    started = time.perf_counter()
    generator = StructuredGenerator(loaded, max_batch=max_batch)
    beams = think_beams is not None or answer_beams is not None
    batch = PhaseBatch([ids], [n], phases, seed, grammar, field_probs)
    samples = decode(generator, batch, Beams(think_beams, answer_beams) if beams else SAMPLED)
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
