"""The sampling pipeline: pure tensor functions applied in one fixed order.

For a batch of rows with logits `(B, V)` and per-row parameters:

1. logit bias          `logits + bias`                            (OpenAI `logit_bias`)
2. repetition penalty  seen tokens: `l / r` if `l > 0` else `l * r` (HF semantics; prompt
                       and generated tokens count as seen)
3. presence/frequency  `l - presence * [count > 0] - frequency * count` (OpenAI semantics;
                       only generated tokens count)
4. temperature         `l / T`; rows with `T == 0` are greedy and skip steps 4–8
5. top-k               keep the `k` largest (`k == 0`: off)
6. top-p               keep the smallest top set whose probability reaches `p` (HF semantics,
                       at least one token kept)
7. min-p               drop tokens whose probability is below `min_p * max probability`
8. typical-p           locally typical sampling (Meister et al. 2023; HF's
                       `TypicalLogitsWarper`, llama.cpp's `llama_sampler_init_typical`):
                       rank tokens by |surprise − entropy| = |−log p − H| and keep the
                       closest until their probability reaches `p` (at least one kept)
9. sample              greedy rows: argmax; others: inverse CDF with one uniform number drawn
                       from the row's own `torch.Generator`, so a row's draw never depends on
                       the other rows of the batch

Typical-p comes after min-p, as in HF generate's warper list (temperature, top-k, top-p,
min-p, typical-p). llama.cpp's default sampler chain runs it before top-p and applies the
temperature last; muestra keeps one order for both runtimes (the llama.cpp runtime only
computes logits), so the same settings draw from the same distribution on either.

Rows with top-k run steps 5–9 on their `k` candidates only (`topk`, then top-p and
min-p on `(B, k)` instead of sorting the whole vocabulary): on a 151,936-token
vocabulary at batch 16 this is ~100 ms a step cheaper on this CPU. Candidates are kept in
ascending id order, so the draw is the same inverse CDF over the vocabulary order. The
path a row takes depends only on its own parameters. Ties at the k-th logit keep the
first `k` (HF keeps every tie; with float logits ties are vanishingly rare).

Every function is pure (returns a new tensor) except where named `_inplace`. Removed
tokens get `-inf`. `SamplingBatch` turns per-row `SamplingParams` into tensors once and
records shortcut flags (`all_greedy`, `no_penalties`, …) that skip whole steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from muestra.errors import InputError
from muestra.settings import DEFAULT, NAMES, check_sampling

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingParams:
    """Decoding parameters of one row: the settings `muestra.settings.Sampling` declares
    (their defaults, plain sampling at temperature 1, and bounds are read from there), plus
    a per-token `logit_bias`."""

    temperature: float = DEFAULT.temperature
    top_k: int = DEFAULT.top_k
    top_p: float = DEFAULT.top_p
    min_p: float = DEFAULT.min_p
    typical_p: float = DEFAULT.typical_p
    repetition_penalty: float = DEFAULT.repetition_penalty
    presence_penalty: float = DEFAULT.presence_penalty
    frequency_penalty: float = DEFAULT.frequency_penalty
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    # DoLa (engine/dola.py): "low", "high" or premature layer indices; None = off
    dola_layers: str | tuple[int, ...] | None = DEFAULT.dola_layers

    def __post_init__(self) -> None:
        if isinstance(self.dola_layers, list):  # a row's parameters are frozen: a tuple
            raise InputError(
                f"dola_layers={self.dola_layers!r} is invalid: must be 'low', 'high' or a "
                "tuple of layer indices"
            )
        check_sampling({name: getattr(self, name) for name in NAMES})
        for token_id, value in self.logit_bias.items():
            if not math.isfinite(value):
                raise InputError(f"logit_bias[{token_id}]={value!r} is invalid: must be finite")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1
            or self.presence_penalty != 0
            or self.frequency_penalty != 0
        )


# ---- pure ops ------------------------------------------------------------------------


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """HF `RepetitionPenaltyLogitsProcessor`: `seen` (B, V) bool, `penalty` (B,)."""
    penalty = penalty.unsqueeze(1)  # (B, 1)
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency(
    logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor
) -> torch.Tensor:
    """OpenAI penalties: `counts` (B, V) of generated tokens; `presence`, `frequency` (B,)."""
    counts = counts.to(logits.dtype)
    return logits - presence.unsqueeze(1) * (counts > 0) - frequency.unsqueeze(1) * counts


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Divide each row by its temperature; rows with temperature 0 are left as they are."""
    safe = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    return logits / safe.unsqueeze(1)


# top-p looks at the most likely TOP_P_HEAD tokens first and sorts a row's whole vocabulary
# only when they hold less than its `p`
TOP_P_HEAD = 1024


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches `top_p`.

    A token is kept when the probability of the tokens above it is below `p` (HF's rule,
    "drop where the ascending cumulative probability is at most `1 - p`", read from the
    top). Sorting a 49,152-token vocabulary at batch 32 takes ~80 ms on this CPU, and a
    nucleus is rarely more than a few hundred tokens: the top `TOP_P_HEAD` (`topk`, ~10 ms)
    decide every row whose head reaches `p`; the others are sorted in full. The two
    readings of the rule differ only in float rounding at the boundary token."""
    if logits.shape[-1] <= 4 * TOP_P_HEAD:
        return _top_p_sorted(logits, top_p)
    probs = logits.softmax(dim=-1)
    head, ids = probs.topk(TOP_P_HEAD, dim=-1)  # descending
    above = head.cumsum(dim=-1) - head  # probability of the tokens above each one
    keep_head = above < top_p.unsqueeze(1)
    keep_head[:, 0] = True  # always keep the most likely token
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, ids, keep_head)
    result = logits.masked_fill(~keep, NEG_INF)
    short = (head.sum(dim=-1) < top_p).nonzero().flatten()
    if short.numel():
        result[short] = _top_p_sorted(logits[short], top_p[short])
    return result


def _top_p_sorted(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`apply_top_p` by a full ascending sort (HF's computation)."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)  # ascending, as HF
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p).unsqueeze(1)
    remove_sorted[:, -1] = False  # always keep the most likely token
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below `min_p` times the row's top probability."""
    probs = logits.softmax(dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, NEG_INF)


def apply_typical_p(logits: torch.Tensor, typical_p: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling, HF's `TypicalLogitsWarper` (min_tokens_to_keep 1) per row:
    sort tokens by |−log p − H| (H the row's entropy), keep them while the probability
    before each is below `p`, and every token as typical as the last one kept. Rows with
    `p >= 1` are left as they are (the warper is off for them, as in HF)."""
    rows = (typical_p < 1).nonzero().flatten()
    if not rows.numel():
        return logits
    scores = logits[rows]  # (R, V)
    log_probs = scores.log_softmax(dim=-1)
    entropy = -(log_probs * log_probs.exp()).nansum(dim=-1, keepdim=True)  # (R, 1)
    shifted, order = (-log_probs - entropy).abs().sort(dim=-1)  # most typical first
    cumulative = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < typical_p[rows].unsqueeze(1)).sum(dim=1)
    last = last.clamp(max=scores.shape[-1] - 1)
    remove_sorted = shifted > shifted.gather(1, last.unsqueeze(1))
    remove_sorted[:, 0] = False  # always keep the most typical token
    remove = remove_sorted.scatter(1, order, remove_sorted)
    result = logits.clone()
    result[rows] = scores.masked_fill(remove, NEG_INF)
    return result


def sample_inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One draw per row: the first token whose cumulative probability exceeds `u * total`.

    `probs` (B, V) non-negative, `uniforms` (B,) in [0, 1). A token of probability 0 can
    never be drawn. Accumulates in float64 so the CDF of a 150k vocabulary stays exact
    enough for the draw to match the distribution.
    """
    cdf = probs.to(torch.float64).cumsum(dim=-1)  # (B, V)
    target = (uniforms.to(torch.float64) * cdf[:, -1]).unsqueeze(1)  # (B, 1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)


# ---- the batch ---------------------------------------------------------------------


def _row() -> Any:
    """A field of `SamplingBatch` holding one value per row (selected with the rows)."""
    return field(metadata={"per_row": True})


@dataclass
class SamplingBatch:
    """Per-row parameters as tensors, with flags that skip steps nobody uses."""

    temperature: torch.Tensor = _row()  # (B,)
    top_k: torch.Tensor = _row()  # (B,) int64
    top_p: torch.Tensor = _row()  # (B,)
    min_p: torch.Tensor = _row()  # (B,)
    typical_p: torch.Tensor = _row()  # (B,)
    repetition_penalty: torch.Tensor = _row()  # (B,)
    presence_penalty: torch.Tensor = _row()  # (B,)
    frequency_penalty: torch.Tensor = _row()  # (B,)
    logit_bias: torch.Tensor | None  # (B, V) or None
    all_greedy: bool
    any_greedy: bool
    candidate_rows: torch.Tensor  # (C,) sampled rows with top-k > 0
    full_rows: torch.Tensor  # (F,) sampled rows without top-k
    no_penalties: bool
    no_repetition_penalty: bool
    no_top_p: bool
    no_min_p: bool
    no_typical_p: bool

    @classmethod
    def build(
        cls, params: Sequence[SamplingParams], vocab_size: int, device: torch.device
    ) -> SamplingBatch:
        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        bias = None
        if any(p.logit_bias for p in params):
            bias = torch.zeros(len(params), vocab_size, device=device)
            for row, p in enumerate(params):
                for token_id, value in p.logit_bias.items():
                    if not 0 <= int(token_id) < vocab_size:
                        raise InputError(
                            f"logit_bias token id {token_id} is outside the model's vocabulary "
                            f"[0, {vocab_size})"
                        )
                    bias[row, int(token_id)] = float(value)
        sampled = [p for p in params if not p.greedy]
        candidate_rows = [i for i, p in enumerate(params) if not p.greedy and p.top_k > 0]
        full_rows = [i for i, p in enumerate(params) if not p.greedy and p.top_k == 0]
        return cls(
            temperature=column([p.temperature for p in params]),
            # a k above the vocabulary keeps all of it (as vLLM), never overflows int64
            top_k=torch.tensor(
                [min(p.top_k, vocab_size) for p in params], dtype=torch.int64, device=device
            ),
            top_p=column([p.top_p for p in params]),
            min_p=column([p.min_p for p in params]),
            typical_p=column([p.typical_p for p in params]),
            repetition_penalty=column([p.repetition_penalty for p in params]),
            presence_penalty=column([p.presence_penalty for p in params]),
            frequency_penalty=column([p.frequency_penalty for p in params]),
            logit_bias=bias,
            all_greedy=not sampled,
            any_greedy=len(sampled) < len(params),
            candidate_rows=torch.tensor(candidate_rows, dtype=torch.long, device=device),
            full_rows=torch.tensor(full_rows, dtype=torch.long, device=device),
            no_penalties=not any(p.has_penalties for p in params),
            no_repetition_penalty=all(p.repetition_penalty == 1 for p in params),
            no_top_p=all(p.top_p >= 1 for p in sampled),
            no_min_p=all(p.min_p == 0 for p in sampled),
            no_typical_p=all(p.typical_p >= 1 for p in sampled),
        )

    def select(self, keep: torch.Tensor) -> SamplingBatch:
        """The rows in `keep` (flags stay valid: dropping rows never turns a step on)."""
        rows = {
            f.name: getattr(self, f.name)[keep] for f in fields(self) if f.metadata.get("per_row")
        }
        bias = self.logit_bias[keep] if self.logit_bias is not None else None
        kept = replace(self, **rows, logit_bias=bias)
        sampled = kept.temperature > 0
        has_k = kept.top_k > 0
        return replace(
            kept,
            candidate_rows=(sampled & has_k).nonzero().flatten(),
            full_rows=(sampled & ~has_k).nonzero().flatten(),
        )

    def penalise(
        self, logits: torch.Tensor, seen: torch.Tensor | None, counts: torch.Tensor | None
    ) -> torch.Tensor:
        """Steps 1–3 (before temperature): what the model is told not to say."""
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        if self.no_penalties:
            return logits
        if not self.no_repetition_penalty:
            assert seen is not None, "repetition penalty needs the seen-token mask"
            logits = apply_repetition_penalty(logits, seen, self.repetition_penalty)
        assert counts is not None, "presence/frequency penalties need token counts"
        return apply_presence_frequency(
            logits, counts, self.presence_penalty, self.frequency_penalty
        )

    def warp(self, logits: torch.Tensor) -> Warped:
        """Steps 4–8: temperature, top-k, top-p, min-p, typical-p. Greedy rows pass through."""
        if self.all_greedy:
            return Warped(logits, None, None)
        if not self.any_greedy and not self.candidate_rows.numel():
            # every row samples from its whole vocabulary (the usual batch of samples):
            # the same steps on the whole batch, without a -inf canvas to scatter into
            full = self._filter(apply_temperature(logits, self.temperature), None)
            return Warped(full, None, None)
        greedy = (self.temperature == 0).unsqueeze(1)  # (B, 1)
        processed = torch.where(greedy, logits, torch.full_like(logits, NEG_INF))
        ids = values = None
        if self.candidate_rows.numel():
            rows = self.candidate_rows
            k = self.top_k[rows]
            kmax = int(k.max())
            # temperature > 0 keeps the order: take the top k first, then scale only them
            values, ids = logits[rows].topk(kmax, dim=-1)  # (C, kmax), descending
            values = apply_temperature(values, self.temperature[rows])
            beyond = torch.arange(kmax, device=logits.device).unsqueeze(0) >= k.unsqueeze(1)
            values = self._filter(values.masked_fill(beyond, NEG_INF), rows)
            ids, order = ids.sort(dim=-1)  # ascending ids: the draw follows vocabulary order
            values = values.gather(1, order)
            processed[rows.unsqueeze(1), ids] = values
        if self.full_rows.numel():
            rows = self.full_rows
            processed[rows] = self._filter(
                apply_temperature(logits[rows], self.temperature[rows]), rows
            )
        return Warped(processed, ids, values)

    def _filter(self, logits: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """Steps 6–8 (top-p, min-p, typical-p) on the logits of `rows` (None: every row)."""
        if not self.no_top_p:
            logits = apply_top_p(logits, self.top_p if rows is None else self.top_p[rows])
        if not self.no_min_p:
            logits = apply_min_p(logits, self.min_p if rows is None else self.min_p[rows])
        if not self.no_typical_p:
            typical = self.typical_p if rows is None else self.typical_p[rows]
            logits = apply_typical_p(logits, typical)
        return logits

    def choose(self, warped: Warped, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
        """Step 9: argmax for greedy rows, one inverse-CDF draw for the others. (B,)"""
        processed = warped.logits
        if self.all_greedy:
            return processed.argmax(dim=-1)
        draws = [
            float(torch.rand((), generator=generator, dtype=torch.float64))
            if generator is not None
            else 0.0
            for generator in generators
        ]
        uniforms = torch.tensor(draws, dtype=torch.float64, device=processed.device)
        if self.full_rows.numel() == processed.shape[0]:  # every row, in order: no copies
            return sample_inverse_cdf(processed.softmax(dim=-1), uniforms)
        # greedy rows take the argmax; every other row is drawn below
        chosen = (
            processed.argmax(dim=-1)
            if self.any_greedy
            else torch.zeros(processed.shape[0], dtype=torch.long, device=processed.device)
        )
        if self.candidate_rows.numel():
            assert warped.candidate_ids is not None and warped.candidate_logits is not None
            rows = self.candidate_rows
            picks = sample_inverse_cdf(warped.candidate_logits.softmax(dim=-1), uniforms[rows])
            chosen[rows] = warped.candidate_ids.gather(1, picks.unsqueeze(1)).squeeze(1)
        if self.full_rows.numel():
            rows = self.full_rows
            chosen[rows] = sample_inverse_cdf(processed[rows].softmax(dim=-1), uniforms[rows])
        return chosen


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution (V,) one row of `params` draws its next token from, given the raw
    `logits` (V,) of a fresh prompt: steps 4–8 (temperature, top-k, top-p, min-p,
    typical-p), then softmax; greedy (temperature 0) puts all the mass on the argmax.
    Penalties need the row's past tokens and are not applied here."""
    if params.has_penalties or params.logit_bias:
        raise InputError("probabilities() applies temperature, top-k, top-p and min-p only")
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(), logits.numel()).to(logits.dtype)
    batch = SamplingBatch.build([params], logits.numel(), logits.device)
    return batch.warp(logits.unsqueeze(0)).logits[0].softmax(dim=-1)


@dataclass
class Warped:
    """Logits after steps 1–8 (B, V), plus the candidates of top-k rows (C, kmax)."""

    logits: torch.Tensor
    candidate_ids: torch.Tensor | None
    candidate_logits: torch.Tensor | None
