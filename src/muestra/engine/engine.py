"""The decoding engine: token ids in, token ids out. It knows nothing of tokenizers.

`Engine.stream(requests)` is a generator of `StepEvent`s, one per decoding step;
`Engine.generate(requests)` is built on it and returns finished `Sample`s. A request is
one prompt with `n` samples. All rows of all requests run as one batch (`batch.py`),
whose logits a runtime computes (`models/runtime`: torch or llama.cpp):

1. prefill each distinct prompt once, then copy its KV state out to its `n` rows;
2. each step: let the hook force tokens or mask logits, run the sampling pipeline
   (`sampling.py`) with each row's own generator, apply forced tokens, record logprobs;
3. a row stops on any EOS id, a stop string, or its token budget; finished rows leave
   the batch (their cache rows are dropped) and cost nothing more;
4. feed the new tokens of the remaining rows and repeat.

Hooks (`StepHook`) are how the phase controller (think → answer) steers rows without
the engine knowing why: `before_step` may push forced tokens into `row.forced_queue`,
`mask_logits` may set disallowed logits to -inf in place, `after_token` may finish a
row. Forced tokens are marked in the output. A hook may also propose `draft(row)` tokens
(jump-forward: forced tokens, the text a grammar forces); they are fed with the row's
token in the same forward and kept only while the row samples them,
each from its own logits with its own draw, so they change the number of forwards, not
the samples (`Batch.forward`). What a runtime cannot compute (DoLa's premature layers on
llama.cpp) is refused by `validate`, before any work.

Logprobs, when asked, come in two kinds for every generated token:
`raw_logprob`/`raw_top` are from the model's own distribution (softmax of its logits);
`logprob`/`top` are from the distribution that was actually sampled (after masks,
bias, penalties, temperature, top-k/top-p/min-p; -inf for removed tokens).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from muestra.engine.batch import MAX_DRAFT, Batch, draft_width
from muestra.engine.dola import candidate_layers
from muestra.engine.rows import (
    FinishReason,
    GenerationRequest,
    NoHook,
    Row,
    Sample,
    StepEvent,
    StepHook,
    TokenEvent,
    TokenLogprobs,
)
from muestra.engine.sampling import SamplingParams
from muestra.engine.seeds import generator_for, sample_seed
from muestra.engine.stops import StopMatcher
from muestra.errors import ContextLengthError, InputError
from muestra.models.runtime.base import Runtime
from muestra.models.runtime.kv_cache import supports_growing_cache
from muestra.models.runtime.torch_runtime import as_runtime

__all__ = [
    "MAX_DRAFT",
    "Batch",
    "Engine",
    "FinishReason",
    "GenerationRequest",
    "NoHook",
    "Row",
    "Sample",
    "StepEvent",
    "StepHook",
    "TokenEvent",
    "TokenLogprobs",
    "draft_width",
    "drafts_off_note",
]


class Engine:
    """Batched KV-cache decoding of token ids, on any runtime."""

    def __init__(
        self,
        model: Any,
        *,
        eos_token_ids: Sequence[int],
        max_length: int | None = None,
        token_bytes: Sequence[bytes] | None = None,
        max_batch: int = 64,
    ) -> None:
        self.runtime: Runtime = as_runtime(model)
        self.model = self.runtime.model  # the transformers model (torch runtime), else None
        self.eos_token_ids = frozenset(int(i) for i in eos_token_ids)
        self.max_length = max_length
        self.token_bytes = token_bytes
        self.max_batch = max_batch
        self.device = self.runtime.device
        self.vocab_size = self.runtime.vocab_size
        self._dola: dict[str | tuple[int, ...], tuple[int, ...]] = {}

    def dola_layers(self, params: SamplingParams) -> tuple[int, ...] | None:
        """The premature layers a row with these parameters contrasts with (None: no DoLa)."""
        if params.dola_layers is None:
            return None
        if not self.runtime.supports_dola:
            raise InputError(
                f"dola_layers={params.dola_layers!r}: DoLa contrasts the final layer with "
                f"premature layers' hidden states, which the {self.runtime.name} runtime does "
                'not expose; use --runtime torch (in a spec: runtime = "torch" under [model])'
            )
        if params.dola_layers not in self._dola:
            self._dola[params.dola_layers] = candidate_layers(
                self.runtime.config, params.dola_layers
            )
        return self._dola[params.dola_layers]

    def dola_union(self, params: Any) -> set[int]:
        """Every premature layer the rows with these parameters need."""
        layers: set[int] = set()
        for p in params:
            layers.update(self.dola_layers(p) or ())
        return layers

    @classmethod
    def from_loaded(cls, loaded: Any, max_batch: int = 64) -> Engine:
        """An engine for a `muestra.models.loading.LoadedModel` (stop strings enabled)."""
        from muestra.models.tokenization import token_bytes_table

        return cls(
            loaded.runtime,
            eos_token_ids=loaded.eos_token_ids,
            max_length=loaded.max_length,
            token_bytes=token_bytes_table(loaded.tokenizer, loaded.vocab_size),
            max_batch=max_batch,
        )

    # ---- public API ------------------------------------------------------------------

    def generate(
        self, requests: Sequence[GenerationRequest], hook: StepHook | None = None
    ) -> list[list[Sample]]:
        """Finished samples per request, in sample order."""
        results: list[list[Sample]] = [[] for _ in requests]
        for event in self.stream(requests, hook):
            for sample in event.finished:
                results[sample.request_index].append(sample)
        for samples in results:
            samples.sort(key=lambda s: s.sample_index)
        return results

    def stream(
        self, requests: Sequence[GenerationRequest], hook: StepHook | None = None
    ) -> Iterator[StepEvent]:
        """Per-step events for all rows of `requests`, in waves of at most `max_batch`."""
        hook = hook or NoHook()
        for index, request in enumerate(requests):
            self.validate(index, request)
        rows = [row for i, r in enumerate(requests) for row in self.rows_for(i, r)]
        wave_done = getattr(hook, "wave_done", None)
        for start in range(0, len(rows), self.max_batch):
            yield from self._run_wave(rows[start : start + self.max_batch], hook)
            if wave_done is not None:
                wave_done()

    # ---- setup ------------------------------------------------------------------------

    def validate(self, index: int, request: GenerationRequest) -> None:
        if not request.prompt_ids:
            raise InputError(f"request {index}: the prompt is empty; give at least one token")
        if request.n < 1:
            raise InputError(f"request {index}: n={request.n} must be at least 1")
        if request.max_new_tokens < 1:
            raise InputError(f"request {index}: max_new_tokens must be at least 1")
        if request.logprobs is not None and not 0 <= request.logprobs <= 20:
            raise InputError(f"request {index}: logprobs={request.logprobs} must be in [0, 20]")
        if max(request.prompt_ids) >= self.vocab_size or min(request.prompt_ids) < 0:
            raise InputError(f"request {index}: a prompt id is outside [0, {self.vocab_size})")
        if request.seeds is not None and len(request.seeds) != request.n:
            raise InputError(f"request {index}: {len(request.seeds)} seeds for n={request.n}")
        self.dola_layers(request.params)  # refused on a runtime without it, or bad layers
        if request.stop and self.token_bytes is None:
            raise InputError("stop strings need token_bytes (use Engine.from_loaded)")
        self._check_budget(index, request)
        total = len(request.prompt_ids) + request.max_new_tokens
        if self.max_length is not None and total > self.max_length:
            raise ContextLengthError(
                f"request {index}: prompt ({len(request.prompt_ids)} tokens) + max_new_tokens "
                f"({request.max_new_tokens}) = {total} exceeds the model's context of "
                f"{self.max_length} tokens; lower max_new_tokens or shorten the prompt"
            )

    def _check_budget(self, index: int, request: GenerationRequest) -> None:
        """A row whose budget cannot fit the runtime's cache even alone is refused here,
        not left waiting (llama.cpp's `max_cells`)."""
        limit = getattr(self.runtime, "max_cells", None)
        if limit is None:
            return
        need = len(request.prompt_ids) + request.max_new_tokens + MAX_DRAFT
        if not self.runtime.fits_alone(need):
            raise ContextLengthError(
                f"request {index}: prompt ({len(request.prompt_ids)} tokens) + max_new_tokens "
                f"({request.max_new_tokens}) needs {need} KV cells with drafts, more than "
                f"the runtime's cache budget of {limit} cells holds; lower max_new_tokens or "
                "shorten the prompt, or raise the budget (muestra serve --max-memory)"
            )

    def rows_for(self, index: int, request: GenerationRequest) -> list[Row]:
        """The rows of one request, `index` being its request index in the batch."""
        rows = []
        for k, sample_index in enumerate(
            range(request.first_sample, request.first_sample + request.n)
        ):
            if request.seeds is not None:
                seed = int(request.seeds[k])
            else:
                seed = sample_seed(request.seed, request.prompt_index, sample_index)
            rows.append(
                Row(
                    request_index=index,
                    sample_index=sample_index,
                    seed=seed,
                    prompt_ids=request.prompt_ids,
                    prompt_length=len(request.prompt_ids),
                    max_new_tokens=request.max_new_tokens,
                    eos_ids=frozenset() if request.ignore_eos else self.eos_token_ids,
                    params=request.params,
                    generator=generator_for(seed),
                    stop_matcher=StopMatcher(request.stop, self.token_bytes)
                    if request.stop
                    else None,
                    want_logprobs=request.logprobs,
                )
            )
        return rows

    # ---- the loop -----------------------------------------------------------------------

    def _run_wave(self, rows: list[Row], hook: StepHook) -> Iterator[StepEvent]:
        batch = self.start_batch(rows)
        try:
            while True:
                event = batch.step(hook)
                yield event
                if not batch.rows:
                    return
                batch.forward()
        finally:
            batch.close()

    def cells_for(self, rows: Sequence[Row]) -> int:
        """KV positions a batch of these rows may take: each distinct prompt once, each
        row's token budget and its drafts."""
        prompts = {r.request_index: r.prompt_length for r in rows}
        return sum(prompts.values()) + sum(r.max_new_tokens + MAX_DRAFT for r in rows)

    def start_batch(self, rows: list[Row]) -> Batch:
        """Prefill the rows' distinct prompts once and copy each out to its rows."""
        with torch.inference_mode():
            prompt_of_request: dict[int, int] = {}
            prompts: list[Sequence[int]] = []
            for row in rows:
                if row.request_index not in prompt_of_request:
                    prompt_of_request[row.request_index] = len(prompts)
                    prompts.append(row.prompt_ids)
            dola = self.dola_union(r.params for r in rows)
            booked = self._book(rows)
            try:
                seqs, fed = self.runtime.prefill(
                    prompts, max(r.max_new_tokens for r in rows), "last", frozenset(dola)
                )
            except BaseException:
                self.unbook(booked)
                raise
            logits, premature = fed.last, fed.premature
            expand = [prompt_of_request[r.request_index] for r in rows]
            if expand != list(range(len(rows))):
                seqs.select(expand)
                index = torch.tensor(expand, device=self.device)
                logits = logits[index]
                premature = {layer: value[index] for layer, value in premature.items()}
        batch = Batch(self, rows, seqs, logits, premature)
        batch.booked = booked
        return batch

    def _book(self, rows: Sequence[Row]) -> int:
        """Book the rows' whole budgets in a runtime with a fixed cache (llama.cpp) until
        they end (`Batch` gives them back); the cells booked."""
        reserve = getattr(self.runtime, "reserve", None)
        if reserve is None:
            return 0
        cells = self.cells_for(rows)
        reserve(cells, book=True)
        return cells

    def unbook(self, cells: int) -> None:
        if cells:
            self.runtime.unbook(cells)  # type: ignore[attr-defined]


def drafts_off_note(config: Any, params: Sequence[SamplingParams]) -> str | None:
    """A one-line note when `Batch.step` would feed no drafts (jump-forward) to rows
    sampled with these parameters on a model with this config (None: a runtime whose
    rows can always be cropped, llama.cpp); None when it feeds them."""
    if config is not None and not supports_growing_cache(config):
        why = "this model's cache (sliding-window or linear-attention layers) cannot hold drafts"
    elif any(p.dola_layers is not None for p in params):
        why = "DoLa contrasts each token's own premature-layer logits"
    else:
        return None
    return f"grammar jump-forward is off ({why}): one forward per token"
