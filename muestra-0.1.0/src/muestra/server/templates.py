"""Turning a chat request into prompt text, off the event loop and within bounds.

`render_prompt` runs in a worker thread (the caller awaits it with `asyncio.to_thread`),
so a large prompt never stalls other requests or `/health`. The model's own template is
trusted; a template sent by the caller (`chat_template`, top-level or inside
`chat_template_kwargs`) is refused unless the server runs with
`--trust-request-chat-template`, and then it renders under `TemplateLimits`:

- time: a trace function, active only in the template's own frames, raises
  `TemplateTimeout` once the deadline passes, so loops written in the template stop.
  A single long C-level operation (one huge `'x' * n`) cannot be interrupted; a thread
  cannot be killed. Jinja's sandbox (transformers renders with
  `ImmutableSandboxedEnvironment`) already caps each `range()` at 100,000 items.
- size: the rendered text is measured before it is tokenized.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

from muestra.server.protocol import ApiError

TRUST_FLAG = "--trust-request-chat-template"
# jinja compiles `Environment.from_string` templates under this file name
TEMPLATE_FILENAME = "<template>"


@dataclass(frozen=True)
class TemplateLimits:
    """Bounds on rendering a caller's own chat template."""

    seconds: float = 5.0
    max_chars: int = 16 * 1024 * 1024


class TemplateTimeout(Exception):
    """Raised inside a caller's template once its time is up."""


def request_template(body_template: str | None, kwargs: dict[str, Any]) -> str | None:
    """The caller's own chat template, if the request carries one (top-level first)."""
    given = body_template if body_template is not None else kwargs.get("chat_template")
    if given is not None and not isinstance(given, str):
        raise ApiError(
            400,
            "chat_template_kwargs.chat_template must be a string (a Jinja template)",
            param="chat_template_kwargs.chat_template",
        )
    return given


def refuse_request_template(param: str) -> ApiError:
    return ApiError(
        400,
        f"{param}: this server renders only the model's own chat template; start "
        f"`muestra serve` with {TRUST_FLAG} to accept templates from requests",
        param=param,
        code="chat_template_not_allowed",
    )


def render_prompt(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    kwargs: dict[str, Any],
    limits: TemplateLimits | None,
) -> str:
    """The prompt text; `limits` bound a caller's template (None: the model's own)."""
    if limits is None:
        return _apply(tokenizer, messages, kwargs)
    deadline = time.monotonic() + limits.seconds

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename != TEMPLATE_FILENAME:
            return None  # no line tracing outside the template: keeps the cost small
        if time.monotonic() > deadline:
            raise TemplateTimeout
        return trace

    sys.settrace(trace)
    try:
        text = _apply(tokenizer, messages, kwargs)
    except TemplateTimeout as err:
        raise ApiError(
            400,
            f"chat_template: rendering took longer than this server's limit of "
            f"{limits.seconds:g} s; simplify the template",
            param="chat_template",
            code="chat_template_timeout",
        ) from err
    finally:
        sys.settrace(None)  # the worker thread is reused
    if len(text) > limits.max_chars:
        raise ApiError(
            413,
            f"chat_template: the rendered prompt has {len(text)} characters, above this "
            f"server's limit of {limits.max_chars} for request templates",
            param="chat_template",
            code="prompt_too_long",
        )
    return text


def _apply(tokenizer: Any, messages: list[dict[str, Any]], kwargs: dict[str, Any]) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, **kwargs)
    except (ApiError, TemplateTimeout):
        raise
    except Exception as err:  # noqa: BLE001 - a template error is the caller's input
        raise ApiError(400, f"the chat template refused the messages: {err}") from err
    if not isinstance(text, str):
        raise ApiError(
            400,
            "chat_template_kwargs made the template return no text",
            param="chat_template_kwargs",
        )
    return text
