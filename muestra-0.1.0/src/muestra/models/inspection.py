"""What users look at first (seeds 002–003): tokens, chat templates, next-token tables.

Pure functions over a tokenizer (and a model for `next_token_table`); the CLI
prints what they return.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from muestra.errors import InputError


class Message(BaseModel):
    """One chat message as OpenAI-style APIs take it."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    name: str | None = None


_MESSAGES = TypeAdapter(list[Message])


def parse_messages(data: Any, source: str = "messages") -> list[dict[str, Any]]:
    """Validate a list of messages; errors name `source`, the index and the field."""
    try:
        messages = _MESSAGES.validate_python(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
        raise InputError(
            f"{source}{where}: {first['msg']} (got {first.get('input')!r}). Each message is "
            '{"role": "system|user|assistant|tool", "content": "..."}.'
        ) from err
    if not messages:
        raise InputError(f"{source}: the list of messages is empty; give at least one")
    return [m.model_dump(exclude_none=True) for m in messages]


def read_messages(path: Path) -> list[dict[str, Any]]:
    """Messages from a JSON file: a list, or an object with a `messages` list."""
    try:
        data = json.loads(Path(path).read_text("utf-8"))
    except FileNotFoundError as err:
        raise InputError(f"messages file {path} does not exist") from err
    except json.JSONDecodeError as err:
        raise InputError(f"{path} line {err.lineno} column {err.colno}: {err.msg}") from err
    if isinstance(data, dict) and "messages" in data:
        data = data["messages"]
    return parse_messages(data, source=str(path))


@dataclass(frozen=True)
class TokenView:
    ids: list[int]
    tokens: list[str]  # as the tokenizer stores them (Ġ for a leading space, …)
    pieces: list[str]  # each id decoded on its own

    @property
    def count(self) -> int:
        return len(self.ids)


def view_ids(tokenizer: Any, ids: list[int]) -> TokenView:
    tokens = [token_name(tokenizer, i) for i in ids]
    pieces = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    return TokenView(ids=list(ids), tokens=tokens, pieces=pieces)


def token_name(tokenizer: Any, token_id: int) -> str:
    """The stored form of a token; ids past the tokenizer (config padding) get a placeholder."""
    token = tokenizer.convert_ids_to_tokens(token_id)
    return token if token is not None else f"<unused {token_id}>"


def tokenize(tokenizer: Any, text: str) -> TokenView:
    """Ids of `text` with no BOS or template added, as seed 001 shows them."""
    return view_ids(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    enable_thinking: bool | None = None,
) -> tuple[str, list[int]]:
    """The chat template's text for `messages` and its ids."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            "this model's tokenizer has no chat template (a base model); use plain text "
            "(--raw) instead of messages"
        )
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text, ids


def prompt_ids(
    tokenizer: Any, prompt: str, raw: bool, enable_thinking: bool | None = None
) -> list[int]:
    """Ids of a single user prompt: through the chat template unless `raw`; a raw prompt
    follows the tokenizer's own special-token rule (a <bos> where it adds one)."""
    if raw:
        return tokenizer(prompt)["input_ids"]
    messages = [{"role": "user", "content": prompt}]
    return render_chat(tokenizer, messages, enable_thinking=enable_thinking)[1]


@dataclass(frozen=True)
class NextToken:
    rank: int
    id: int
    token: str
    piece: str
    logit: float
    probability: float
    cumulative: float


@torch.inference_mode()
def next_logits(model: Any, ids: list[int]) -> torch.Tensor:
    """The raw logits (V,) of the token after `ids` (`model`: a runtime or a transformers
    model): what the sampling pipeline starts from."""
    from muestra.models.runtime.torch_runtime import as_runtime

    rows, fed = as_runtime(model).prefill([ids], 1)
    rows.close()
    return fed.last[0].float()


@torch.inference_mode()
def next_token_table(model: Any, tokenizer: Any, ids: list[int], top: int) -> list[NextToken]:
    """The `top` most likely next tokens after `ids`, from the model's raw logits (`model`:
    a runtime or a transformers model)."""
    if top < 1:
        raise InputError(f"--top must be at least 1 (got {top})")
    logits = next_logits(model, ids)
    probs = torch.softmax(logits, dim=-1)
    top_probs, top_ids = probs.topk(min(top, probs.numel()))
    cumulative = top_probs.cumsum(0)
    rows = []
    for rank, (token_id, prob, cum) in enumerate(
        zip(top_ids.tolist(), top_probs.tolist(), cumulative.tolist(), strict=True), start=1
    ):
        token = token_name(tokenizer, token_id)
        piece = tokenizer.decode([token_id], skip_special_tokens=False)
        rows.append(NextToken(rank, token_id, token, piece, float(logits[token_id]), prob, cum))
    return rows
