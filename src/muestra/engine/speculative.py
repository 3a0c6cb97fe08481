"""Speculative decoding with a draft model, exact for greedy and for sampling.

`speculative_generate(engine, draft, request, num_speculative_tokens=4)` decodes one
request. Each round the draft model (a smaller model with the same vocabulary, or the
target's own first layers: `layer_draft`) proposes `K` tokens, each drawn from its own
processed distribution `q` (temperature, top-k, top-p, min-p, as the request says);
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
another order (the tests check both: token equality and a χ² test). Both caches drop
rejected positions (`crop`). One request at a time; penalties, logit bias, DoLa, stop
strings and logprobs are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from muestra.engine.engine import Engine, GenerationRequest
from muestra.engine.sampling import SamplingBatch
from muestra.engine.seeds import generator_for, sample_seed
from muestra.errors import InputError


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
    for name, buffer in model.named_buffers():
        if "rotary" in name:  # non-persistent buffers are not in the state dict
            draft.get_submodule(name.rsplit(".", 1)[0]).register_buffer(
                name.rsplit(".", 1)[1], buffer, persistent=False
            )
    return draft.eval()


def _check(request: GenerationRequest) -> None:
    p = request.params
    if request.n != 1:
        raise InputError("speculative decoding decodes one sample per request; set n=1")
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


class CachedModel:
    """One model's cache and the tokens in it."""

    def __init__(self, engine: Engine, model: Any, prompt: list[int], room: int) -> None:
        self.engine, self.model = engine, model
        self.cache, logits, self.mask, _ = engine._prefill([prompt], room, model=model)
        self.tokens = list(prompt)
        self.last = logits  # (1, V): the next-token logits after `tokens` (at the start)

    def feed(self, tokens: list[int]) -> torch.Tensor:
        """Feed the next `tokens`: their logits (len, V) float32."""
        device, seen = self.engine.device, len(self.tokens)
        self.mask = torch.cat([self.mask, self.mask.new_ones(1, len(tokens))], dim=1)
        out = self.model(
            input_ids=torch.tensor([tokens], device=device),
            attention_mask=self.mask,
            position_ids=torch.arange(seen, seen + len(tokens), device=device)[None],
            cache=self.cache,
            use_cache=True,
        )
        self.cache = out.cache
        self.tokens += tokens
        return out.logits[0].float()

    def agree(self, truth: list[int]) -> None:
        """Forget the cached tokens that are not a prefix of `truth` (rejected drafts)."""
        common = 0
        for mine, true in zip(self.tokens, truth, strict=False):
            if mine != true:
                break
            common += 1
        extra = len(self.tokens) - common
        if extra:
            self.cache.crop(-extra)
            self.mask = self.mask[:, :-extra]
            del self.tokens[common:]


@torch.inference_mode()
def speculative_generate(
    engine: Engine, draft: Any, request: GenerationRequest, num_speculative_tokens: int = 4
) -> SpeculativeResult:
    if not 1 <= num_speculative_tokens <= 32:
        raise InputError(f"num_speculative_tokens={num_speculative_tokens} must be in [1, 32]")
    engine.validate(0, request)
    _check(request)
    params = request.params
    batches: dict[int, SamplingBatch] = {}  # the pipeline's tensors for n rows
    seed = request.seeds[0] if request.seeds else sample_seed(request.seed, request.prompt_index, 0)
    rng = generator_for(seed)
    eos = frozenset() if request.ignore_eos else engine.eos_token_ids
    prompt = list(request.prompt_ids)
    room = request.max_new_tokens + num_speculative_tokens + 1
    target = CachedModel(engine, engine.model, prompt, room)
    small = CachedModel(engine, draft, prompt, room)

    def dist(logits: torch.Tensor) -> torch.Tensor:
        """(n, V) processed probabilities (one-hot argmax when greedy)."""
        logits = logits[:, : engine.vocab_size]
        if params.greedy:
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        rows = logits.shape[0]
        if rows not in batches:
            batches[rows] = SamplingBatch.build([params] * rows, engine.vocab_size, engine.device)
        return batches[rows].warp(logits).logits.softmax(dim=-1)

    out: list[int] = []
    result = SpeculativeResult(out, "length", 0, 0, 0)
    while True:  # every round emits at least one token; `emit` ends it
        k = min(num_speculative_tokens, request.max_new_tokens - len(out) - 1)
        truth = prompt + out
        # the draft catches up with what was emitted, then proposes k tokens
        behind = truth[len(small.tokens) :]
        q_logits = small.feed(behind)[-1:] if behind else small.last
        drafted: list[int] = []
        qs: list[torch.Tensor] = []
        for j in range(k):
            q = dist(q_logits)[0]
            drafted.append(int(q.argmax()) if params.greedy else _draw(q, rng))
            qs.append(q)
            if j + 1 < k:
                q_logits = small.feed([drafted[-1]])
        # the target scores them all in one forward: p_0 … p_k
        behind = truth[len(target.tokens) :]
        if behind:
            ps = dist(target.feed(behind + drafted)[len(behind) - 1 :])
        elif drafted:
            ps = dist(torch.cat([target.last, target.feed(drafted)]))
        else:
            ps = dist(target.last)
        result.rounds += 1
        result.drafted += k
        new = verify(drafted, qs, ps, params.greedy, rng)
        result.accepted += len(new) - 1
        truth = prompt + out + new
        target.agree(truth)
        small.agree(truth)
        finish = emit(out, new, eos, request.max_new_tokens)
        if finish is not None:
            result.finish_reason = finish
            return result
