"""The OpenAI wire format: request bodies (validated with pydantic) and error bodies.

Fields follow OpenAI's API; the extra sampling fields follow vLLM's names (`top_k`,
`min_p`, `repetition_penalty`, `ignore_eos`, `thinking_token_budget`,
`chat_template_kwargs`) so a client written for vLLM works unchanged. Fields muestra
does not implement are refused by name (`tools`, `audio`…) rather than ignored, except
bookkeeping fields that change nothing (`user`, `metadata`, `store`…).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    create_model,
    field_validator,
    model_validator,
)

from muestra.settings import INT_CAP, AnswerSettings, answer_fields, request_fields

# JSON has one number type, so a strict float still takes 1 but refuses `true` and "1";
# a strict bool refuses "yes" and 1.
Number = Annotated[float, Strict()]
Flag = Annotated[bool, Strict()]
Int = Annotated[int, Strict()]  # refuses `true`, 1.5 and "1"
TOKEN_ID = re.compile(r"-?[0-9]{1,10}")
SURROGATE = re.compile("[\ud800-\udfff]")


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str | None = None,
    ) -> None:
        # a lone surrogate quoted from the request must not break the UTF-8 response
        message = _encodable(message)
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = None if param is None else _encodable(param)
        self.code = code
        self.kind = kind or {
            401: "authentication_error",
            404: "not_found_error",
            413: "invalid_request_error",
            500: "server_error",
            503: "server_error",
        }.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


def _encodable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # newer vLLM name for reasoning_content
    name: str | None = None

    def for_template(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": content or "",
        }
        reasoning = self.reasoning_content if self.reasoning_content is not None else self.reasoning
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        return message


class JsonSchemaFormat(BaseModel):
    name: str = "answer"
    schema_: dict[str, Any] = Field(alias="schema")
    strict: Flag | None = None
    description: str | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(BaseModel):
    include_usage: Flag = False


def find_surrogate(value: Any, path: str = "") -> str | None:
    """The path of the first string (or key) in a JSON value holding a lone UTF-16
    surrogate (JSON may escape one, "\\ud800"; no tokenizer, nor pydantic, can encode
    it); None when there is none."""
    if isinstance(value, str):
        return path if SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if find_surrogate(key) is not None:
                return where
            found = find_surrogate(item, where)
            if found is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = find_surrogate(item, f"{path}.{index}" if path else str(index))
            if found is not None:
                return found
    return None


# fields accepted and ignored: they change nothing about the generated tokens
IGNORED = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"}
# fields refused: muestra cannot honour them, and silently dropping them would mislead
UNSUPPORTED = {
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "audio",
    "modalities",
    "prediction",
    "web_search_options",
    "best_of",
    "suffix",
    "echo",  # chat only: a text completion declares it (server/echo.py)
}


# the sampling settings of a request, derived from their declaration (muestra/settings.py)
SamplingSettings = create_model(
    "SamplingSettings",
    __config__=ConfigDict(extra="allow", populate_by_name=True, allow_inf_nan=False),
    **request_fields(),
)


class SamplingFields(SamplingSettings):  # type: ignore[misc,valid-type]
    """What chat and text completions share: the sampling settings (`settings.Sampling`;
    unset ones take the model's defaults) and the rest of a request."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, allow_inf_nan=False)

    # left out: the served model, as llama-server and vLLM take it (lm-eval's `gguf` client
    # sends no model)
    model: str | None = None
    logit_bias: dict[str, Number] | None = None
    max_tokens: Int | None = Field(None, ge=1, le=INT_CAP)
    n: Int = Field(1, ge=1, le=128)
    seed: Int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: Flag = False
    stream_options: StreamOptions | None = None
    ignore_eos: Flag = False
    # beam search, vLLM's names: n beams, all n returned; early_stopping is muestra's (HF's)
    use_beam_search: Flag = False
    length_penalty: Number = Field(1.0, ge=-10, le=10)
    early_stopping: Flag | Literal["never"] = False
    # muestra's extension: prompt-lookup decoding (greedy), up to N draft tokens a forward
    prompt_lookup: Int | None = Field(None, ge=1, le=64)
    # muestra's extension: speculative decoding with the server's --draft-model
    speculative: Flag = False

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not TOKEN_ID.fullmatch(key):
                raise ValueError(f"keys must be token ids (up to 10 digits), got {key[:20]!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"bias for token {key} must be in [-100, 100], got {bias}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 16 or any(not s for s in stops):
            raise ValueError("give at most 16 non-empty stop strings")
        return value

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def refuse_unsupported(self) -> None:
        for name in sorted((self.model_extra or {}).keys() & UNSUPPORTED):
            raise ApiError(400, f"{name!r} is not supported by muestra serve", param=name)


class AnswerPhase(
    create_model(  # type: ignore[misc]
        "AnswerSampling",
        __config__=ConfigDict(extra="forbid", allow_inf_nan=False),
        **answer_fields(),
    )
):
    """Sampling of the answer after the reasoning (`settings.AnswerSettings`: default
    greedy), and its length."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_tokens: Int = Field(AnswerSettings.model_fields["max_tokens"].default, ge=1, le=INT_CAP)


class MuestraOptions(BaseModel):
    """muestra's own extension (other servers ignore it): what `muestra run` needs to get
    from a server exactly the samples a local run gets. With `answer`, the request's
    sampling fields drive the reasoning only, the answer is sampled with these, and the
    token budget is the local runner's (reasoning budget + closing text + answer
    max_tokens) instead of max_tokens. `think = false` skips the think phase."""

    model_config = ConfigDict(extra="forbid")

    answer: AnswerPhase | None = None
    close_text: str | None = None
    think: Flag = True
    # "text": plain-text reasoning for a model without think tags (the client has asked
    # for it in the prompt): the reply reasons until its end of turn or
    # thinking_token_budget, then close_text (default "\n\nFinal answer:\n") and the answer
    think_mode: Literal["tags", "text"] = "tags"


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1, le=INT_CAP)
    logprobs: Flag = False
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    thinking_token_budget: Int | None = Field(None, ge=0, le=INT_CAP)
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None  # vLLM's field; needs --trust-request-chat-template
    muestra: MuestraOptions | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[Int] | list[list[Int]] = Field(min_length=1)
    max_tokens: Int | None = Field(16, ge=0, le=INT_CAP)  # 0: with echo only
    logprobs: Int | None = Field(None, ge=0, le=20)
    echo: Flag = False  # the prompt's tokens and log-probabilities first (server/echo.py)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        """One message naming the first wrong element, instead of pydantic's four (one
        per shape the union allows, the first of which — `prompt.str` — misleads)."""
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError(
                "must be a text, a list of texts, a list of token ids or a list of lists of "
                f"token ids; got {type(value).__name__}"
            )
        nested = any(isinstance(v, list) for v in value)
        for i, item in enumerate(value):
            if nested:
                if not isinstance(item, list):
                    raise ValueError(
                        f"[{i}] is {item!r}: in a list of token-id lists every item is a list"
                    )
                for j, token in enumerate(item):
                    _token_id(token, f"[{i}][{j}]")
            elif not isinstance(item, str):
                if any(isinstance(v, str) for v in value):
                    raise ValueError(f"[{i}] is {item!r}: a list of texts holds only texts")
                _token_id(item, f"[{i}]")
        return value

    @model_validator(mode="after")
    def _zero_tokens(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 generates nothing; it is for echo: true only")
        return self

    def prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]


def _token_id(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f'{where} is {value!r}: a token id is a whole number (not true/false, 1.5 or "1")'
        )


class TokenizeRequest(BaseModel):
    """`POST /tokenize` (vLLM's shape, which lm-evaluation-harness's remote tokenizer uses)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    add_special_tokens: Flag = True  # strict: "yes" and 1 are refused, as everywhere
    model: str | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens: list[Int]
    model: str | None = None
