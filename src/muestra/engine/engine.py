"""The decoding engine: token ids in, token ids out. It knows nothing of tokenizers.

`Engine.stream(requests)` is a generator of `StepEvent`s, one per decoding step;
`Engine.generate(requests)` is built on it and returns finished `Sample`s. A request is
one prompt with `n` samples. All rows of all requests run as one batch:

1. prefill each distinct prompt once (left-padded batch, logits of the last position
   only) into a KV cache sized for prompt + budget (`kv_cache.py`), then copy it out to
   its `n` rows;
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
the samples (`Batch.forward`).

Logprobs, when asked, come in two kinds for every generated token:
`raw_logprob`/`raw_top` are from the model's own distribution (softmax of its logits);
`logprob`/`top` are from the distribution that was actually sampled (after masks,
bias, penalties, temperature, top-k/top-p/min-p; -inf for removed tokens).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, Protocol

import torch

from muestra.engine.dola import candidate_layers, dola_logits, premature_logits
from muestra.engine.kv_cache import (
    GrowingCache,
    gather_columns,
    merge_left_padded,
    supports_growing_cache,
    trim_left,
)
from muestra.engine.sampling import SamplingBatch, SamplingParams
from muestra.engine.seeds import generator_for, sample_seed
from muestra.engine.stops import StopHit, StopMatcher
from muestra.errors import ContextLengthError, InputError

FinishReason = Literal["stop", "length"]
MAX_DRAFT = 16  # jump-forward: draft tokens fed after a row's token in one forward


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt and how to sample it `n` times."""

    prompt_ids: Sequence[int]
    n: int = 1
    params: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 256
    seed: int = 0
    prompt_index: int = 0
    first_sample: int = 0  # sample indices are first_sample … first_sample + n - 1
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k: chosen token plus k alternatives
    seeds: Sequence[int] | None = None  # explicit generator seed of each sample (else derived)


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    raw_logprob: float
    top: list[tuple[int, float]]
    raw_top: list[tuple[int, float]]


@dataclass
class Row:
    """The state of one sample while it decodes."""

    request_index: int
    sample_index: int
    seed: int
    prompt_ids: Sequence[int]
    prompt_length: int
    max_new_tokens: int
    eos_ids: frozenset[int]
    params: SamplingParams  # a hook may replace it between steps (e.g. think → answer)
    generator: torch.Generator
    stop_matcher: StopMatcher | None
    want_logprobs: int | None
    tokens: list[int] = field(default_factory=list)
    forced: list[bool] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    forced_queue: deque[int] = field(default_factory=deque)
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    stop_byte_offset: int | None = None
    state: Any = None  # free slot for a hook's per-row state

    def finish(self, reason: FinishReason, stop_reason: int | str | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason, self.stop_reason = reason, stop_reason


@dataclass
class TokenEvent:
    request_index: int
    sample_index: int
    token_id: int
    forced: bool
    logprobs: TokenLogprobs | None
    finish_reason: FinishReason | None


@dataclass
class StepEvent:
    step: int
    tokens: list[TokenEvent]
    finished: list[Sample]


@dataclass
class Sample:
    """A finished sample: everything needed to report it and redo it."""

    request_index: int
    sample_index: int
    seed: int
    prompt_length: int
    token_ids: list[int]
    forced: list[bool]
    finish_reason: FinishReason
    stop_reason: int | str | None
    stop_byte_offset: int | None
    logprobs: list[TokenLogprobs] | None
    state: Any = None  # the hook's per-row state, handed back

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class StepHook(Protocol):
    """What a hook may do at each step (see the module docstring). A hook may also define
    `row_finishing(row, context)`: called for each row that finished, while its KV cache
    is still live; `context(generated)` gives the keys and values of the row's prompt and
    first `generated` tokens (`Batch.row_context`), or None where the cache cannot be cut."""

    def before_step(self, rows: Sequence[Row]) -> None: ...
    def mask_logits(self, logits: torch.Tensor, rows: Sequence[Row]) -> None: ...
    def after_token(self, row: Row, token_id: int, forced: bool) -> None: ...


class NoHook:
    def before_step(self, rows: Sequence[Row]) -> None:
        return None

    def mask_logits(self, logits: torch.Tensor, rows: Sequence[Row]) -> None:
        return None

    def after_token(self, row: Row, token_id: int, forced: bool) -> None:
        return None


def _top(logprobs: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    if k <= 0:
        return [[] for _ in range(logprobs.shape[0])]
    values, ids = logprobs.topk(k, dim=-1)
    return [
        list(zip(row_ids, row_values, strict=True))
        for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True)
    ]


class Engine:
    """Batched KV-cache decoding for any Hugging Face causal LM."""

    def __init__(
        self,
        model: Any,
        *,
        eos_token_ids: Sequence[int],
        max_length: int | None = None,
        token_bytes: Sequence[bytes] | None = None,
        max_batch: int = 64,
    ) -> None:
        self.model = model
        self.eos_token_ids = frozenset(int(i) for i in eos_token_ids)
        self.max_length = max_length
        self.token_bytes = token_bytes
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self._dola: dict[str | tuple[int, ...], tuple[int, ...]] = {}

    def dola_layers(self, params: SamplingParams) -> tuple[int, ...] | None:
        """The premature layers a row with these parameters contrasts with (None: no DoLa)."""
        if params.dola_layers is None:
            return None
        if params.dola_layers not in self._dola:
            self._dola[params.dola_layers] = candidate_layers(self.model.config, params.dola_layers)
        return self._dola[params.dola_layers]

    @classmethod
    def from_loaded(cls, loaded: Any, max_batch: int = 64) -> Engine:
        """An engine for a `muestra.models.loading.LoadedModel` (stop strings enabled)."""
        from muestra.models.tokenization import token_bytes_table

        return cls(
            loaded.model,
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
        for start in range(0, len(rows), self.max_batch):
            yield from self._run_wave(rows[start : start + self.max_batch], hook)

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
        self.dola_layers(request.params)  # a list with no layer of this model is refused here
        if request.stop and self.token_bytes is None:
            raise InputError("stop strings need token_bytes (use Engine.from_loaded)")
        total = len(request.prompt_ids) + request.max_new_tokens
        if self.max_length is not None and total > self.max_length:
            raise ContextLengthError(
                f"request {index}: prompt ({len(request.prompt_ids)} tokens) + max_new_tokens "
                f"({request.max_new_tokens}) = {total} exceeds the model's context of "
                f"{self.max_length} tokens; lower max_new_tokens or shorten the prompt"
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

    @torch.inference_mode()
    def _prefill(
        self,
        prompts: list[Sequence[int]],
        max_new_tokens: int,
        dola: set[int] | None = None,
        model: Any = None,
    ) -> tuple[Any, torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """Left-padded prefill of distinct prompts: (cache, last logits (P, V), mask (P, L),
        the output head on the last position of each `dola` layer). `model`: another model
        than the engine's (a speculative draft)."""
        model = model if model is not None else self.model
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = torch.tensor(list(prompt))
            mask[i, width - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as HF generate
        cache = self._new_cache(width + max_new_tokens, model.config)
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
            output_hidden_states=bool(dola),
        )
        premature = premature_logits(model, out.hidden_states, dola) if dola else {}
        return out.cache, out.logits[:, -1, :].float(), mask, premature

    def _new_cache(self, capacity: int, config: Any = None) -> Any:
        from transformers import DynamicCache

        config = config if config is not None else self.model.config
        if supports_growing_cache(config):
            return GrowingCache(config.num_hidden_layers, capacity)
        return DynamicCache(config=config)

    # ---- the loop -----------------------------------------------------------------------

    def _run_wave(self, rows: list[Row], hook: StepHook) -> Iterator[StepEvent]:
        batch = self.start_batch(rows)
        while True:
            event = batch.step(hook)
            yield event
            if not batch.rows:
                return
            batch.forward()

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
            cache, logits, mask, premature = self._prefill(
                prompts, max(r.max_new_tokens for r in rows), dola
            )
            expand = [prompt_of_request[r.request_index] for r in rows]
            if expand != list(range(len(rows))):
                index = torch.tensor(expand, device=self.device)
                cache.batch_select_indices(index)
                logits, mask = logits[index], mask[index]
                premature = {layer: value[index] for layer, value in premature.items()}
            positions = torch.tensor([r.prompt_length for r in rows], device=self.device)
        return Batch(self, rows, cache, logits, mask, positions, premature)

    def dola_union(self, params: Any) -> set[int]:
        """Every premature layer the rows with these parameters need."""
        layers: set[int] = set()
        for p in params:
            layers.update(self.dola_layers(p) or ())
        return layers

    def _record(
        self,
        rows: list[Row],
        chosen: list[int],
        forced_flags: list[bool],
        logprobs: list[TokenLogprobs | None],
        hook: StepHook,
    ) -> tuple[list[TokenEvent], list[Sample], list[int]]:
        """Append each row's token, apply the stop rules: (events, finished, rows to keep)."""
        events, finished, keep = [], [], []
        for i, row in enumerate(rows):
            token = chosen[i]
            row.tokens.append(token)
            row.forced.append(forced_flags[i])
            if logprobs[i] is not None:
                row.logprobs.append(logprobs[i])
            self._check_stop(row, token)
            hook.after_token(row, token, forced_flags[i])
            if row.finish_reason is None and len(row.tokens) >= row.max_new_tokens:
                row.finish("length")
            events.append(
                TokenEvent(
                    row.request_index,
                    row.sample_index,
                    token,
                    forced_flags[i],
                    logprobs[i],
                    row.finish_reason,
                )
            )
            if row.finish_reason is None:
                keep.append(i)
            else:
                finished.append(self._sample(row))
        return events, finished, keep

    def _penalty_state(
        self, rows: list[Row], sampling: SamplingBatch
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(seen (R, V) bool: prompt + output tokens, counts (R, V): output tokens), or Nones."""
        if sampling.no_penalties:
            return None, None
        counts = torch.zeros(len(rows), self.vocab_size, dtype=torch.int32, device=self.device)
        seen = torch.zeros(len(rows), self.vocab_size, dtype=torch.bool, device=self.device)
        for i, row in enumerate(rows):
            seen[i, list(row.prompt_ids)] = True
            if row.tokens:
                output = torch.tensor(row.tokens, device=self.device)
                counts[i].scatter_add_(0, output, torch.ones_like(output, dtype=counts.dtype))
                seen[i, output] = True
        return seen, counts

    def _check_stop(self, row: Row, token: int) -> None:
        if token in row.eos_ids:
            row.finish("stop", token)
            return
        if row.stop_matcher is not None:
            hit: StopHit | None = row.stop_matcher.feed(token)
            if hit is not None:
                row.finish("stop", hit.stop)
                row.stop_byte_offset = hit.byte_offset

    def _logprobs(
        self, rows: list[Row], raw: torch.Tensor, processed: torch.Tensor, chosen: list[int]
    ) -> list[TokenLogprobs | None]:
        wanted = [r.want_logprobs for r in rows]
        if all(w is None for w in wanted):
            return [None] * len(rows)
        k = max(w for w in wanted if w is not None)
        raw_lp = raw.log_softmax(dim=-1)
        lp = processed.log_softmax(dim=-1)
        index = torch.tensor(chosen, device=raw.device).unsqueeze(1)
        chosen_raw = raw_lp.gather(1, index).squeeze(1).tolist()
        chosen_lp = lp.gather(1, index).squeeze(1).tolist()
        raw_top, top = _top(raw_lp, k), _top(lp, k)
        result: list[TokenLogprobs | None] = []
        for i, want in enumerate(wanted):
            if want is None:
                result.append(None)
                continue
            result.append(
                TokenLogprobs(
                    chosen[i], chosen_lp[i], chosen_raw[i], top[i][:want], raw_top[i][:want]
                )
            )
        return result

    @staticmethod
    def _sample(row: Row) -> Sample:
        assert row.finish_reason is not None
        return Sample(
            request_index=row.request_index,
            sample_index=row.sample_index,
            seed=row.seed,
            prompt_length=row.prompt_length,
            token_ids=row.tokens,
            forced=row.forced,
            finish_reason=row.finish_reason,
            stop_reason=row.stop_reason,
            stop_byte_offset=row.stop_byte_offset,
            logprobs=row.logprobs if row.want_logprobs is not None else None,
            state=row.state,
        )


class Batch:
    """The rows decoding together: their KV cache, attention mask, next positions, last
    logits and sampling tensors. One `step` samples a token for every row and drops the
    rows that finished; `forward` feeds the new tokens through the model. Between the
    two, rows may leave (`keep_rows`: a client went away) and, after `forward`, another
    batch may join (`extend`: continuous batching)."""

    def __init__(
        self,
        engine: Engine,
        rows: list[Row],
        cache: Any,
        logits: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        premature: dict[int, torch.Tensor] | None = None,
    ) -> None:
        self.engine = engine
        self.rows = rows
        self.cache = cache
        self.logits = logits
        self.premature = premature or {}  # DoLa: layer → (R, V) logits of the last step
        self.mask = mask
        self.positions = positions
        self.row_params = [r.params for r in rows]
        self.sampling = SamplingBatch.build(self.row_params, engine.vocab_size, engine.device)
        self._dola_rows()
        self.seen, self.counts = engine._penalty_state(rows, self.sampling)
        self.next_tokens: list[int] | None = None  # sampled, not yet fed to the model
        self.steps = 0
        # jump-forward: per row, the draft tokens to feed after its next token, then (after
        # `forward`) the logits after each of them and the cache column of the first
        self.drafts: list[list[int]] = [[] for _ in rows]
        self.ahead: list[torch.Tensor | None] = [None] * len(rows)
        self.draft_col = [0] * len(rows)

    @torch.inference_mode()
    def step(self, hook: StepHook) -> StepEvent:
        """Sample the next token of every row. A row that the last `forward` fed draft
        tokens may take several: while the token it samples is its next draft token, it
        samples again, from the logits after that token (jump-forward: `forward`)."""
        assert self.next_tokens is None, "forward() the last step's tokens first"
        rows = self.rows
        hook.before_step(rows)
        self._refresh_params()
        events: list[TokenEvent] = []
        finished: list[Sample] = []
        last = [0] * len(rows)
        taken = [0] * len(rows)  # draft tokens each row took
        active, logits = list(range(len(rows))), self.logits
        while True:
            chosen = self._sample_rows(active, logits, hook, events, finished)
            more = []
            for i, token in zip(active, chosen, strict=True):
                last[i] = token
                drafts, t = self.drafts[i], taken[i]
                if t < len(drafts) and token == drafts[t]:
                    taken[i] = t = t + 1  # the token sampled is the draft's: it is fed already
                    if rows[i].finish_reason is None:
                        more.append(i)
                        continue
                self._drop_draft(i, t)
            if not more:
                break
            # the rows going on are at a new step of their own (a phase may change)
            hook.before_step([rows[i] for i in more])
            self._refresh_params()
            if self.dola:  # DoLa needs each step's premature layers: the drafts wait
                for i in more:  # and the token just taken is fed again, with its layers
                    self._drop_draft(i, taken[i] - 1)
                break
            active = more
            logits = torch.stack([self.ahead[i][taken[i] - 1] for i in more])  # type: ignore[index]
        self.drafts = [[] for _ in rows]
        self.ahead = [None] * len(rows)
        finishing = getattr(hook, "row_finishing", None)
        if finishing is not None:
            for i, row in enumerate(rows):
                if row.finish_reason is not None:
                    finishing(row, partial(self.row_context, i))
        event = StepEvent(self.steps, events, finished)
        self.steps += 1
        self.next_tokens = last
        keep = [i for i, row in enumerate(rows) if row.finish_reason is None]
        drafting = getattr(hook, "draft", None)
        if drafting is not None and not self.dola and isinstance(self.cache, GrowingCache):
            for i in keep:
                room = min(rows[i].max_new_tokens - len(rows[i].tokens) - 1, MAX_DRAFT)
                if room > 0:
                    self.drafts[i] = list(drafting(rows[i]))[:room]
        self.keep_rows(keep)
        return event

    def _refresh_params(self) -> None:
        """Rebuild the sampling tensors when a hook switched a row's parameters."""
        engine, rows = self.engine, self.rows
        if all(r.params is p for r, p in zip(rows, self.row_params, strict=True)):
            return
        self.row_params = [r.params for r in rows]
        self.sampling = SamplingBatch.build(self.row_params, engine.vocab_size, engine.device)
        self._dola_rows()
        if self.seen is None and not self.sampling.no_penalties:
            self.seen, self.counts = engine._penalty_state(rows, self.sampling)

    def _drop_draft(self, index: int, taken: int) -> None:
        """Row `index` took `taken` tokens of its draft: the rest become holes."""
        drafts = self.drafts[index]
        if taken < len(drafts):
            start = self.draft_col[index]
            self.mask[index, start + taken : start + len(drafts)] = 0
            self.positions[index] -= len(drafts) - taken

    def _sample_rows(
        self,
        active: list[int],
        logits: torch.Tensor,
        hook: StepHook,
        events: list[TokenEvent],
        finished: list[Sample],
    ) -> list[int]:
        """Sample one token for each row in `active` (indices into `self.rows`) from
        `logits` (one row each) and record it; the tokens."""
        engine = self.engine
        rows = [self.rows[i] for i in active]
        whole = len(active) == len(self.rows)
        index = None if whole else torch.tensor(active, device=engine.device)
        sampling = self.sampling if index is None else self.sampling.select(index)
        seen, counts = self.seen, self.counts
        if index is not None and seen is not None and counts is not None:
            seen, counts = seen[index], counts[index]
        raw = logits  # the model's own logits, for raw logprobs
        if self.dola or any(r.want_logprobs is not None for r in rows):
            logits = logits.clone()  # hooks mask in place; keep `raw` intact
        hook.mask_logits(logits, rows)
        if self.dola:  # after the masks: a grammar's tokens stay plausible (dola.py)
            logits = dola_logits(raw, logits, self.premature, self._contrasted_rows())
        warped = sampling.warp(sampling.penalise(logits, seen, counts))
        generators = [None if self.row_params[i].greedy else self.rows[i].generator for i in active]
        chosen = sampling.choose(warped, generators).tolist()
        forced = [bool(r.forced_queue) for r in rows]
        for j, row in enumerate(rows):
            if forced[j]:
                chosen[j] = row.forced_queue.popleft()
        logprobs = engine._logprobs(rows, raw, warped.logits, chosen)
        new_events, new_finished, _ = engine._record(rows, chosen, forced, logprobs, hook)
        events += new_events
        finished += new_finished
        if self.counts is not None and self.seen is not None:
            where = torch.tensor(active, device=engine.device)
            tokens = torch.tensor(chosen, device=engine.device)
            self.counts[where, tokens] += 1
            self.seen[where, tokens] = True
        return chosen

    def row_context(
        self, index: int, generated: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Row `index`'s keys and values (per layer, (1, heads, P + generated, dim), no
        padding) for its prompt and first `generated` tokens: its context before its
        token `generated`. Valid while `step` hands finishing rows to the hook; read, do
        not write (views when the row's columns are contiguous, else copies without the
        holes). None when the cache is not a plain growing one."""
        if not isinstance(self.cache, GrowingCache):
            return None
        row = self.rows[index]
        columns = self.mask[index].nonzero().flatten()
        need = row.prompt_length + generated
        if len(columns) < need:
            return None
        columns = columns[:need]
        first, end = int(columns[0]), int(columns[-1]) + 1
        if end - first == need:
            return [
                (
                    layer.keys[index : index + 1, :, first:end],
                    layer.values[index : index + 1, :, first:end],
                )
                for layer in self.cache.layers
            ]
        return [
            (
                layer.keys[index : index + 1].index_select(2, columns),
                layer.values[index : index + 1].index_select(2, columns),
            )
            for layer in self.cache.layers
        ]

    def _contrasted_rows(self) -> list[tuple[int, ...] | None]:
        """Each row's DoLa layers for this step. A row whose parameters switched to DoLa
        after the last forward (a phase hook entering the answer) is fed a forced token
        now: it needs no contrast yet, and the next forward computes its layers."""
        missing = self.dola - set(self.premature)
        if not missing:
            return self.row_dola
        row_dola = [
            None if layers and missing.intersection(layers) and row.forced_queue else layers
            for row, layers in zip(self.rows, self.row_dola, strict=True)
        ]
        still = {layer for layers in row_dola if layers for layer in layers} - set(self.premature)
        if still:
            raise RuntimeError(
                f"DoLa layers {sorted(still)} were not computed: dola_layers can be turned on "
                "in the middle of a row only while it is fed forced tokens (a step hook must "
                "switch the parameters at least one forced token before the row samples)"
            )
        return row_dola

    def _dola_rows(self) -> None:
        """Each row's DoLa layers (None: off) and their union, when `row_params` change."""
        self.row_dola = [self.engine.dola_layers(p) for p in self.row_params]
        self.dola = {layer for layers in self.row_dola if layers for layer in layers}

    def keep_rows(self, keep: list[int]) -> None:
        """Keep only the rows at these indices (in order); the others leave the batch and
        their cache rows are freed. Leading cache columns no row attends to any more are
        dropped too."""
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        self.row_params = [self.row_params[i] for i in keep]
        self.drafts = [self.drafts[i] for i in keep]
        self.ahead = [self.ahead[i] for i in keep]
        self.draft_col = [self.draft_col[i] for i in keep]
        self._dola_rows()
        if self.next_tokens is not None:
            self.next_tokens = [self.next_tokens[i] for i in keep]
        if not keep:
            self.cache = None
            return
        index = torch.tensor(keep, device=self.engine.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        if self.next_tokens is None:  # otherwise `forward` replaces the logits anyway
            self.logits = self.logits[index]
            self.premature = {layer: value[index] for layer, value in self.premature.items()}
        self.sampling = self.sampling.select(index)
        if self.counts is not None and self.seen is not None:
            self.counts, self.seen = self.counts[index], self.seen[index]
        unused = int(self.mask.any(dim=0).long().argmax())  # first column still attended
        if unused and trim_left(self.cache, unused):
            self.mask = self.mask[:, unused:]

    @torch.inference_mode()
    def forward(self) -> None:
        """Feed the tokens sampled by the last `step` (rows still in the batch).

        Jump-forward: the tokens a hook's `draft(row)` proposes (the phase controller:
        the row's queued forced tokens, or the text its grammar forces) are fed right
        after the row's token, in the same forward
        (rows right-padded to the longest; the padding stays in the cache as masked
        holes; `draft_width` decides whether the wider forward pays). The next
        `step` samples each of them as usual and keeps them while they agree, so every
        token is still sampled from its own logits, with the same draws: the output is
        the one-token-a-step output (up to the last bits of multi-token products)."""
        assert self.next_tokens is not None and self.rows
        engine = self.engine
        # the rows' parameters now (a hook may have switched them in `after_token`)
        dola = engine.dola_union(r.params for r in self.rows)
        width = 1 if dola else draft_width([len(d) for d in self.drafts])
        for drafts in self.drafts:
            del drafts[width - 1 :]
        lengths = [1 + len(d) for d in self.drafts]
        if width > 1:
            self._compact()
        start = self.mask.shape[1]
        if width == 1:
            tokens = torch.tensor([[t] for t in self.next_tokens], device=engine.device)
            fed = self.mask.new_ones(len(self.rows), 1)
        else:
            ids = torch.zeros(len(self.rows), width, dtype=torch.long)
            real = torch.zeros(len(self.rows), width, dtype=torch.long)
            for i, (token, drafts) in enumerate(zip(self.next_tokens, self.drafts, strict=True)):
                ids[i, : lengths[i]] = torch.tensor([token, *drafts])
                real[i, : lengths[i]] = 1
            tokens, fed = ids.to(engine.device), real.to(self.mask.device)
        self.mask = torch.cat([self.mask, fed], dim=1)
        offsets = torch.arange(width, device=engine.device)
        out = engine.model(
            input_ids=tokens,
            attention_mask=self.mask,
            position_ids=self.positions.unsqueeze(1) + offsets,
            cache=self.cache,
            use_cache=True,
            output_hidden_states=bool(dola),
        )
        self.cache = out.cache
        if width == 1:
            self.logits = out.logits[:, -1, :].float()
        else:
            logits = out.logits.float()
            self.logits = logits[:, 0]
            self.ahead = [logits[i, 1 : lengths[i]] for i in range(len(self.rows))]
            self.draft_col = [start + 1] * len(self.rows)
        self.premature = premature_logits(engine.model, out.hidden_states, dola) if dola else {}
        self.positions = self.positions + torch.tensor(lengths, device=engine.device)
        self.next_tokens = None

    def _compact(self) -> None:
        """Gather each row's real columns again (left-padded) once the holes jump-forward
        leaves make up half the cache."""
        real = self.mask.sum(dim=1)
        width = int(real.max())
        if self.mask.shape[1] < 2 * width + 64 or not isinstance(self.cache, GrowingCache):
            return
        index = torch.zeros(len(self.rows), width, dtype=torch.long, device=self.mask.device)
        mask = torch.zeros_like(index)
        for i in range(len(self.rows)):
            columns = self.mask[i].nonzero().flatten()
            index[i, width - len(columns) :] = columns
            mask[i, width - len(columns) :] = 1
        gather_columns(self.cache, index.to(self.engine.device))
        self.mask = mask.to(self.mask.dtype)

    @property
    def can_extend(self) -> bool:
        return self.cache is None or isinstance(self.cache, GrowingCache)

    def extend(self, other: Batch) -> None:
        """Append the rows of a freshly prefilled batch. Both caches are left-padded to
        the longer one (padding is masked out; positions are per row)."""
        assert self.next_tokens is None and other.next_tokens is None and self.rows
        if not (isinstance(self.cache, GrowingCache) and isinstance(other.cache, GrowingCache)):
            raise NotImplementedError("only a GrowingCache batch can take rows mid-run")
        rows = self.rows + other.rows
        room = max(r.max_new_tokens - len(r.tokens) for r in rows) + 1
        self.cache = merge_left_padded(self.cache, other.cache, room)
        width = max(self.mask.shape[1], other.mask.shape[1])
        shift = width - self.mask.shape[1]  # this batch's columns move right by the padding
        self.draft_col = [c + shift for c in self.draft_col] + other.draft_col
        self.drafts = self.drafts + other.drafts
        self.ahead = self.ahead + other.ahead
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(other.mask, width)])
        vocab = self.logits.shape[1]

        def layer_of(batch: Batch, layer: int) -> torch.Tensor:
            # a row only reads its own layers: zeros stand for the layers it does not use
            return batch.premature.get(layer, batch.logits.new_zeros(len(batch.rows), vocab))

        self.premature = {
            layer: torch.cat([layer_of(self, layer), layer_of(other, layer)])
            for layer in set(self.premature) | set(other.premature)
        }
        self.logits = torch.cat([self.logits, other.logits])
        self.positions = torch.cat([self.positions, other.positions])
        self.rows = rows
        self.row_params = self.row_params + other.row_params
        self._dola_rows()
        engine = self.engine
        self.sampling = SamplingBatch.build(self.row_params, engine.vocab_size, engine.device)
        self.seen, self.counts = engine._penalty_state(rows, self.sampling)


def draft_width(drafts: Sequence[int]) -> int:
    """How many tokens each row is fed in the next forward, given each row's draft
    length: the widest `W` whose real tokens fill at least two thirds of the R x W
    padded ones, with `W` >= 3 (>= 4 once R x W reaches 32), else 1 (no drafts).
    Measured on this CPU (SmolLM2, fp32) against a one-token forward of the same rows,
    a forward of W tokens a row costs: at batch 1, ~1.8x for W 2 to 16 (small matrix
    products leave the matrix-vector kernel); at batch 32, where the products are
    compute-bound, 1.9x for W 2, 2.3x for 4, 3.7x for 8, 4.9x for 16. Padding that
    feeds nothing is not free, so a few rows drafting in a large batch wait instead."""
    rows = len(drafts)
    for width in range(max(drafts, default=0) + 1, 2, -1):
        real = rows + sum(min(d, width - 1) for d in drafts)
        if 3 * real >= 2 * rows * width and (width >= 4 or rows * width < 32):
            return width
    return 1


def drafts_off_note(config: Any, params: Sequence[SamplingParams]) -> str | None:
    """A one-line note when `Batch.step` would feed no drafts (jump-forward) to rows
    sampled with these parameters on a model with this config; None when it feeds them."""
    if not supports_growing_cache(config):
        why = "this model's cache (sliding-window or linear-attention layers) cannot hold drafts"
    elif any(p.dola_layers is not None for p in params):
        why = "DoLa contrasts each token's own premature-layer logits"
    else:
        return None
    return f"grammar jump-forward is off ({why}): one forward per token"


def _pad_left(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(mask, (width - mask.shape[1], 0))
