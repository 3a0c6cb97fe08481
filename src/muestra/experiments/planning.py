"""Memory planned before it is spent: how many rows of a run fit a memory budget.

A local model's run holds, at its peak, what the process already holds (Python, torch),
the model's vocabulary side, its weights and one KV cache per row in flight, each row as
long as its prompt, its think budget (with the closing text) and its answer's max tokens
together (`models/memory.py` reads the weights and the KV bytes per token from the
model's files):

    peak = held + reserve + weights + rows × KV/token × (prompt + think + answer tokens)

`held` is measured, not estimated: the process's resident memory with the model's
tokenizer, llama.cpp's own vocabulary (on llama.cpp) and xgrammar's token tables (when an
answer follows a grammar) loaded as the run will hold them (`vocabulary_held`), ~0.35 GB
for a 150k-token vocabulary. `RUN_RESERVE` (128 MiB) is what the run grows by after
planning that no file tells: each step's logits and masks, the samples until stored, the
compiled grammars, llama.cpp's own bookkeeping (~70 MiB measured on a Qwen3-4B Q4_K_M
run of 9 rows at once, whose peak it would otherwise have passed by 0.2 %).

Two things hold more rows than the batch, and the plan counts them: a beam search decodes
a prompt's `num_beams` beams together whatever the batch (`engine/beam.py`), so the widest
one sets a floor of rows at once (`beam_rows`; a budget without room for it is refused by
name); and on torch `field_probs` keeps copies of finished rows' keys and values until it
expands their untaken branches, at most `kept_rows` (8, never more than the rows at once)
and copied once more into the expansion's batch (llama.cpp only tags their cells).

`plan_memory` admits the most rows (at most the batch asked for) whose peak stays within
the budget. The rows beyond wait for the next batch: every sample is still drawn, and a
sample does not depend on which rows share its batch (its own seed and generator). A
run that cannot fit one row is refused before the model loads, naming the numbers and
what to lower.

The budget: `--max-memory` (or `[run] max_memory` in the spec, or `max_memory=` in the
notebook API): "8GiB", "12GB", "500MiB", "1.5 GiB" or a plain byte count. Without one,
`DEFAULT_SHARE` (80 %) of the memory the system has available now (psutil, else
/proc/meminfo's MemAvailable) on top of what the process already holds.

On llama.cpp the cache is one context of fixed size, and the plan counts it as the
runtime makes it (`LlamaCache`): each row's cells with room for its jump-forward drafts,
a few slack cells, rounded up to llama.cpp's 256-cell steps, and never below the first
context (4,096 cells: on a Qwen3-4B shape, 576 MiB of f16 cache however few rows run).
The run then caps the cache at those cells (`LlamaCppRuntime.cap_cells`). The plan also
counts what llama.cpp allocates beside that cache (`models.memory.LlamaBuffers`): the
logits of its rows and its compute buffer, ~300 MiB on a Qwen3-4B shape, and without flash
attention (free batching) attention scores that grow with the cells, ~1 GiB at 16,384.

What the plan does not count one by one (small beside the KV cache of many rows, but
real; `RUN_RESERVE` stands for them, measured on one shape only): on torch the logits of
a step (rows × vocabulary × 4 bytes, which at many rows of a 262k vocabulary can pass the
reserve), and transient copies while torch loads weights; the answers' compiled grammars
(~1 MB for a JSON schema on a 150k-token vocabulary; xgrammar's cache is capped at 256
MiB); the samples kept until stored.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from typing import Any

from muestra.errors import InputError, MemoryBudgetError
from muestra.models.memory import LlamaBuffers, ModelMemory, cells_within, parse_memory

DEFAULT_SHARE = 0.8  # of the memory available when no budget is given
RUN_RESERVE = 128 * 2**20  # what a run grows by after planning (module docstring)
CONTEXT_STEP = 256  # llama.cpp pads a context to a multiple of 256 cells


@dataclass(frozen=True)
class Budget:
    bytes: int
    source: str  # where it came from, as shown to the user


def given_budget(value: Any, where: str) -> Budget:
    """The budget the user gave (`where`: the flag or spec key that gave it)."""
    return Budget(parse_memory(value, where), f"{where} {value}")


def default_budget(held: int) -> Budget:
    """`DEFAULT_SHARE` of the memory available now, on top of the `held` bytes."""
    available = available_memory()
    share = int(available * DEFAULT_SHARE)
    return Budget(
        held + share,
        f"default: {DEFAULT_SHARE:.0%} of the {format_bytes(available)} available, on top "
        f"of the {format_bytes(held)} this process holds; set --max-memory",
    )


def available_memory() -> int:
    """Bytes the system can give without swapping (psutil, else /proc/meminfo)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise InputError(
        "cannot tell how much memory this system has available (no psutil, no "
        "/proc/meminfo): give the run a budget with --max-memory (e.g. 8GiB)"
    )


def resident_bytes() -> int:
    """This process's resident memory now (what the plan's peak starts from)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


@dataclass(frozen=True)
class LlamaCache:
    """How llama.cpp's runtime sizes its one context for `rows` rows: each row's tokens
    and `row_extra` draft cells, `slack` cells, whole `step`s, at least `floor` cells;
    and the shape of its buffers beside the cache (micro-batches of `ubatch` tokens, up to
    `outputs` rows of logits, flash attention or not: `runtime.context_shape`)."""

    floor: int
    row_extra: int
    slack: int
    ubatch: int
    outputs: int
    flash: bool
    step: int = CONTEXT_STEP

    @property
    def shape(self) -> tuple[int, int, bool]:
        """(micro-batch, rows of logits, flash attention): what sizes the buffers."""
        return self.ubatch, self.outputs, self.flash

    def cells(self, rows: int, tokens_per_row: int) -> int:
        need = rows * (tokens_per_row + self.row_extra) + self.slack
        return max(self.floor, need + (-need) % self.step)


@dataclass(frozen=True)
class MemoryPlan:
    """How many rows of one model run at once, and why."""

    model: str
    weights_bytes: int
    kv_bytes_per_token: int
    prompt_tokens: int  # the longest prompt
    think_tokens: int  # the largest think budget, with its closing text
    answer_tokens: int  # the largest answer max_tokens
    rows_asked: int  # the batch asked for (--batch)
    rows: int  # rows at once: at most rows_asked, as many as fit
    held_bytes: int  # what the process holds with the model's vocabulary side loaded
    budget_bytes: int
    budget_source: str
    source: str  # where the model's numbers were read
    llama_cache: LlamaCache | None = None  # llama.cpp: its one context's shape
    buffers: LlamaBuffers | None = None  # llama.cpp: what its context holds beside the cache
    reserve_bytes: int = RUN_RESERVE  # what the run grows by after planning
    beam_rows: int = 0  # the widest beam search's beams, which decode together
    kept_rows: int = 0  # torch, field_probs: finished rows whose copies wait, at most

    @property
    def rows_at_once(self) -> int:
        """The most rows in flight: the batch's, or a beam search's beams when wider (a
        prompt's beams decode together whatever the batch, `engine/beam.py`)."""
        return max(self.rows, self.beam_rows)

    @property
    def tokens_per_row(self) -> int:
        return self.prompt_tokens + self.think_tokens + self.answer_tokens

    @property
    def kv_bytes_per_row(self) -> int:
        return self.kv_bytes_per_token * self.tokens_per_row

    def kv_bytes(self, rows: int) -> int:
        """The KV cache of `rows` rows at once (llama.cpp: its context's cells)."""
        if self.llama_cache is None:
            return rows * self.kv_bytes_per_row
        return self.kv_bytes_per_token * self.llama_cache.cells(rows, self.tokens_per_row)

    def buffer_bytes(self, rows: int) -> int:
        """llama.cpp's output and compute buffers for the context of `rows` rows (0 on
        torch)."""
        cache = self.llama_cache
        if cache is None or self.buffers is None:
            return 0
        return self.buffers.bytes(cache.cells(rows, self.tokens_per_row), *cache.shape)

    def kept_bytes(self, rows: int) -> int:
        """On torch, the keys and values `field_probs` copies from finished rows until it
        expands their untaken branches, with `rows` at once: at most `kept_rows` (no more
        than the rows) copied, and copied once more into the expansion's batch
        (`answers/answer_probs.PENDING_ROWS`, flushed at each wave's end at the latest);
        llama.cpp only tags their cells."""
        return 2 * min(rows, self.kept_rows) * self.kv_bytes_per_row

    def context_bytes(self, rows: int) -> int:
        """What `rows` rows at once take beside the weights: their KV cache, on llama.cpp
        its context's other buffers, on torch the rows `field_probs` keeps."""
        return self.kv_bytes(rows) + self.buffer_bytes(rows) + self.kept_bytes(rows)

    @property
    def kv_cells(self) -> int | None:
        """llama.cpp: the cells of the context the plan counts (the run caps it there)."""
        if self.llama_cache is None:
            return None
        return self.llama_cache.cells(self.rows_at_once, self.tokens_per_row)

    @property
    def peak_bytes(self) -> int:
        return (
            self.held_bytes
            + self.reserve_bytes
            + self.weights_bytes
            + self.context_bytes(self.rows_at_once)
        )

    def describe(self) -> str:
        """Two lines for the user: the numbers, and the budget with where it came from."""
        capped = f" (of {self.rows_asked} asked)" if self.rows < self.rows_asked else ""
        if self.beam_rows > self.rows:
            capped += f", {self.beam_rows} in a beam search (its beams decode together)"
        if self.kept_rows:
            kept = min(self.rows_at_once, self.kept_rows)
            capped += f", + {2 * kept} rows' copies kept for field_probs"
        cells, at_once = self.kv_cells, self.rows_at_once
        context = "" if cells is None else (
            f"; llama.cpp's cache {cells:,} cells ({format_bytes(self.kv_bytes(at_once))}) "
            f"and buffers {format_bytes(self.buffer_bytes(at_once))}"
        )  # fmt: skip
        return (
            f"memory plan for {self.model}: weights {format_bytes(self.weights_bytes)}, KV "
            f"{format_bytes(self.kv_bytes_per_row)}/row ({format_bytes(self.kv_bytes_per_token)}"
            f"/token × {self.tokens_per_row:,} tokens), {self.rows} rows at once{capped}"
            f"{context}, expected peak {format_bytes(self.peak_bytes)}\n  budget "
            f"{format_bytes(self.budget_bytes)} ({self.budget_source}); read from {self.source}"
        )

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data |= {"tokens_per_row": self.tokens_per_row, "kv_bytes_per_row": self.kv_bytes_per_row,
                 "kv_cells": self.kv_cells, "rows_at_once": self.rows_at_once,
                 "buffer_bytes": self.buffer_bytes(self.rows_at_once),
                 "peak_bytes": self.peak_bytes}  # fmt: skip
        return data


def plan_memory(
    model: str,
    memory: ModelMemory,
    tokens: tuple[int, int, int],
    rows_asked: int,
    budget: Budget,
    held: int,
    llama_cache: LlamaCache | None = None,
    beam_rows: int = 0,
    kept_rows: int = 0,
) -> MemoryPlan:
    """The plan for `model` (`tokens`: prompt, think, answer tokens of its longest row;
    `llama_cache`: how llama.cpp sizes its context, None on torch; `beam_rows`: the widest
    beam search's beams, which decode together; `kept_rows`: on torch, the finished rows
    whose copies `field_probs` keeps at most); a `MemoryBudgetError` with the numbers when
    not even one row, or not one beam search, fits `budget`."""
    prompt, think, answer = tokens
    plan = MemoryPlan(model, memory.weights_bytes, memory.kv_bytes_per_token, prompt, think,
                      answer, rows_asked, 0, held, budget.bytes, budget.source, memory.source,
                      llama_cache, memory.buffers, beam_rows=beam_rows,
                      kept_rows=0 if llama_cache is not None else kept_rows)  # fmt: skip
    room = budget.bytes - held - plan.reserve_bytes - memory.weights_bytes
    plan = replace(plan, rows=_most_rows(plan, room, rows_asked))
    if plan.rows < 1:
        raise MemoryBudgetError(_refusal(plan))
    if beam_rows > plan.rows and (fit := _most_rows(plan, room, beam_rows)) < beam_rows:
        raise MemoryBudgetError(_beam_refusal(plan, room, fit))
    return plan


def _most_rows(plan: MemoryPlan, room: int, limit: int) -> int:
    """The most rows, at most `limit`, whose cache (and buffers) fit `room` bytes."""
    low, high = 0, limit
    while low < high:
        middle = (low + high + 1) // 2
        fits = plan.context_bytes(middle) <= room
        low, high = (middle, high) if fits else (low, middle - 1)
    return low


def _beam_refusal(plan: MemoryPlan, room: int, fit: int) -> str:
    return (
        f"{plan.model}: a beam search of num_beams = {plan.beam_rows} decodes its "
        f"{plan.beam_rows} beams together, and {plan.beam_rows} rows at once need "
        f"{format_bytes(plan.context_bytes(plan.beam_rows))} of KV cache"
        f"{'' if plan.llama_cache is None else ' and buffers'} "
        f"({format_bytes(plan.kv_bytes_per_token)}/token × {plan.tokens_per_row:,} tokens a "
        f"row), over the {format_bytes(max(room, 0))} the memory budget of "
        f"{format_bytes(plan.budget_bytes)} ({plan.budget_source}) leaves beside the weights "
        f"and what the process holds (room for {fit} rows). Lower num_beams (and the "
        "samples with it), the think budget or the answer's max_tokens, or raise --max-memory"
    )


def _refusal(plan: MemoryPlan) -> str:
    one = plan.kv_bytes(1)
    need = plan.held_bytes + plan.reserve_bytes + plan.weights_bytes + plan.context_bytes(1)
    context = ""
    if plan.llama_cache is not None:
        cells = plan.llama_cache.cells(1, plan.tokens_per_row)
        which = "first context" if cells == plan.llama_cache.floor else "context"
        context = (
            f", in llama.cpp's {which} of {cells:,} cells ({format_bytes(one)}), and its "
            f"buffers {format_bytes(plan.buffer_bytes(1))}"
        )
    kept = ""
    if plan.kept_rows:
        kept = f", and field_probs' two copies of it kept {format_bytes(plan.kept_bytes(1))}"
    return (
        f"{plan.model} does not fit one row in the memory budget: this process holds "
        f"{format_bytes(plan.held_bytes)} with the model's tokenizer loaded (and keeps "
        f"{format_bytes(plan.reserve_bytes)} for the run's own growth), the weights take "
        f"{format_bytes(plan.weights_bytes)} "
        f"and one row's KV cache {format_bytes(plan.kv_bytes_per_row)} "
        f"({format_bytes(plan.kv_bytes_per_token)}/token × ({plan.prompt_tokens:,} prompt + "
        f"{plan.think_tokens:,} think + {plan.answer_tokens:,} answer tokens){context}"
        f"{kept}) = "
        f"{format_bytes(need)}, over the budget of {format_bytes(plan.budget_bytes)} "
        f"({plan.budget_source}). Raise --max-memory, or lower the think budget, the "
        "answer's max_tokens or the prompt's length (or use a smaller or more quantized model)"
    )


def format_bytes(size: int) -> str:
    """`size` in binary units, three significant digits ("1.21 GiB", "144 KiB")."""
    if size < 1024:
        return f"{size} B"
    exponent = min(int(math.log(size, 1024)), 4)
    value = size / 1024**exponent
    unit = ("B", "KiB", "MiB", "GiB", "TiB")[exponent]
    return f"{value:.3g} {unit}" if value < 1000 else f"{value:.0f} {unit}"


def plan_models(
    spec: Any, units: list[Any], rows_asked: int, given: Budget | None
) -> dict[str, MemoryPlan]:
    """The plan of every local model with samples to run in `units` (runner `Unit`s of a
    `LoadedSpec`), made from its files and tokenizer before any weights load; refused
    (`MemoryBudgetError`) when one of them cannot fit a row."""
    from muestra.models.loading import auto_runtime, check_model, choose_runtime, load_tokenizer
    from muestra.models.memory import MemoryUnknown, model_memory

    budget = given or default_budget(resident_bytes())
    plans: dict[str, MemoryPlan] = {}
    for model in {u.model.name: u.model for u in units if u.model.endpoint is None}.values():
        mine = [u for u in units if u.model.name == model.name]
        files = check_model(model.id, trust_remote_code=model.trust_remote_code)
        runtime = choose_runtime(model.id, files, auto_runtime(model.runtime, model.dtype,
                                                               model.device))  # fmt: skip
        try:
            memory = model_memory(files, runtime, model.dtype, model.kv_cache)
        except MemoryUnknown:
            if given is None:  # the default budget: the model runs unplanned, as before
                continue
            raise  # a budget given must be kept: refuse
        tokenizer = load_tokenizer(model.id, trust_remote_code=model.trust_remote_code)
        tokens = row_tokens(spec, model, mine, tokenizer)
        grammar = any(u.condition.answer.kinds for u in mine)
        held = vocabulary_held(tokenizer, files.gguf if runtime == "llamacpp" else None, grammar)
        del tokenizer
        plans[model.name] = plan_memory(
            model.name, memory, tokens, rows_asked, budget, held,
            llama_cache(model.batch_invariant) if runtime == "llamacpp" else None,
            beam_rows(mine), kept_rows(mine),
        )  # fmt: skip
    return plans


def kept_rows(units: list[Any]) -> int:
    """On torch, the finished rows whose keys and values `field_probs` keeps at most
    (`answers/answer_probs.PENDING_ROWS`; fewer when fewer rows run at once), 0 when no
    answer of `units` has field_probs under a grammar."""
    from muestra.answers.answer_probs import PENDING_ROWS

    scored = any(u.condition.answer.field_probs and u.condition.answer.kinds for u in units)
    return PENDING_ROWS["torch"] if scored else 0


def beam_rows(units: list[Any]) -> int:
    """The beams of the widest beam search in `units` (0 without one): a prompt's beams
    decode together whatever the batch (`engine/beam.py`), so they set the rows at once."""
    return max(
        (phase.num_beams for u in units for phase in (u.condition.think, u.condition.answer)
         if phase is not None and phase.strategy == "beam"),
        default=0,
    )  # fmt: skip


def vocabulary_held(tokenizer: Any, gguf: Any, grammar: bool) -> int:
    """What this process holds with a model's vocabulary side loaded as its run holds
    it: the tokenizer (`tokenizer`, loaded), llama.cpp's own vocabulary (`gguf`: a GGUF
    run on llama.cpp) and, when an answer follows a grammar (`grammar`), xgrammar's tables
    of every token. Measured while they are alive (a 150k-token vocabulary: ~0.35 GB in
    all, ~8 % of a Qwen3-4B Q4_K_M run's peak), then freed: the run builds them again
    into that room."""
    with ExitStack() as alive:
        vocab_size = len(tokenizer)
        if gguf is not None:
            from muestra.models.runtime.llamacpp_runtime import vocabulary_only

            vocab_size = max(vocab_size, alive.enter_context(vocabulary_only(gguf)))
        tables = None
        if grammar:
            from muestra.answers.grammar import GrammarBackend

            stop = tokenizer.eos_token_id  # the tables' size does not depend on it
            tables = GrammarBackend(tokenizer, vocab_size, [0 if stop is None else stop])
        held = resident_bytes()
        del tables
    return held


def llama_cache(exact: bool = True) -> LlamaCache:
    """How muestra's llama.cpp runtime sizes its context (its first context, the drafts'
    room per row, the slack beside the booked cells) and its buffers (exact batching or
    free)."""
    from muestra.engine.batch import MAX_DRAFT
    from muestra.models.runtime.llamacpp_runtime import FIRST_CELLS, SLACK, context_shape

    return LlamaCache(FIRST_CELLS, MAX_DRAFT, SLACK, *context_shape(exact))


def row_tokens(spec: Any, model: Any, units: list[Any], tokenizer: Any) -> tuple[int, int, int]:
    """(prompt, think, answer) tokens of the longest row of `units`: the longest prompt
    counted with the model's tokenizer (with the text-mode reasoning instruction when the
    row thinks: an upper bound), the largest think budget with its closing text, the
    largest answer max_tokens."""
    from muestra.answers.phases import QWEN_CLOSE_TEXT, TEXT_INSTRUCTION, with_instruction
    from muestra.experiments.prompts import messages_for, think_budget
    from muestra.models.inspection import prompt_ids, render_chat

    prompt = think = answer = 0
    for unit in units:
        messages = messages_for(spec, unit.item)
        budget = think_budget(unit.condition, unit.item)
        if budget is not None:
            settings = unit.condition.think
            messages = with_instruction(messages, settings.instruction or TEXT_INSTRUCTION)
            close = settings.close_text or QWEN_CLOSE_TEXT
            think = max(
                think, budget + len(tokenizer(close, add_special_tokens=False)["input_ids"])
            )
        if isinstance(messages, str):
            ids = prompt_ids(tokenizer, messages, raw=True)
        else:
            ids = render_chat(
                tokenizer, messages, enable_thinking=spec.spec.prompt.enable_thinking
            )[1]
        prompt = max(prompt, len(ids))
        answer = max(answer, unit.condition.answer.max_tokens)
    return prompt, think, answer


def split_budget(
    options: Mapping[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A command's local-model options as ([model] spec fields, the runner's budget): the
    budget (`max_memory`) is the run's, not the model's, so it stays out of a spec built
    from the options (whose text is the run's identity: a new budget resumes the run)."""
    fields = dict(options or {})
    if fields.get("max_memory") is None:
        fields.pop("max_memory", None)
        return fields, None
    return fields, {"max_memory": fields.pop("max_memory")}


@dataclass(frozen=True)
class KvCachePlan:
    """The llama.cpp KV cache a `--max-memory` budget allows: `cells` of
    `bytes_per_cell` each, beside weights of `weights_bytes` and the context's other
    buffers (`buffer_bytes` at that many cells)."""

    budget_source: str  # the flag and its value, as the user gave it
    budget_bytes: int
    weights_bytes: int
    bytes_per_cell: int
    cells: int
    buffer_bytes: int = 0

    def describe(self) -> str:
        cache = format_bytes(self.cells * self.bytes_per_cell)
        return (
            f"{self.budget_source} ({format_bytes(self.budget_bytes)}): KV cache budget of "
            f"{self.cells:,} cells at {self.bytes_per_cell:,} bytes a cell ({cache}), beside "
            f"the weights ({format_bytes(self.weights_bytes)}) and llama.cpp's buffers "
            f"({format_bytes(self.buffer_bytes)})"
        )


def kv_cells_budget(budget: Budget, memory: ModelMemory, cache: LlamaCache) -> KvCachePlan:
    """The most KV cells `budget` holds once the weights are in, with the context's other
    buffers at that size (whole llama.cpp contexts of `cache.step` cells); a
    `MemoryBudgetError` naming the flag when they are fewer than the runtime's first
    context (`cache.floor`)."""
    per_cell = memory.kv_bytes_per_token

    def buffers(cells: int) -> int:
        return 0 if memory.buffers is None else memory.buffers.bytes(cells, *cache.shape)

    room = budget.bytes - memory.weights_bytes
    cells = cells_within(room, per_cell, memory.buffers, cache.shape, cache.step)
    if cells < cache.floor:
        least = cache.floor
        need = memory.weights_bytes + least * per_cell + buffers(least)
        raise MemoryBudgetError(
            f"{budget.source}: {format_bytes(budget.bytes)} does not hold the model's weights "
            f"({format_bytes(memory.weights_bytes)}), a first KV cache of {least:,} cells "
            f"({format_bytes(least * per_cell)} at {per_cell:,} bytes a cell) and llama.cpp's "
            f"buffers ({format_bytes(buffers(least))}), {format_bytes(need)} together; raise "
            f"--max-memory to at least {-(-need // 2**20)}MiB, or serve a smaller or more "
            "quantized model"
        )
    return KvCachePlan(budget.source, budget.bytes, memory.weights_bytes, per_cell, cells,
                       buffers(cells))  # fmt: skip
