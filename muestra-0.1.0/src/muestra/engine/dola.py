"""DoLa: decoding by contrasting layers (Chuang et al. 2023), as HF v4 implemented it.

transformers v5 moved DoLa out of `generate()` into Hub code (`transformers-community/
dola`, `trust_remote_code`); muestra builds it into the engine, batched, with any
sampling on top. For a row whose `SamplingParams.dola_layers` is set:

1. candidate premature layers, by HF's rules: with `N` hidden layers, "low" is
   `range(start, N // 2, 2)` and "high" `range(N // 2, N, 2)` (for `N > 40`:
   `range(start, 20, 2)` and `range(N - 20, N, 2)`), where `start` skips the word
   embeddings (layer 0) of a model with tied embeddings (2, or 1 for a 2-layer model);
   an explicit list keeps the layers below `N`. Layer `i` is `hidden_states[i]`
   (0 = the embeddings) and its logits are the output head applied to it directly, with
   no final norm, as HF v4 did;
2. dynamic premature layer: the candidate whose next-token distribution is farthest from
   the final layer's by Jensen–Shannon divergence (HF's `kl_div(...).mean(-1)` form);
3. adaptive plausibility constraint: tokens whose final log-probability is below
   `max + log(0.1)` are removed (-inf); the premature log-probs of removed tokens are
   set to -1e-3. A step hook's masks (a grammar, a think phase's EOS ban) apply first,
   so `max` is the best token the hook allows and a grammar always keeps a token (HF v4
   applied its processors after DoLa, which can leave no valid token at all);
4. the row's logits become `log p_final − log p_premature` on the kept tokens, and the
   usual pipeline (bias, penalties, temperature, filters, draw) runs on them. The paper
   and HF recommend `repetition_penalty = 1.2` with DoLa.

One difference from HF v4, on purpose: HF picks one premature layer per step for the
whole batch (it averages the divergences over the batch), so a row's tokens depend on
its batch-mates; muestra picks it per row, so every row decodes as it would alone
(identical to HF v4 at batch size 1). Cost: one more output-head product per candidate
layer and step, and the model returns its hidden states.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from muestra.errors import InputError

RELATIVE_TOP = 0.1
BASE_FILTER_VALUE = -1e-3


def candidate_layers(config: Any, dola_layers: str | Sequence[int]) -> tuple[int, ...]:
    """The premature layers a row contrasts with, by HF v4's rules."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    final = int(text.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if not tied:
        start = 0
    elif final > 2:
        start = 2
    elif final == 2:
        start = 1
    else:
        start = 0
    if dola_layers == "low":
        if start == final // 2:
            return (start,)
        return tuple(range(start, final // 2, 2) if final <= 40 else range(start, 20, 2))
    if dola_layers == "high":
        return tuple(range(final // 2, final, 2) if final <= 40 else range(final - 20, final, 2))
    if isinstance(dola_layers, str):
        raise InputError(
            f"dola_layers={dola_layers!r}: use 'low', 'high' or a list of layer indices"
        )
    layers = tuple(int(i) for i in dola_layers if int(i) < final)
    if not layers:
        raise InputError(
            f"dola_layers={list(dola_layers)}: no index below the model's {final} layers"
        )
    return layers


def relative_top_filter(
    scores: torch.Tensor, baseline: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's `_relative_top_filter`: log-softmax both, drop tokens far below the best."""
    scores = scores.log_softmax(dim=-1)
    baseline = baseline.log_softmax(dim=-1)
    best = scores.max(dim=-1).values
    threshold = torch.minimum(best, best + math.log(RELATIVE_TOP)).unsqueeze(-1)
    removed = scores < threshold
    return scores.masked_fill(removed, float("-inf")), baseline.masked_fill(
        removed, BASE_FILTER_VALUE
    )


def contrast(
    final: torch.Tensor,
    premature: dict[int, torch.Tensor],
    layers: tuple[int, ...],
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """DoLa logits of rows that share one candidate list: `final` (R, V) float32;
    `allowed`: `final` with the tokens a hook forbids at -inf (default: `final`)."""
    if len(layers) == 1:
        base = premature[layers[0]]
    else:
        stacked = torch.stack([premature[i] for i in layers])  # (C, R, V)
        mature_p = final.softmax(dim=-1)
        premature_p = stacked.softmax(dim=-1)
        middle = 0.5 * (mature_p[None] + premature_p)
        kl_mature = F.kl_div(final.log_softmax(dim=-1)[None], middle, reduction="none").mean(-1)
        kl_premature = F.kl_div(stacked.log_softmax(dim=-1), middle, reduction="none").mean(-1)
        js = 0.5 * (kl_mature + kl_premature)  # (C, R)
        chosen = js.argmax(dim=0)  # per row, not averaged over the batch (see above)
        base = stacked[chosen, torch.arange(final.shape[0], device=final.device)]
    scores, baseline = relative_top_filter(final if allowed is None else allowed, base)
    return scores - baseline


def dola_logits(
    logits: torch.Tensor,
    masked: torch.Tensor,
    premature: dict[int, torch.Tensor],
    row_layers: Sequence[tuple[int, ...] | None],
) -> torch.Tensor:
    """`masked` (R, V: the logits after the step hook's masks) with the DoLa rows replaced
    by their contrast (a new tensor). The premature layer is chosen on the model's own
    `logits`; the plausibility constraint keeps the tokens within a factor 0.1 of the best
    token the hook allows, so that a grammar always leaves a token to pick."""
    out = masked.clone()
    groups: dict[tuple[int, ...], list[int]] = {}
    for row, layers in enumerate(row_layers):
        if layers is not None:
            groups.setdefault(layers, []).append(row)
    for layers, rows in groups.items():
        index = torch.tensor(rows, device=logits.device)
        out[index] = contrast(
            logits[index].float(),
            {i: premature[i][index] for i in layers},
            layers,
            masked[index].float(),
        )
    return out
