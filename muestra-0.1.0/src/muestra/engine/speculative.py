"""Speculative decoding with a draft model, exact for greedy and for sampling.

`speculative_decode(engine, draft, requests, num_speculative_tokens=4)` decodes every
sample of every request in one batch (`speculative_generate`: one sample). Each round
the draft model (a smaller model with the same vocabulary, or the target's own first
layers: `layer_draft`) proposes `K` tokens, each drawn from its own processed
distribution `q` (temperature, top-k, top-p, min-p, as the request says);
the target scores all of them in one forward pass, giving `p` at each position, and:

- greedy: the draft token is accepted while it equals the target's argmax; at the first
  mismatch the target's argmax is emitted instead;
- sampling (Leviathan et al. 2023 / Chen et al. 2023): draft token `x` is accepted with
  probability `min(1, p(x) / q(x))`; at the first rejection a token is drawn from
  `norm(max(0, p − q))`; when all `K` are accepted one more is drawn from the target's
  next `p`. Each emitted token then follows the target's processed distribution exactly.

So greedy output equals plain greedy decoding token for token (up to the last bits of
multi-token products), and sampled output follows the same distribution as plain
sampling — not the same draws: the uniforms come from the request's seeded generator in
another order (the tests check both: token equality and a χ² test). Rows accept different
numbers of tokens per round: both models' rows are `RaggedModel`s, where rejected drafts
are cropped and positions are per row, so each row decodes as it would alone. The draft
is a transformers model (the torch runtime) or any runtime with the target's vocabulary
(another GGUF on llama.cpp). Penalties, logit bias, DoLa, stop strings and logprobs are refused.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from muestra.engine.engine import Engine, GenerationRequest
from muestra.engine.sampling import SamplingBatch, SamplingParams
from muestra.engine.seeds import generator_for, sample_seed
from muestra.errors import InputError
from muestra.models.runtime.base import Runtime
from muestra.models.runtime.torch_runtime import as_runtime


@dataclass
class SpeculativeResult:
    token_ids: list[int]
    finish_reason: str
    rounds: int
    drafted: int
    accepted: int

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def layer_draft(model: Any, num_layers: int) -> Any:
    """A draft model made of the target's embeddings, first `num_layers` decoder layers,
    final norm and output head (self-speculation); the weights are shared, not copied."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    total = int(config.num_hidden_layers)
    if not 1 <= num_layers < total:
        raise InputError(f"a layer draft needs 1 to {total - 1} layers, got {num_layers}")
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:num_layers]
    with torch.device("meta"):
        draft = type(model)(config)
    index = re.compile(r"\.(\d+)\.")
    state = {
        name: tensor
        for name, tensor in model.state_dict(keep_vars=True).items()
        if not (m := index.search(name)) or int(m.group(1)) < num_layers
    }
    missing, _ = draft.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if "rotary" not in m]
    if missing:
        raise InputError(f"cannot build a layer draft of {type(model).__name__}: {missing[:3]}")
    draft.tie_weights()
    # non-persistent buffers (rotary frequencies, Gemma's embedding scale) are not in the
    # state dict: the draft shares the target's
    source = dict(model.named_buffers())
    for name, buffer in list(draft.named_buffers()):
        if buffer.is_meta:
            if name not in source:
                raise InputError(f"cannot build a layer draft of {type(model).__name__}: {name}")
            owner, _, leaf = name.rpartition(".")
            draft.get_submodule(owner).register_buffer(leaf, source[name], persistent=False)
    return draft.eval()


def _check(request: GenerationRequest) -> None:
    p = request.params
    if p.has_penalties or p.logit_bias or p.dola_layers is not None:
        raise InputError(
            "speculative decoding supports temperature, top-k, top-p and min-p; not "
            "penalties, logit bias or DoLa"
        )
    if request.stop or request.logprobs is not None:
        raise InputError("speculative decoding does not support stop strings or logprobs")


def verify(
    drafted: list[int],
    qs: list[torch.Tensor] | None,
    ps: torch.Tensor,
    greedy: bool,
    rng: torch.Generator | None,
) -> list[int]:
    """The tokens a round emits: the accepted drafts, then one token from the target.

    `qs[j]` is the draft's distribution that `drafted[j]` was drawn from, `ps[j]` the
    target's at the same position (`ps` has one more row, for the bonus token). Sampling:
    accept with probability min(1, p/q), else draw from norm(max(0, p − q)); greedy:
    accept while the draft equals the target's argmax (then `ps` may be logits, `qs` and
    `rng` None)."""
    new: list[int] = []
    for j, token in enumerate(drafted):
        p = ps[j]
        if greedy:
            if int(p.argmax()) == token:
                new.append(token)
                continue
            new.append(int(p.argmax()))
            return new
        assert qs is not None and rng is not None
        q = qs[j]
        if float(torch.rand((), generator=rng)) * float(q[token]) < float(p[token]):
            new.append(token)
            continue
        residual = (p - q).clamp(min=0)
        total = float(residual.sum())
        new.append(_draw(residual / total if total > 0 else p, rng))
        return new
    k = len(drafted)
    new.append(int(ps[k].argmax()) if greedy else _draw(ps[k], rng))
    return new


def emit(out: list[int], new: list[int], eos: frozenset[int], limit: int) -> str | None:
    """Append `new` to `out` up to an EOS or `limit` tokens: the finish reason, or None."""
    for token in new:
        out.append(token)
        if token in eos:
            return "stop"
        if len(out) >= limit:
            return "length"
    return None


def _draw(probs: torch.Tensor, rng: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=rng))


class RaggedModel:
    """One runtime's rows for decoders whose rows advance by different numbers of tokens.

    Each `feed` gives every row its own tokens (possibly none); a row's rejected drafts
    are cropped (`agree`), so each row decodes as it would alone: on the torch runtime
    they stay as masked holes in the cache, on llama.cpp they leave the sequence.
    Keeps each row's tokens and the logits after its last one (`last`).
    """

    def __init__(self, runtime: Runtime, prompts: list[list[int]], room: int) -> None:
        self.seqs, fed = runtime.prefill(prompts, room)
        self.tokens = [list(p) for p in prompts]
        self.last = list(fed.last)  # per row: the next-token logits after its tokens (V,)

    def feed(self, fed: list[list[int]]) -> list[torch.Tensor]:
        """Feed each row its tokens (possibly none): per row, their logits (len, V)."""
        if not any(fed):
            return [self.last[i].new_empty(0, self.last[i].shape[-1]) for i in range(len(fed))]
        out = self.seqs.feed(fed, "all")
        assert out.ahead is not None
        for i, tokens in enumerate(fed):
            if tokens:
                self.tokens[i] += tokens
                self.last[i] = out.ahead[i][-1]
        return out.ahead

    def agree(self, row: int, truth: list[int]) -> None:
        """Crop the row's tokens that are not a prefix of `truth` (rejected drafts); `last`
        is then stale, and the next feed of that row replaces it."""
        tokens, common = self.tokens[row], 0
        for mine, true in zip(tokens, truth, strict=False):
            if mine != true:
                break
            common += 1
        if common < len(tokens):
            self.seqs.crop(row, common)
            del tokens[common:]

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in order)."""
        self.seqs.select(rows, trim=False)
        self.tokens = [self.tokens[i] for i in rows]
        self.last = [self.last[i] for i in rows]

    def close(self) -> None:
        self.seqs.close()


@dataclass
class _Row:
    """One sample being decoded speculatively."""

    request: int
    sample: int
    params: SamplingParams
    rng: torch.Generator
    eos: frozenset[int]
    limit: int
    prompt: list[int]
    result: SpeculativeResult


def expand_rows(engine: Engine, requests: Sequence[GenerationRequest]) -> list[_Row]:
    rows = []
    for index, request in enumerate(requests):
        for k in range(request.n):
            sample = request.first_sample + k
            seed = (
                request.seeds[k]
                if request.seeds
                else sample_seed(request.seed, request.prompt_index, sample)
            )
            rows.append(
                _Row(
                    index,
                    sample,
                    request.params,
                    generator_for(seed),
                    frozenset() if request.ignore_eos else engine.eos_token_ids,
                    request.max_new_tokens,
                    list(request.prompt_ids),
                    SpeculativeResult([], "length", 0, 0, 0),
                )
            )
    return rows


def gathered(rows: list[_Row], requests: Sequence[GenerationRequest]) -> list[list[Any]]:
    out: list[list[Any]] = [[] for _ in requests]
    for row in rows:
        out[row.request].append(row.result)
    return out


@torch.inference_mode()
def speculative_decode(
    engine: Engine,
    draft: Any,
    requests: Sequence[GenerationRequest],
    num_speculative_tokens: int = 4,
) -> list[list[SpeculativeResult]]:
    """Every sample of every request decoded speculatively in one batch (ragged: each row
    accepts its own number of tokens per round). Per request, its samples in order."""
    if not 1 <= num_speculative_tokens <= 32:
        raise InputError(f"num_speculative_tokens={num_speculative_tokens} must be in [1, 32]")
    for index, request in enumerate(requests):
        engine.validate(index, request)
        _check(request)
    rows = expand_rows(engine, requests)
    everyone = list(rows)
    room = max(r.limit for r in rows) + num_speculative_tokens + 1
    prompts = [r.prompt for r in rows]
    draft_runtime = as_runtime(draft)
    for runtime in (engine.runtime, draft_runtime):
        reserve = getattr(runtime, "reserve", None)
        if reserve is not None:
            reserve(sum(len(p) for p in prompts) + 2 * len(rows) * room)
    target = RaggedModel(engine.runtime, prompts, room)
    small = RaggedModel(draft_runtime, prompts, room)
    try:
        _speculate(engine, rows, target, small, num_speculative_tokens)
    finally:
        target.close()
        small.close()
    return gathered(everyone, requests)


def _speculate(
    engine: Engine,
    rows: list[_Row],
    target: RaggedModel,
    small: RaggedModel,
    num_speculative_tokens: int,
) -> None:
    batches: dict[tuple[int, int], SamplingBatch] = {}

    def dist(i: int, logits: torch.Tensor) -> torch.Tensor:
        """(n, V) processed probabilities of row i (one-hot argmax when greedy)."""
        logits = logits[:, : engine.vocab_size]
        params = rows[i].params
        if params.greedy:
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        key = (id(rows[i]), logits.shape[0])
        if key not in batches:
            batches[key] = SamplingBatch.build(
                [params] * logits.shape[0], engine.vocab_size, engine.device
            )
        return batches[key].warp(logits).logits.softmax(dim=-1)

    while rows:
        truths = [r.prompt + r.result.token_ids for r in rows]
        ks = [min(num_speculative_tokens, r.limit - len(r.result.token_ids) - 1) for r in rows]
        # the draft catches up with what was emitted, then proposes k tokens per row
        small.feed([t[len(small.tokens[i]) :] for i, t in enumerate(truths)])
        drafted: list[list[int]] = [[] for _ in rows]
        qs: list[list[torch.Tensor]] = [[] for _ in rows]
        for j in range(max(ks)):
            for i, row in enumerate(rows):
                if j < ks[i]:
                    q = dist(i, small.last[i][None])[0]
                    drafted[i].append(int(q.argmax()) if row.params.greedy else _draw(q, row.rng))
                    qs[i].append(q)
            if j + 1 < max(ks):
                small.feed([d[-1:] if j + 1 < ks[i] else [] for i, d in enumerate(drafted)])
        # the target scores them all in one forward: p_0 … p_k per row
        behind = [t[len(target.tokens[i]) :] for i, t in enumerate(truths)]
        before = [target.last[i] for i in range(len(rows))]
        logits = target.feed([b + d for b, d in zip(behind, drafted, strict=True)])
        finished = []
        for i, row in enumerate(rows):
            scored = (
                logits[i][len(behind[i]) - 1 :]
                if behind[i]
                else torch.cat([before[i][None], logits[i]])
            )
            new = verify(drafted[i], qs[i], dist(i, scored), row.params.greedy, row.rng)
            row.result.rounds += 1
            row.result.drafted += ks[i]
            row.result.accepted += len(new) - 1
            truth = truths[i] + new
            target.agree(i, truth)
            small.agree(i, truth)
            finish = emit(row.result.token_ids, new, row.eos, row.limit)
            if finish is not None:
                row.result.finish_reason = finish
                finished.append(i)
        if finished:
            stay = [i for i in range(len(rows)) if i not in finished]
            rows = [rows[i] for i in stay]
            if stay:
                target.keep(stay)
                small.keep(stay)


def speculative_generate(
    engine: Engine, draft: Any, request: GenerationRequest, num_speculative_tokens: int = 4
) -> SpeculativeResult:
    """One sample (`request.n` must be 1), as `speculative_decode` decodes it."""
    return speculative_decode(engine, draft, [request], num_speculative_tokens)[0][0]
