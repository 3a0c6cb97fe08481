"""Helpers the test modules share: writing a spec, a chat prompt's ids, the χ² survival
function, and HF `generate` on a left-padded batch (the oracle of the engine's tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# two prompt items with a {q} variable: the smallest spec that has a batch of prompts
TWO_ITEMS = (
    '[prompt]\nuser = "{q}"\n'
    '[[prompt.items]]\nid = "a"\nq = "uno"\n[[prompt.items]]\nid = "b"\nq = "dos"\n'
)


def write_spec(
    folder: Path,
    name: str,
    model_table: str,
    sections: str = "",
    *,
    samples: int = 2,
    prompt: str = TWO_ITEMS,
    schema: dict[str, Any] | None = None,
    text: str | None = None,
) -> Path:
    """Write `folder/NAME.toml` — `name`, `samples`, the [model] table, the prompt and
    the other `sections` — or `text` as it is, with `schema` as `folder/p.schema.json`.
    Returns the spec's path."""
    if schema is not None:
        (folder / "p.schema.json").write_text(json.dumps(schema))
    path = folder / f"{name}.toml"
    if text is None:
        text = f'name = "{name}"\nsamples = {samples}\n{model_table}\n{prompt}\n{sections}\n'
    path.write_text(text)
    return path


def chat_ids(loaded: Any, text: str) -> list[int]:
    """The ids of a one-message chat prompt, as the model's chat template renders it."""
    from muestra.models.inspection import render_chat

    return render_chat(loaded.tokenizer, [{"role": "user", "content": text}])[1]


def chi_square_sf(statistic: float, dof: int) -> float:
    """P(χ²(dof) > statistic), from torch's regularized upper incomplete gamma."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(statistic / 2.0)))


def hf_generate(loaded: Any, prompts: list[list[int]], pad: int, **kwargs: Any) -> tuple[Any, int]:
    """HF `generate` on the prompts as one left-padded batch (greedy, no sampling filters
    unless `kwargs` ask): (its output, the padded prompt width)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    options = {"do_sample": False, "top_k": None, "top_p": None, "temperature": None, **kwargs}
    out = loaded.model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad, **options)
    return out, width


def count_feeds(monkeypatch) -> list[int]:
    """The rows of every torch forward pass from now on (a list the caller reads)."""
    from muestra.models.runtime.torch_runtime import TorchSequences

    rows_seen: list[int] = []
    feed = TorchSequences.feed

    def counting(self, tokens, *args, **kwargs):
        rows_seen.append(len(tokens))
        return feed(self, tokens, *args, **kwargs)

    monkeypatch.setattr(TorchSequences, "feed", counting)
    return rows_seen


def count_pending(monkeypatch) -> list[int]:
    """How many finished rows wait at each `field_probs` flush from now on."""
    from muestra.answers.answer_probs import AnswerProbabilities

    waiting: list[int] = []
    flush = AnswerProbabilities.flush

    def counting(self):
        waiting.append(len(self._pending))
        return flush(self)

    monkeypatch.setattr(AnswerProbabilities, "flush", counting)
    return waiting
