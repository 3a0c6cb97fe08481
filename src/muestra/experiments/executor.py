"""The runner's batch-executor seam: how a batch of work units becomes stored rows.

`Runner.run` plans each model's missing samples, groups them into batches (one condition,
think budget and item choice per batch), and hands them to its executor:

- `load(runner, model)` once per local model: what decodes (a generator, a model);
- `run_batch(runner, worker, batch)` per batch: the rows to store, one per sample, built
  with `runner.row(unit, sample, think_budget, seconds)`.

`Decoding`, the default, samples the think → answer phases: each batch's settings become
phases (`answers.decoding.phases_from`) and a strategy, and `answers.decoding.decode`
runs them. An evaluation that scores instead of sampling (evaluation/evaluate.py's
log-likelihoods) brings its own executor; the runner keeps the store, the plan, resuming
and the run's status either way. The runner is reached through `RunnerView` only, so
this module does not import it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from muestra.experiments.prompts import messages_for, think_budget
from muestra.experiments.spec import Condition, LoadedSpec, ModelSpec, PromptItem


@dataclass(frozen=True)
class Unit:
    """The missing samples of one (model, condition, prompt) cell."""

    model: ModelSpec
    condition: Condition
    item: PromptItem
    prompt_index: int
    model_id: int
    condition_id: int
    prompt_id: int
    missing: tuple[int, ...]
    seed_index: int  # the index this prompt's samples are seeded with (runner.seed_indices)


# the samples of a batch: each unit with the sample indices it runs
Batch = list[tuple[Unit, list[int]]]


class RunnerView(Protocol):
    """What an executor may use of the runner."""

    spec: LoadedSpec
    batch_rows: int

    def load(self, model: ModelSpec) -> Any: ...

    def row(
        self, unit: Unit, sample: Any, think_budget: int | None, seconds: float
    ) -> dict[str, Any]: ...

    def note_once(self, note: str) -> None: ...


class BatchExecutor(Protocol):
    """Turns a batch into stored rows. The runner makes a memory plan (planning.py) before
    loading only for an executor whose `plans_memory` is true: one that loads the run's
    model through `runner.load` and decodes its rows there."""

    def load(self, runner: RunnerView, model: ModelSpec) -> Any: ...

    def run_batch(self, runner: RunnerView, worker: Any, batch: Batch) -> list[dict[str, Any]]: ...


class Decoding:
    """The default executor: the spec's think and answer phases, decoded."""

    plans_memory = True  # it loads the run's model: the runner plans its memory first

    def __init__(self) -> None:
        self.drafts: dict[tuple[str, str], Any] = {}  # speculative drafts, per model and ref

    def load(self, runner: RunnerView, model: ModelSpec) -> Any:
        from muestra.answers.structured import StructuredGenerator

        return StructuredGenerator(runner.load(model), max_batch=runner.batch_rows)

    def run_batch(self, runner: RunnerView, worker: Any, batch: Batch) -> list[dict[str, Any]]:
        from muestra.answers.decoding import PhaseBatch, decode, phases_from, strategy_from
        from muestra.settings import PhaseSettings

        unit0 = batch[0][0]
        condition, item = unit0.condition, unit0.item
        think = condition.think
        if think is not None:  # the item's own budget, when it has one
            think = think.model_copy(update={"budget": think_budget(condition, item)})
        settings = PhaseSettings(think, condition.answer)
        phases = phases_from(settings, worker.loaded)
        prompts, firsts, counts, indices = [], [], [], []
        for unit, samples in batch:
            ids = encode(worker, runner.spec, unit.item, phases.think)
            check_fits(worker, runner.spec, unit, len(ids), condition.answer.max_tokens)
            for first, count in ranges(samples):
                prompts.append(ids)
                firsts.append(first)
                counts.append(count)
                indices.append(unit.seed_index)  # the engine seeds by it
        strategy = strategy_from(settings, lambda ref: self.draft(worker, unit0.model, ref))
        work = PhaseBatch(
            prompts,
            counts,
            phases,
            seed=runner.spec.spec.seed,
            grammar=answer_grammar(condition, runner.spec, item),
            field_probs=condition.answer.field_probs,
            first_samples=firsts,
            prompt_indices=indices,
        )
        started = time.perf_counter()
        results = decode(worker, work, strategy)
        for note in worker.notes:
            runner.note_once(f"model {unit0.model.name}, condition {condition.label}: {note}")
        seconds = time.perf_counter() - started
        unit_of = {u.seed_index: u for u, _ in batch}  # one unit per seed index (_batches)
        budget = phases.think.budget if phases.think else None
        return [runner.row(unit_of[s.prompt_index], s, budget, seconds) for s in results]

    def draft(self, worker: Any, model: ModelSpec, ref: str) -> Any:
        """The speculative draft `ref` of this model, loaded once per run."""
        from muestra.answers.drafted import load_draft

        key = (model.name, ref)
        if key not in self.drafts:
            self.drafts[key] = load_draft(worker.loaded, ref, model.dtype, model.device)
        return self.drafts[key]


def encode(generator: Any, spec: LoadedSpec, item: PromptItem, think: Any) -> list[int]:
    """The prompt ids of `item` (with the reasoning instruction in text mode)."""
    from muestra.answers.phases import with_instruction

    prompt = messages_for(spec, item)
    if think is not None and think.mode == "text":
        prompt = with_instruction(prompt, think.instruction)
    if isinstance(prompt, str):
        return generator.text.encode_prompt(prompt)
    return generator.text.encode_messages(prompt, spec.spec.prompt.enable_thinking)


def check_fits(
    generator: Any, spec: LoadedSpec, unit: Unit, prompt_tokens: int, answer: int
) -> None:
    """Refuse an item whose prompt and answer cannot fit the model's context, naming
    the spec (or question file) and the item, before its batch runs."""
    from muestra.errors import ContextLengthError

    limit = getattr(generator.loaded, "max_length", None)
    if limit is not None and prompt_tokens + answer > limit:
        raise ContextLengthError(
            f"{spec.path}: item {unit.item.id!r} is {prompt_tokens:,} prompt tokens "
            f"+ {answer} answer tokens, over the model's context of {limit:,} (model "
            f"{unit.model.name}); shorten it or leave it out"
        )


def answer_grammar(condition: Condition, spec: LoadedSpec, item: PromptItem) -> Any:
    """The answer grammar of `condition` for `item` (whose own choice, when it has one,
    replaces the answer's)."""
    from muestra.answers.grammar import GrammarSpec

    a = condition.answer
    return GrammarSpec.from_options(
        schema=spec.answer_schema,
        regex=a.regex,
        choice=item.choice if item.choice is not None else a.choice,
        ebnf=spec.path.parent / a.grammar if a.grammar is not None else None,
    )


def ranges(indices: list[int]) -> list[tuple[int, int]]:
    """Contiguous (first, count) runs of sorted sample indices."""
    runs = []
    start = prev = indices[0]
    for index in indices[1:]:
        if index != prev + 1:
            runs.append((start, prev - start + 1))
            start = index
        prev = index
    runs.append((start, prev - start + 1))
    return runs
