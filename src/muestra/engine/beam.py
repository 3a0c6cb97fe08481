"""Beam search, batched across prompts, with Hugging Face's semantics.

`beam_search(engine, requests, params)` runs every request's `num_beams` beams as rows
of one batch (several prompts' beams together, each prompt prefilled once and copied to
its beams). Each step, for every prompt at once:

1. log-softmax of each beam's next-token logits (float32), plus the beam's running
   score (its summed log-probability); an optional `mask` may set log-probs to -inf
   (applied after the log-softmax, as HF applies its logits processors);
2. the top `C = max(2, 1 + #EOS ids) × num_beams` continuations over all beams × tokens
   (C, not `num_beams`, so that enough unfinished ones remain when the best end);
3. continuations that end (an EOS id, or the token budget) and rank among the first
   `num_beams` are finished hypotheses, scored `sum_logprob / length ** length_penalty`
   (length = generated tokens, the EOS included); the best `num_beams` finished ones are
   kept per prompt (a fixed-size heap, as tensors);
4. the best `num_beams` unfinished continuations are the next running beams; the rows'
   KV state is reordered by beam origin (`Sequences.select`: on llama.cpp a beam that
   forks shares its parent's cells);
5. a prompt is done when no running beam can beat its worst kept hypothesis (HF's
   heuristic per `early_stopping`: False compares at the current length, "never" at the
   best reachable length when `length_penalty > 0`), or with `early_stopping=True` as
   soon as `num_beams` hypotheses are finished; its rows leave the batch.

These are the rules of transformers' `_beam_search` (v5, vectorized), step for step, so
that the result equals `model.generate(num_beams=k, do_sample=False, ...)` token for
token (tests/test_beam.py is the oracle). Beam search scores the model's own
log-probabilities: temperature, top-k/top-p/min-p, penalties and seeds do not apply, and
a request with any of them set is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from muestra.engine.engine import Engine, GenerationRequest
from muestra.engine.sampling import SamplingParams
from muestra.errors import InputError
from muestra.models.runtime.base import Sequences

EarlyStopping = bool | Literal["never"]
NEG = -1.0e9  # HF's "impossible" score


@dataclass(frozen=True)
class BeamParams:
    num_beams: int = 4
    length_penalty: float = 1.0
    early_stopping: EarlyStopping = False
    num_return_sequences: int = 1

    def check(self) -> None:
        if not 1 <= self.num_beams <= 64:
            raise InputError(f"num_beams={self.num_beams} must be in [1, 64]")
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise InputError(
                f"num_return_sequences={self.num_return_sequences} must be in "
                f"[1, num_beams={self.num_beams}]"
            )
        if self.early_stopping not in (True, False, "never"):
            raise InputError(
                f'early_stopping={self.early_stopping!r} must be true, false or "never"'
            )
        if not -10.0 <= self.length_penalty <= 10.0:
            raise InputError(f"length_penalty={self.length_penalty} must be in [-10, 10]")


@dataclass
class Hypothesis:
    """One returned sequence of a beam search."""

    request_index: int
    rank: int  # 0: the best score
    token_ids: list[int]
    score: float  # sum_logprob / len(token_ids) ** length_penalty (HF's sequences_scores)
    sum_logprob: float  # the summed log-probability of its tokens under the model
    finish_reason: Literal["stop", "length"]


# mask(logprobs (R, V), prefixes): set disallowed log-probs to -inf in place; `prefixes`
# are the generated tokens of each row's beam so far
BeamMask = Callable[[torch.Tensor, list[list[int]]], None]


def beam_search(
    engine: Engine,
    requests: Sequence[GenerationRequest],
    params: BeamParams,
    mask: BeamMask | None = None,
    eos_token_ids: Collection[int] | None = None,
) -> list[list[Hypothesis]]:
    """The best `num_return_sequences` hypotheses of every request, best first.
    `eos_token_ids`: the tokens that end a hypothesis (default: the model's EOS ids; a
    think phase ends on `</think>`)."""
    params.check()
    for index, request in enumerate(requests):
        engine.validate(index, request)
        _check_request(index, request)
    results: list[list[Hypothesis]] = [[] for _ in requests]
    per_wave = max(1, engine.max_batch // params.num_beams)
    for start in range(0, len(requests), per_wave):
        wave = list(range(start, min(start + per_wave, len(requests))))
        search = _Search(engine, requests, wave, params, mask, eos_token_ids)
        for index, hypotheses in search.run().items():
            results[index] = hypotheses
    return results


def _check_request(index: int, request: GenerationRequest) -> None:
    if request.n != 1:
        raise InputError(
            f"request {index}: n={request.n}; a beam search returns num_return_sequences "
            "hypotheses per prompt, set n=1"
        )
    if request.params != SamplingParams():
        raise InputError(
            f"request {index}: beam search scores the model's own log-probabilities; "
            "temperature, top-k/top-p/min-p, penalties and logit bias do not apply: leave "
            "them at their defaults"
        )
    if request.stop:
        raise InputError(f"request {index}: stop strings are not supported with beam search")
    if request.logprobs is not None:
        raise InputError(
            f"request {index}: logprobs are not reported by beam search (each hypothesis "
            "carries its summed log-probability)"
        )


class _Search:
    """One wave: P prompts × K beams as P*K rows (prompt p owns rows p*K … p*K+K-1)."""

    def __init__(
        self,
        engine: Engine,
        requests: Sequence[GenerationRequest],
        wave: list[int],
        params: BeamParams,
        mask: BeamMask | None,
        eos_token_ids: Collection[int] | None = None,
    ) -> None:
        self.engine, self.params, self.mask = engine, params, mask
        self.requests = [requests[i] for i in wave]
        self.indices = wave
        eos = engine.eos_token_ids if eos_token_ids is None else frozenset(eos_token_ids)
        self.eos = [frozenset() if r.ignore_eos else eos for r in self.requests]

    @torch.inference_mode()
    def run(self) -> dict[int, list[Hypothesis]]:
        engine, params = self.engine, self.params
        K, P = params.num_beams, len(self.requests)  # noqa: N806 - the papers' names
        device = engine.device
        n_eos = max(len(e) for e in self.eos)
        C = max(2, 1 + n_eos) * K  # noqa: N806
        budget = torch.tensor([r.max_new_tokens for r in self.requests], device=device)
        longest = int(budget.max())
        eos_table = torch.zeros(P, engine.vocab_size, dtype=torch.bool, device=device)
        for p, ids in enumerate(self.eos):
            if ids:
                eos_table[p, list(ids)] = True

        prompts = [r.prompt_ids for r in self.requests]
        reserve = getattr(engine.runtime, "reserve", None)
        if reserve is not None:  # every beam may end on its own cells
            reserve(sum(len(p) for p in prompts) + 2 * K * P * (longest + 1))
        seqs, fed = engine.runtime.prefill(prompts, longest)
        try:
            return self._search(seqs, fed.last, budget, longest, eos_table, C)
        finally:
            seqs.close()

    def _search(
        self,
        seqs: Sequences,
        logits: torch.Tensor,
        budget: torch.Tensor,
        longest: int,
        eos_table: torch.Tensor,
        C: int,  # noqa: N803
    ) -> dict[int, list[Hypothesis]]:
        """The search, one step a loop, kept in one piece: every step reads and writes the
        same dozen per-prompt tensors (running and kept beams, their scores, sums, lengths,
        finished and improvable flags) in the order HF's beam search updates them, which
        is what makes each returned sequence and score equal HF's; split into functions,
        each would take and return them all."""
        engine, params = self.engine, self.params
        K, P = params.num_beams, len(self.requests)  # noqa: N806
        device = engine.device
        expand = torch.arange(P, device=device).repeat_interleave(K)
        seqs.select(expand.tolist(), trim=False)
        logits = logits[expand]

        # running beams and kept hypotheses, per prompt (as HF's tensors)
        running = torch.full((P, K, longest), -1, dtype=torch.long, device=device)
        running_scores = torch.zeros(P, K, device=device)
        running_scores[:, 1:] = NEG  # only the first beam's tokens compete at step 0
        kept = torch.full((P, K, longest), -1, dtype=torch.long, device=device)
        kept_scores = torch.full((P, K), NEG, device=device)
        kept_sums = torch.zeros(P, K, device=device)
        kept_lengths = torch.zeros(P, K, dtype=torch.long, device=device)
        kept_finished = torch.zeros(P, K, dtype=torch.bool, device=device)
        improvable = torch.ones(P, 1, dtype=torch.bool, device=device)
        top_k_mask = torch.zeros(C, dtype=torch.bool, device=device)
        top_k_mask[:K] = True
        active = torch.arange(P, device=device)  # prompts still searching
        done: dict[int, list[Hypothesis]] = {}

        step = 0
        while True:
            A = len(active)  # noqa: N806
            logprobs = logits.float().log_softmax(dim=-1)
            if self.mask is not None:
                prefixes = running[active].view(A * K, longest)[:, :step].tolist()
                self.mask(logprobs, prefixes)
            vocab = logprobs.shape[-1]
            scores = logprobs.view(A, K, vocab) + running_scores[active][:, :, None]
            top_values, top_flat = scores.view(A, K * vocab).topk(C, dim=1)
            origin = top_flat // vocab  # (A, C) beam each continuation extends
            tokens = top_flat % vocab
            candidates = running[active].gather(1, origin[:, :, None].expand(A, C, longest))
            candidates = candidates.clone()
            candidates[:, :, step] = tokens
            hits = eos_table[active].gather(1, tokens) | (step + 1 >= budget[active])[:, None]

            # the next running beams: the best K continuations that did not end
            alive_values = top_values + hits.float() * NEG
            chosen = alive_values.topk(K, dim=1).indices
            running[active] = candidates.gather(1, chosen[:, :, None].expand(A, K, longest))
            running_scores[active] = alive_values.gather(1, chosen)
            beam_origin = origin.gather(1, chosen)  # (A, K)

            # the kept hypotheses: merge the best K that just ended with those kept before
            just_ended = hits & top_k_mask[None, :]
            length = step + 1
            new_scores = top_values / (length**params.length_penalty)
            full = kept_finished[active].all(dim=1, keepdim=True) & (params.early_stopping is True)
            new_scores = new_scores + full.float() * NEG
            new_scores = new_scores + (~improvable[active]).float() * NEG
            new_scores = new_scores + (~just_ended).float() * NEG
            merged_scores = torch.cat([kept_scores[active], new_scores], dim=1)
            best = merged_scores.topk(K, dim=1).indices  # (A, K)
            kept_scores[active] = merged_scores.gather(1, best)
            kept[active] = torch.cat([kept[active], candidates], dim=1).gather(
                1, best[:, :, None].expand(A, K, longest)
            )
            kept_sums[active] = torch.cat([kept_sums[active], top_values], dim=1).gather(1, best)
            lengths = torch.full((A, C), length, dtype=torch.long, device=device)
            kept_lengths[active] = torch.cat([kept_lengths[active], lengths], dim=1).gather(1, best)
            kept_finished[active] = torch.cat([kept_finished[active], just_ended], dim=1).gather(
                1, best
            )

            # can a running beam still beat the worst kept hypothesis?
            if params.early_stopping == "never" and params.length_penalty > 0.0:
                reachable = budget[active][:, None].float()
            else:
                reachable = torch.full((A, 1), float(length), device=device)
            best_running = running_scores[active][:, :1] / (reachable**params.length_penalty)
            worst_kept = torch.where(
                kept_finished[active],
                kept_scores[active].min(dim=1, keepdim=True).values,
                torch.full_like(kept_scores[active], NEG),
            )
            improvable[active] = improvable[active] & (best_running > worst_kept).any(
                dim=-1, keepdim=True
            )
            finished = (
                ~improvable[active][:, 0]
                | (kept_finished[active].all(dim=1) & (params.early_stopping is True))
                | hits.all(dim=1)
            )
            step += 1
            for a in finished.nonzero().flatten().tolist():
                done[self.indices[int(active[a])]] = self._hypotheses(
                    int(active[a]), kept, kept_scores, kept_sums, kept_lengths
                )
            if bool(finished.all()):
                return done

            # reorder the rows by beam origin, dropping the prompts that are done
            stay = (~finished).nonzero().flatten()
            rows = (beam_origin[stay] + (stay * K)[:, None]).flatten()
            seqs.select(rows.tolist(), trim=False)  # HF's beam search keeps every column
            active = active[stay]
            next_tokens = running[active][:, :, step - 1].reshape(-1).tolist()
            logits = seqs.feed([[t] for t in next_tokens]).last

    def _hypotheses(
        self,
        p: int,
        kept: torch.Tensor,
        scores: torch.Tensor,
        sums: torch.Tensor,
        lengths: torch.Tensor,
    ) -> list[Hypothesis]:
        result = []
        for rank in range(self.params.num_return_sequences):
            length = int(lengths[p, rank])
            if length == 0:  # fewer finished hypotheses than asked (an all-masked search)
                break
            tokens = kept[p, rank, :length].tolist()
            reason: Literal["stop", "length"] = "stop" if tokens[-1] in self.eos[p] else "length"
            result.append(
                Hypothesis(
                    self.indices[p],
                    rank,
                    tokens,
                    float(scores[p, rank]),
                    float(sums[p, rank]),
                    reason,
                )  # fmt: skip
            )
        return result
