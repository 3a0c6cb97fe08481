"""From a user's settings to decoded samples: `phases_from` and the one `decode` entry.

`phases_from(settings, model)` turns the typed phase settings (`muestra.settings`:
`ThinkSettings`, `AnswerSettings`, from a spec, a command's flags, a request or a
notebook call) into the think and answer phases the controller runs: a think setting
left unset comes from the model's generation config, the think mode "auto" is settled by
the model's tokenizer (its think tags, else plain-text reasoning), and the closing text
follows the mode. It is the only place that builds phases from settings.

`decode(generator, batch, strategy)` decodes a `PhaseBatch` (prompts, how many samples of
each, the run seed, the phases and the answer grammar) with one strategy:

- `Sampled()`: every row draws its tokens with its phase's sampling (temperature 0:
  greedy) — `StructuredGenerator.run`;
- `Beams(think, answer)`: a phase is beam-searched — `answers.beam_phases`;
- `Lookup(tokens)` / `Speculative(draft, tokens)`: a free-text answer decoded with draft
  tokens, copied from the prompt or proposed by a draft model — `answers.drafted`.

`strategy_from(settings)` reads the strategy the settings ask for. The runner (and so
every evaluation and probe, which run through it), `muestra generate` and `muestra serve`'s
beam-searched reasoning decode through here; the server's streamed samples go through the
same phase controller in its continuous-batching scheduler instead (server/service.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from muestra.answers.grammar import GrammarSpec
from muestra.answers.phases import AnswerConfig, ThinkConfig
from muestra.answers.structured import StructuredGenerator, StructuredSample, think_phase
from muestra.engine import SamplingParams
from muestra.engine.beam import BeamParams
from muestra.engine.seeds import fresh_run_seed
from muestra.settings import PhaseSettings, from_generation_config, sampling_of


@dataclass(frozen=True)
class Phases:
    """The think phase (None: the model answers directly) and the answer phase."""

    think: ThinkConfig | None
    answer: AnswerConfig


def phases_from(settings: PhaseSettings, model: Any) -> Phases:
    """The phases `settings` ask for on `model` (a `LoadedModel`: its generation config
    fills the think sampling left unset, its tokenizer settles the think mode)."""
    think = None
    if settings.think is not None:
        defaults = from_generation_config(model.generation_config.to_dict())
        think = think_phase(settings.think, model.tokenizer, defaults)
    answer = settings.answer
    return Phases(
        think,
        AnswerConfig(
            params=SamplingParams(**sampling_of(answer)),
            max_tokens=answer.max_tokens,
            stop=tuple(answer.stop),
        ),
    )


# ---- the strategies ---------------------------------------------------------------------


@dataclass(frozen=True)
class Sampled:
    """Every row draws its tokens with its phase's sampling (temperature 0: greedy)."""


@dataclass(frozen=True)
class Beams:
    """Beam search of the reasoning, of the answer, or of both (None: that phase samples)."""

    think: BeamParams | None = None
    answer: BeamParams | None = None


@dataclass(frozen=True)
class Lookup:
    """Prompt-lookup decoding of a free-text greedy answer: up to `tokens` drafts a forward."""

    tokens: int


@dataclass(frozen=True)
class Speculative:
    """Speculative decoding of a free-text answer with `draft` (a loaded draft runtime)."""

    draft: Any
    tokens: int = 4


Strategy = Sampled | Beams | Lookup | Speculative
SAMPLED = Sampled()


def beam_params(phase: Any) -> BeamParams | None:
    """A phase's beam search (None: it samples)."""
    if phase is None or phase.strategy != "beam":
        return None
    return BeamParams(
        num_beams=phase.num_beams,
        length_penalty=phase.length_penalty,
        early_stopping=phase.early_stopping,
    )


def strategy_from(
    settings: PhaseSettings, load_draft: Callable[[str], Any] | None = None
) -> Strategy:
    """The strategy `settings` ask for; `load_draft(ref)` loads a speculative draft."""
    answer = settings.answer
    if answer.prompt_lookup is not None:
        return Lookup(answer.prompt_lookup)
    if answer.draft_model:
        assert load_draft is not None, "a draft model needs a loader"
        return Speculative(load_draft(answer.draft_model), answer.num_speculative_tokens)
    think, answer_beams = beam_params(settings.think), beam_params(answer)
    if think is not None or answer_beams is not None:
        return Beams(think, answer_beams)
    return SAMPLED


# ---- decoding ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PhaseBatch:
    """The rows of one decode: samples `first_samples[i] … + counts[i] - 1` of each prompt
    (default from 0), numbered `prompt_indices[i]` (default `i`) for their seeds."""

    prompts: Sequence[Sequence[int]]
    counts: Sequence[int]
    phases: Phases
    seed: int | None = None  # the run seed (None: a fresh one)
    grammar: GrammarSpec | None = None
    field_probs: bool = True
    first_samples: Sequence[int] | None = None
    prompt_indices: Sequence[int] | None = None


def decode(
    generator: StructuredGenerator, batch: PhaseBatch, strategy: Strategy = SAMPLED
) -> list[StructuredSample]:
    """The samples of `batch` decoded with `strategy`; `generator.notes` holds the run's
    notes (a fast path it could not take, and why)."""
    generator.notes = []
    seed = fresh_run_seed() if batch.seed is None else batch.seed
    rows: dict[str, Any] = {
        "counts": batch.counts,
        "seed": seed,
        "first_samples": batch.first_samples,
        "prompt_indices": batch.prompt_indices,
        "think": batch.phases.think,
        "answer": batch.phases.answer,
    }
    if isinstance(strategy, Lookup):
        from muestra.answers.drafted import run_drafted_answers

        return run_drafted_answers(generator, batch.prompts, **rows, prompt_lookup=strategy.tokens)
    if isinstance(strategy, Speculative):
        from muestra.answers.drafted import run_drafted_answers

        return run_drafted_answers(
            generator,
            batch.prompts,
            **rows,
            draft=strategy.draft,
            num_speculative_tokens=strategy.tokens,
        )
    if isinstance(strategy, Beams):
        from muestra.answers.beam_phases import run_beam_phases

        return run_beam_phases(
            generator,
            batch.prompts,
            **rows,
            think_beams_params=strategy.think,
            answer_beams=strategy.answer,
            grammar=batch.grammar,
            field_probs=batch.field_probs,
        )
    return generator.run(
        batch.prompts, **rows, grammar=batch.grammar, field_probs=batch.field_probs
    )
