"""The rows decoding together: one `Batch` owns them, their KV state and their tensors.

A batch holds its rows' `Sequences` (the runtime's KV state, `models/runtime`), the
logits each row samples from next, and the per-row sampling state in one `RowTensors`
container that is selected and extended in one place. One `step` samples a token for
every row (and takes jump-forward draft tokens while rows sample them); `forward`
feeds the new tokens through the runtime. Between the two, rows may leave
(`keep_rows`: they finished, or a client went away) and, after `forward`, another batch
may join (`extend`: continuous batching).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from muestra.engine.dola import dola_logits
from muestra.engine.rows import Row, Sample, StepEvent, StepHook, TokenEvent, TokenLogprobs
from muestra.engine.sampling import SamplingBatch, SamplingParams
from muestra.engine.stops import StopHit
from muestra.models.runtime.base import Sequences

MAX_DRAFT = 16  # jump-forward: draft tokens fed after a row's token in one forward


def draft_width(drafts: Sequence[int]) -> int:
    """How many tokens each row is fed in one padded forward (the torch runtime), given
    each row's draft length: the widest `W` whose real tokens fill at least two thirds of
    the R x W padded ones, with `W` >= 3 (>= 4 once R x W reaches 32), else 1 (no
    drafts). Measured on this CPU (SmolLM2, fp32) against a one-token forward of the same
    rows, a forward of W tokens a row costs: at batch 1, ~1.8x for W 2 to 16 (small
    matrix products leave the matrix-vector kernel); at batch 32, where the products are
    compute-bound, 1.9x for W 2, 2.3x for 4, 3.7x for 8, 4.9x for 16. Padding that feeds
    nothing is not free, so a few rows drafting in a large batch wait instead. (The
    llama.cpp runtime feeds ragged rows without padding: every draft goes.)"""
    rows = len(drafts)
    for width in range(max(drafts, default=0) + 1, 2, -1):
        real = rows + sum(min(d, width - 1) for d in drafts)
        if 3 * real >= 2 * rows * width and (width >= 4 or rows * width < 32):
            return width
    return 1


@dataclass
class RowTensors:
    """Per-row state beside the rows themselves, indexed like `Batch.rows`: their
    parameters and sampling tensors, the logits they sample from next (and DoLa's
    premature layers), the penalty counters, and jump-forward's drafts. `take` and
    `concat` are the only places rows are selected or joined."""

    params: list[SamplingParams]
    sampling: SamplingBatch
    logits: torch.Tensor  # (R, V) the next-token logits of each row
    premature: dict[int, torch.Tensor]  # DoLa: layer → (R, V)
    seen: torch.Tensor | None  # (R, V) bool: prompt + output tokens (penalties)
    counts: torch.Tensor | None  # (R, V) int32: output tokens (penalties)
    # jump-forward: the draft tokens to feed after each row's next token, then (after
    # `forward`) the logits after each of them
    drafts: list[list[int]] = field(default_factory=list)
    ahead: list[torch.Tensor | None] = field(default_factory=list)

    def take(self, index: list[int], logits_too: bool = True) -> RowTensors:
        where = torch.tensor(index, dtype=torch.long, device=self.logits.device)
        return RowTensors(
            params=[self.params[i] for i in index],
            sampling=self.sampling.select(where),
            logits=self.logits[where] if logits_too else self.logits,
            premature={k: v[where] for k, v in self.premature.items()} if logits_too else {},
            seen=self.seen[where] if self.seen is not None else None,
            counts=self.counts[where] if self.counts is not None else None,
            drafts=[self.drafts[i] for i in index],
            ahead=[self.ahead[i] for i in index],
        )


def penalty_state(
    rows: Sequence[Row], sampling: SamplingBatch, vocab: int, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(seen (R, V) bool: prompt + output tokens, counts (R, V): output tokens), or Nones."""
    if sampling.no_penalties:
        return None, None
    counts = torch.zeros(len(rows), vocab, dtype=torch.int32, device=device)
    seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)
    for i, row in enumerate(rows):
        seen[i, list(row.prompt_ids)] = True
        if row.tokens:
            output = torch.tensor(row.tokens, device=device)
            counts[i].scatter_add_(0, output, torch.ones_like(output, dtype=counts.dtype))
            seen[i, output] = True
    return seen, counts


def _top(logprobs: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    if k <= 0:
        return [[] for _ in range(logprobs.shape[0])]
    values, ids = logprobs.topk(k, dim=-1)
    return [
        list(zip(row_ids, row_values, strict=True))
        for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True)
    ]


def token_logprobs(
    rows: Sequence[Row], raw: torch.Tensor, processed: torch.Tensor, chosen: list[int]
) -> list[TokenLogprobs | None]:
    """Each row's logprobs record for its chosen token (None where not asked): from the
    model's own logits `raw` and from the sampled distribution `processed`."""
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
            TokenLogprobs(chosen[i], chosen_lp[i], chosen_raw[i], top[i][:want], raw_top[i][:want])
        )
    return result


def finished_sample(row: Row) -> Sample:
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


def check_stop(row: Row, token: int) -> None:
    if token in row.eos_ids:
        row.finish("stop", token)
        return
    if row.stop_matcher is not None:
        hit: StopHit | None = row.stop_matcher.feed(token)
        if hit is not None:
            row.finish("stop", hit.stop)
            row.stop_byte_offset = hit.byte_offset


def record(
    rows: Sequence[Row],
    chosen: list[int],
    forced_flags: list[bool],
    logprobs: list[TokenLogprobs | None],
    hook: StepHook,
) -> tuple[list[TokenEvent], list[Sample]]:
    """Append each row's token and apply the stop rules: (events, finished samples)."""
    events, finished = [], []
    for i, row in enumerate(rows):
        token = chosen[i]
        row.tokens.append(token)
        row.forced.append(forced_flags[i])
        if logprobs[i] is not None:
            row.logprobs.append(logprobs[i])
        check_stop(row, token)
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
        if row.finish_reason is not None:
            finished.append(finished_sample(row))
    return events, finished


class Batch:
    """See the module docstring. `engine` gives the vocabulary, device and DoLa layers."""

    def __init__(
        self,
        engine: Any,
        rows: list[Row],
        seqs: Sequences,
        logits: torch.Tensor,
        premature: dict[int, torch.Tensor] | None = None,
    ) -> None:
        self.engine = engine
        self.rows = rows
        self.seqs: Sequences | None = seqs
        params = [r.params for r in rows]
        sampling = SamplingBatch.build(params, engine.vocab_size, engine.device)
        seen, counts = penalty_state(rows, sampling, engine.vocab_size, engine.device)
        self.state = RowTensors(
            params, sampling, logits, premature or {}, seen, counts,
            [[] for _ in rows], [None] * len(rows),
        )  # fmt: skip
        self._dola_rows()
        self.next_tokens: list[int] | None = None  # sampled, not yet fed
        self.steps = 0
        self.booked = 0  # KV cells the engine booked for these rows (llama.cpp)
        # which prefill each row's prompt cells came from (shared by that prefill's rows)
        self.prefill_of = {id(r): id(self) for r in rows}

    # ---- views the scheduler and tests read ------------------------------------------

    @property
    def logits(self) -> torch.Tensor:
        return self.state.logits

    @property
    def row_params(self) -> list[SamplingParams]:
        return self.state.params

    @property
    def can_extend(self) -> bool:
        return self.seqs is None or self.seqs.can_merge

    # ---- one step ---------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, hook: StepHook) -> StepEvent:
        """Sample the next token of every row. A row that the last `forward` fed draft
        tokens may take several: while the token it samples is its next draft token, it
        samples again, from the logits after that token (jump-forward: `forward`)."""
        assert self.next_tokens is None, "forward() the last step's tokens first"
        rows, state = self.rows, self.state
        hook.before_step(rows)
        self._refresh_params()
        events: list[TokenEvent] = []
        finished: list[Sample] = []
        last = [0] * len(rows)
        taken = [0] * len(rows)  # draft tokens each row took
        active, logits = list(range(len(rows))), state.logits
        while True:
            chosen = self._sample_rows(active, logits, hook, events, finished)
            more = []
            for i, token in zip(active, chosen, strict=True):
                last[i] = token
                drafts, t = state.drafts[i], taken[i]
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
            logits = torch.stack([state.ahead[i][taken[i] - 1] for i in more])  # type: ignore[index]
        state.drafts = [[] for _ in rows]
        state.ahead = [None] * len(rows)
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
        if drafting is not None and not self.dola and self.seqs is not None and self.seqs.can_crop:
            for i in keep:
                room = min(rows[i].max_new_tokens - len(rows[i].tokens) - 1, MAX_DRAFT)
                if room > 0:
                    state.drafts[i] = list(drafting(rows[i]))[:room]
        self.keep_rows(keep)
        return event

    def _refresh_params(self) -> None:
        """Rebuild the sampling tensors when a hook switched a row's parameters."""
        engine, rows, state = self.engine, self.rows, self.state
        if all(r.params is p for r, p in zip(rows, state.params, strict=True)):
            return
        state.params = [r.params for r in rows]
        state.sampling = SamplingBatch.build(state.params, engine.vocab_size, engine.device)
        self._dola_rows()
        if state.seen is None and not state.sampling.no_penalties:
            state.seen, state.counts = penalty_state(
                rows, state.sampling, engine.vocab_size, engine.device
            )

    def _drop_draft(self, index: int, taken: int) -> None:
        """Row `index` took `taken` tokens of its draft: the rest are cropped."""
        drafts = self.state.drafts[index]
        if taken < len(drafts) and self.seqs is not None:
            self.seqs.crop(index, self.seqs.lengths[index] - (len(drafts) - taken))

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
        engine, state = self.engine, self.state
        rows = [self.rows[i] for i in active]
        whole = len(active) == len(self.rows)
        index = None if whole else torch.tensor(active, device=engine.device)
        sampling = state.sampling if index is None else state.sampling.select(index)
        seen, counts = state.seen, state.counts
        if index is not None and seen is not None and counts is not None:
            seen, counts = seen[index], counts[index]
        raw = logits  # the model's own logits, for raw logprobs
        if self.dola or any(r.want_logprobs is not None for r in rows):
            logits = logits.clone()  # hooks mask in place; keep `raw` intact
        hook.mask_logits(logits, rows)
        if self.dola:  # after the masks: a grammar's tokens stay plausible (dola.py)
            logits = dola_logits(raw, logits, state.premature, self._contrasted_rows())
        warped = sampling.warp(sampling.penalise(logits, seen, counts))
        generators = [None if state.params[i].greedy else self.rows[i].generator for i in active]
        chosen = sampling.choose(warped, generators).tolist()
        forced = [bool(r.forced_queue) for r in rows]
        for j, row in enumerate(rows):
            if forced[j]:
                chosen[j] = row.forced_queue.popleft()
        logprobs = token_logprobs(rows, raw, warped.logits, chosen)
        new_events, new_finished = record(rows, chosen, forced, logprobs, hook)
        events += new_events
        finished += new_finished
        if state.counts is not None and state.seen is not None:
            where = torch.tensor(active, device=engine.device)
            tokens = torch.tensor(chosen, device=engine.device)
            state.counts[where, tokens] += 1
            state.seen[where, tokens] = True
        return chosen

    def row_context(self, index: int, generated: int) -> Any:
        """A copy of row `index`'s KV state for its prompt and first `generated` tokens
        (its context before its token `generated`), alive until released; valid to ask
        while `step` hands finishing rows to the hook. None where the runtime cannot cut
        it (a sliding-window torch cache)."""
        if self.seqs is None:
            return None
        row = self.rows[index]
        return self.seqs.context(index, row.prompt_length + generated)

    def _contrasted_rows(self) -> list[tuple[int, ...] | None]:
        """Each row's DoLa layers for this step. A row whose parameters switched to DoLa
        after the last forward (a phase hook entering the answer) is fed a forced token
        now: it needs no contrast yet, and the next forward computes its layers."""
        missing = self.dola - set(self.state.premature)
        if not missing:
            return self.row_dola
        row_dola = [
            None if layers and missing.intersection(layers) and row.forced_queue else layers
            for row, layers in zip(self.rows, self.row_dola, strict=True)
        ]
        still = {layer for layers in row_dola if layers for layer in layers}
        still -= set(self.state.premature)
        if still:
            raise RuntimeError(
                f"DoLa layers {sorted(still)} were not computed: dola_layers can be turned on "
                "in the middle of a row only while it is fed forced tokens (a step hook must "
                "switch the parameters at least one forced token before the row samples)"
            )
        return row_dola

    def _dola_rows(self) -> None:
        """Each row's DoLa layers (None: off) and their union, when the parameters change."""
        self.row_dola = [self.engine.dola_layers(p) for p in self.state.params]
        self.dola = {layer for layers in self.row_dola if layers for layer in layers}

    # ---- rows leaving and joining -------------------------------------------------------

    def keep_rows(self, keep: list[int]) -> None:
        """Keep only the rows at these indices (in order); the others leave the batch and
        their KV state is released."""
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if self.next_tokens is not None:
            self.next_tokens = [self.next_tokens[i] for i in keep]
        if self.seqs is not None:
            self.seqs.select(keep)
        if not keep:
            self.seqs = None
        # after a step `forward` replaces the logits anyway
        self.state = self.state.take(keep, logits_too=self.next_tokens is None)
        self._dola_rows()
        self._give_back_cells()

    def _give_back_cells(self) -> None:
        """The booked cells of rows that left go back to the runtime (only the rows
        still here stay booked, each with its whole budget)."""
        if self.booked:
            rows = self.rows
            prompts = {(self.prefill_of[id(r)], r.request_index): r.prompt_length for r in rows}
            still = sum(prompts.values()) + sum(r.max_new_tokens + MAX_DRAFT for r in self.rows)
            self.engine.unbook(self.booked - still)
            self.booked = still
            self.prefill_of = {id(r): self.prefill_of[id(r)] for r in self.rows}

    @torch.inference_mode()
    def forward(self) -> None:
        """Feed the tokens sampled by the last `step` (rows still in the batch).

        Jump-forward: the tokens a hook's `draft(row)` proposes (the phase controller:
        the row's queued forced tokens, or the text its grammar forces) are fed right
        after the row's token, in the same forward (on a runtime that pads ragged rows,
        `draft_width` decides how many pay). The next `step` samples each of them as usual and
        keeps them while they agree, so every token is still sampled from its own logits,
        with the same draws: the output is the one-token-a-step output (on the torch
        runtime up to the last bits of multi-token products; on llama.cpp's exact mode
        bit for bit)."""
        assert self.next_tokens is not None and self.rows and self.seqs is not None
        engine, state = self.engine, self.state
        # the rows' parameters now (a hook may have switched them in `after_token`)
        dola = engine.dola_union(r.params for r in self.rows)
        lengths = [1 + len(d) for d in state.drafts]
        if dola or max(lengths) == 1:
            width = 1
        elif self.seqs.pads_ragged:
            width = draft_width([n - 1 for n in lengths])
        else:
            width = max(lengths)
        for drafts in state.drafts:
            del drafts[width - 1 :]
        fed_tokens = [[t, *d] for t, d in zip(self.next_tokens, state.drafts, strict=True)]
        if width == 1:
            fed = self.seqs.feed(fed_tokens, "last", frozenset(dola))
            state.logits = fed.last
        else:
            fed = self.seqs.feed(fed_tokens, "all")
            assert fed.ahead is not None
            state.logits = torch.stack([a[0] for a in fed.ahead])
            state.ahead = [a[1:] for a in fed.ahead]
        state.premature = fed.premature
        self.next_tokens = None

    def extend(self, other: Batch) -> None:
        """Append the rows of a freshly prefilled batch (continuous batching)."""
        assert self.next_tokens is None and other.next_tokens is None and self.rows
        assert self.seqs is not None and other.seqs is not None
        rows = self.rows + other.rows
        room = max(r.max_new_tokens - len(r.tokens) for r in rows) + 1
        self.seqs.merge(other.seqs, room)
        mine, theirs = self.state, other.state
        vocab = mine.logits.shape[1]

        def layer_of(state: RowTensors, size: int, layer: int) -> torch.Tensor:
            # a row only reads its own layers: zeros stand for the layers it does not use
            return state.premature.get(layer, state.logits.new_zeros(size, vocab))

        premature = {
            layer: torch.cat(
                [layer_of(mine, len(self.rows), layer), layer_of(theirs, len(other.rows), layer)]
            )
            for layer in set(mine.premature) | set(theirs.premature)
        }
        engine = self.engine
        params = mine.params + theirs.params
        sampling = SamplingBatch.build(params, engine.vocab_size, engine.device)
        seen, counts = penalty_state(rows, sampling, engine.vocab_size, engine.device)
        self.state = RowTensors(
            params, sampling, torch.cat([mine.logits, theirs.logits]), premature, seen, counts,
            mine.drafts + theirs.drafts, mine.ahead + theirs.ahead,
        )  # fmt: skip
        self.rows = rows
        self._dola_rows()
        other.seqs = None
        self.booked += other.booked
        self.prefill_of.update(other.prefill_of)
        other.booked = 0

    def close(self) -> None:
        """Release the rows' KV state (a batch abandoned before its rows finished)."""
        if self.seqs is not None:
            self.seqs.close()
            self.seqs = None
        self.engine.unbook(self.booked)
        self.booked = 0
