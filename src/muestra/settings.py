"""Sampling and phase settings, each declared once: here.

`Sampling` declares how a row draws its next token. A setting has one name everywhere —
`--top-p`, `--think-top-p` and `--answer-top-p` on the command line, `top_p` in a spec's
`[think]` and `[answer]` tables, in a request to `muestra serve` and in a remote run's
requests — and one type, default, bound and help text. Its `Use` says where it applies:
in the think and answer phases, in a model's `generation_config.json`, in which decoding
strategies, in OpenAI-style requests. `ThinkSettings` and `AnswerSettings` declare the
phases (budget, mode, closing text, answer length, strategy) around their sampling.

Everything else is derived from these declarations, not written again:

- the engine's per-row `SamplingParams` checks its values with `check_sampling`;
- a spec's `[think]`/`[answer]` tables are `ThinkSettings`/`AnswerSettings` with the
  spec's own checks on top (experiments/spec.py);
- `muestra generate`'s sampling flags (`cli/sampling_options.py`), with the bounds in
  their help and every value checked by `check_flags` before the model loads;
- `muestra serve`'s request fields (`request_fields`, `answer_fields`: server/protocol.py)
  and how a request's values become the engine's (`from_request`);
- a remote run's request body (`to_request`, `REMOTE`: experiments/remote.py);
- the model's own defaults, read from its generation config (`from_generation_config`,
  `serving_defaults`);
- the documentation's table of settings (`markdown_table`: the site's generated
  "Sampling settings" page, docs/_ext/muestra_reference.py).

`tests/test_architecture.py` fails when a setting's name (or its flag) is written as a
string anywhere else in the package, so a new setting is added here and in the engine
step that applies it, and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, create_model
from pydantic.fields import FieldInfo

from muestra.errors import InputError

# decoding strategies that draw tokens; beam search draws nothing, so no sampling setting
# applies to it
SAMPLE = "sample"
SPECULATIVE = "speculative"
LOOKUP = "lookup"  # greedy only: temperature must be 0
DRAWING = frozenset({SAMPLE, SPECULATIVE})
# bounds that keep a request's numbers inside int32/int64 tensors and Python's int()
INT_CAP = 2**31 - 1
BOUNDS = ("ge", "gt", "le", "lt")  # the numeric constraints a Field may carry


@dataclass(frozen=True)
class Use:
    """Where a sampling setting applies (carried in its field's metadata)."""

    phases: bool = True  # the think and answer phases take it (spec, --think-/--answer-)
    model: bool = True  # a generation_config.json key of the same name sets its default
    strategies: frozenset[str] = DRAWING  # the decoding strategies that apply it
    remote: bool = True  # a remote run sends it to OpenAI-compatible endpoints
    # every OpenAI-compatible server leaves it off by default: a remote run that cannot
    # resolve it (spec, generation config) sends it off, without asking for an opt-in
    off_everywhere: bool = False
    request_max: float | None = None  # muestra serve's upper bound, tighter than the rule
    request_off: int | None = None  # the value that turns it off in OpenAI-style requests


DolaLayers = Literal["low", "high"] | tuple[Annotated[int, Strict(), Field(ge=0)], ...] | None


class Sampling(BaseModel):
    """How a row draws its next token; the defaults are plain sampling at temperature 1.

    The engine applies the settings in one order (engine/sampling.py): penalties →
    temperature → top-k → top-p → min-p → typical-p → draw.
    """

    # built when first used, not at import: every command's flags are derived from it
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, defer_build=True)

    temperature: Annotated[float, Use(strategies=DRAWING | {LOOKUP}, request_max=2)] = Field(
        1.0, ge=0, description="Divide the logits by T; 0 is greedy (the most likely token)."
    )
    top_p: Annotated[float, Use()] = Field(
        1.0,
        gt=0,
        le=1,
        description="Keep the smallest set of most likely tokens whose probability reaches "
        "p (1 = off).",
    )
    top_k: Annotated[int, Use(request_max=INT_CAP, request_off=-1)] = Field(
        0, ge=0, description="Keep the k most likely tokens (0 = off)."
    )
    min_p: Annotated[float, Use()] = Field(
        0.0,
        ge=0,
        lt=1,
        description="Drop tokens less likely than min_p times the most likely one (0 = off).",
    )
    typical_p: Annotated[float, Use(off_everywhere=True)] = Field(
        1.0,
        gt=0,
        le=1,
        description="Locally typical sampling: keep the tokens whose surprise is closest to "
        "the entropy, until their probability reaches p (1 = off).",
    )
    repetition_penalty: Annotated[
        float, Use(phases=False, strategies=frozenset({SAMPLE}), request_max=INT_CAP)
    ] = Field(
        1.0,
        gt=0,
        description="HF semantics, on prompt and output tokens: a seen token's logit l "
        "becomes l / r if l > 0, else l * r (1 = off).",
    )
    presence_penalty: Annotated[
        float, Use(phases=False, model=False, strategies=frozenset({SAMPLE}))
    ] = Field(
        0.0,
        ge=-2,
        le=2,
        description="OpenAI semantics, on output tokens: minus this once a token appeared "
        "(0 = off).",
    )
    frequency_penalty: Annotated[
        float, Use(phases=False, model=False, strategies=frozenset({SAMPLE}))
    ] = Field(
        0.0,
        ge=-2,
        le=2,
        description="OpenAI semantics, on output tokens: minus this per earlier occurrence "
        "(0 = off).",
    )
    dola_layers: Annotated[
        DolaLayers, Use(model=False, strategies=frozenset({SAMPLE}), remote=False)
    ] = Field(
        None,
        min_length=1,
        description='DoLa (contrast with early layers): "low", "high" or layer indices; '
        "then sampling as usual on the contrasted logits (try repetition_penalty 1.2).",
    )


DEFAULT = Sampling()
NAMES: tuple[str, ...] = tuple(Sampling.model_fields)
# a setting's name by attribute (`SETTING.top_p`), for code that must name one setting:
# a misspelt or removed one fails where it is named instead of drifting
SETTING = SimpleNamespace(**{name: name for name in NAMES})


def use(name: str) -> Use:
    """The `Use` of setting `name`."""
    found = [m for m in Sampling.model_fields[name].metadata if isinstance(m, Use)]
    assert len(found) == 1, f"{name} declares one Use"
    return found[0]


def names_where(test: Callable[[Use], bool]) -> tuple[str, ...]:
    return tuple(name for name in NAMES if test(use(name)))


PHASED = names_where(lambda u: u.phases)  # a phase's sampling: [think], [answer], --think-…
FROM_MODEL = names_where(lambda u: u.model)  # keys of generation_config.json
REMOTE = names_where(lambda u: u.remote and u.phases)  # what a remote run sends


def flag(name: str, prefix: str = "") -> str:
    """The command-line flag of setting `name` (prefix "think_" or "answer_" for a phase's)."""
    return "--" + (prefix + name).replace("_", "-")


def rule(name: str, model: type[BaseModel] = Sampling) -> str:
    """The bound of `name` in words, from its declaration: ">= 0", "in (0, 1]"…"""
    info = model.model_fields[name]
    if name == "dola_layers":
        return "'low', 'high' or a non-empty tuple of layer indices >= 0"
    bounds = {key: getattr(m, key) for m in info.metadata for key in BOUNDS if hasattr(m, key)}
    low = next((("[" if k == "ge" else "(", bounds[k]) for k in ("ge", "gt") if k in bounds), None)
    high = next(((k, bounds[k]) for k in ("le", "lt") if k in bounds), None)
    high = (("]" if high[0] == "le" else ")"), high[1]) if high else None
    if low and high:
        return f"in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1]:g}" + (
            " and finite" if info.annotation is float else ""
        )
    return "finite" if info.annotation is float else "any value"


def check_sampling(values: Mapping[str, Any], name_of: Callable[[str], str] = str) -> None:
    """Refuse, by name, a value outside its setting's bound (`name_of` gives the name to
    show: the setting's, a flag…). Raises `InputError`."""
    try:
        Sampling.model_validate(dict(values))
    except ValidationError as err:
        first = err.errors()[0]
        name = str(first["loc"][0])
        if name not in Sampling.model_fields:
            raise InputError(f"{name_of(name)}: not a sampling setting") from None
        value = values.get(name, first.get("input"))
        raise InputError(f"{name_of(name)}={value!r} is invalid: must be {rule(name)}") from None


# ---- the phases ------------------------------------------------------------------------


def _phase_sampling(model_name: str, doc: str, defaults: Sampling | None) -> type[BaseModel]:
    """The phase-taking settings of `Sampling` as a model of their own, with `defaults`
    (None: every setting unset, to be filled from the model's generation config)."""
    fields: dict[str, Any] = {}
    for name in PHASED:
        info = Sampling.model_fields[name]
        if defaults is None:
            fields[name] = (info.annotation | None, FieldInfo.merge_field_infos(info, default=None))
        else:
            default = getattr(defaults, name)
            fields[name] = (info.annotation, FieldInfo.merge_field_infos(info, default=default))
    config = ConfigDict(
        extra="forbid", allow_inf_nan=False, populate_by_name=True, defer_build=True
    )
    return create_model(model_name, __config__=config, __doc__=doc, **fields)


ThinkSampling = _phase_sampling(
    "ThinkSampling",
    "A reasoning's sampling; a setting left unset comes from the model's generation config.",
    None,
)
# the answer is greedy unless told otherwise (seed 000)
ANSWER_DEFAULT = Sampling(temperature=0.0)
AnswerSampling = _phase_sampling(
    "AnswerSampling", "An answer's sampling (default greedy).", ANSWER_DEFAULT
)
SampledAnswer = _phase_sampling(
    "SampledAnswer", "A sampled answer's sampling (default temperature 1).", DEFAULT
)

Strategy = Literal["sample", "beam"]
# the think phase's own sampling when nothing else sets it (Qwen3-Thinking-2507's card)
QWEN_THINKING = Sampling(temperature=0.6, top_p=0.95, top_k=20)


class BeamSettings(BaseModel):
    """How a phase decodes: sampled, or beam-searched (then no sampling setting applies)."""

    model_config = ConfigDict(defer_build=True)  # built when first used: a fast CLI start
    strategy: Strategy = Field(
        "sample",
        description='sample (temperature & filters; 0 = greedy) or "beam": the most likely '
        "sequences of the phase",
    )
    num_beams: int = Field(4, ge=1, le=64, description='Beams when strategy = "beam".')
    length_penalty: float = Field(
        1.0, ge=-10, le=10, description="Beam score = sum logprob / length ** length_penalty."
    )
    early_stopping: bool | Literal["never"] = Field(
        False, description='Beam search stopping rule, as Hugging Face: false, true or "never".'
    )


class ThinkSettings(BeamSettings, ThinkSampling):  # type: ignore[misc,valid-type]
    """The think phase: its sampling (unset: the model's generation config), a hard budget
    of reasoning tokens, and how it is closed."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, defer_build=True)

    budget: int = Field(1024, ge=0, description="Reasoning tokens before the closing text.")
    close_text: str | None = Field(
        None,
        description="Forced when the budget runs out (default: Qwen's sentence + </think>; "
        "in text mode '\\n\\nFinal answer:\\n').",
    )
    mode: Literal["auto", "tags", "text"] = Field(
        "auto",
        description="tags: the model's own think block (skipped on a model without one); "
        "text: plain-text reasoning asked for in the prompt, ended by the model's end of turn "
        "or the budget, then close_text (default '\\n\\nFinal answer:\\n'); auto: tags "
        "when the model has them, else text.",
    )
    instruction: str | None = Field(
        None, description="Text mode: the instruction appended to the user message."
    )


class AnswerSettings(BeamSettings, AnswerSampling):  # type: ignore[misc,valid-type]
    """The answer phase: its sampling (default greedy), its length and how it decodes."""

    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, populate_by_name=True, defer_build=True
    )

    max_tokens: int = Field(256, ge=1, description="Token budget of the answer.")
    stop: list[str] = Field(
        default_factory=list,
        description="Stop strings of a free-text answer without a think phase: the answer "
        "ends at the first one (which is not kept).",
    )
    prompt_lookup: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Prompt-lookup decoding of a free-text greedy answer: up to N draft "
        "tokens copied from the prompt per forward (the same answer as plain greedy).",
    )
    draft_model: str | None = Field(
        None,
        description='Speculative decoding of a free-text answer with this draft: "layers:N" '
        "(the model's own first N layers) or a model with the same vocabulary.",
    )
    num_speculative_tokens: int = Field(4, ge=1, le=32, description="Draft tokens a round.")


@dataclass(frozen=True)
class PhaseSettings:
    """What a caller asks of the think and answer phases (no think phase: `think` None)."""

    think: ThinkSettings | None
    answer: AnswerSettings


def sampling_of(phase: BaseModel) -> dict[str, Any]:
    """The sampling settings a phase gives (unset ones of a think phase left out)."""
    values = {name: getattr(phase, name) for name in PHASED}
    return {name: value for name, value in values.items() if value is not None}


def sampling_table(**values: Any) -> dict[str, Any]:
    """A spec table's sampling keys (`name = value`, in the order given), checked: how a
    program that writes a spec (an evaluation, a probe) names them."""
    check_sampling(values)
    return dict(values)


def changed(phase: BaseModel, names: Iterable[str]) -> list[str]:
    """The settings in `names` whose value in `phase` differs from its declared default."""
    fields = type(phase).model_fields
    return [name for name in names if getattr(phase, name) != fields[name].default]


def changed_table(phase: BaseModel) -> dict[str, Any]:
    """A phase's sampling settings changed from their defaults, as a spec table's keys."""
    return {name: getattr(phase, name) for name in changed(phase, PHASED)}


# ---- a model's own defaults ------------------------------------------------------------


def from_generation_config(config: Mapping[str, Any]) -> Sampling:
    """The sampling a model's generation config asks for (Qwen: T 0.6, p 0.95, k 20), as
    HF generate reads it: `do_sample` false or absent is greedy, and a setting it leaves
    out (or sets to 0 or null) is off. Local think phases and remote runs read it here."""
    values = {name: config.get(name) or getattr(DEFAULT, name) for name in FROM_MODEL}
    if not config.get("do_sample"):
        values["temperature"] = 0.0
    check_sampling(values, lambda name: f"the model's generation config: {name}")
    return Sampling.model_validate(values)


def serving_defaults(config: Mapping[str, Any]) -> Sampling:
    """What `muestra serve` samples with when a request leaves a setting out, as OpenAI's
    API does: temperature 1 and no filter, unless the generation config samples (then its
    temperature and filters); its repetition penalty in any case (HF applies it to greedy
    decoding too)."""
    read = from_generation_config(config)
    sampled = bool(config.get("do_sample"))
    values = {
        name: getattr(read if sampled or not use(name).phases else DEFAULT, name)
        for name in FROM_MODEL
    }
    return Sampling.model_validate(values)


def generation_config(sampling: Sampling) -> dict[str, Any]:
    """The generation_config.json keys that make a model sample with `sampling` (a kit's)."""
    return {
        "do_sample": sampling.temperature > 0,
        **{
            name: getattr(sampling, name)
            for name in FROM_MODEL
            if getattr(sampling, name) != getattr(DEFAULT, name)
        },
    }


# ---- OpenAI-style requests -------------------------------------------------------------


def to_request(name: str, value: Any) -> Any:
    """A setting's value as an OpenAI-style request carries it (top_k off goes out as -1:
    vLLM, SGLang, llama.cpp and `muestra serve` all read -1 as off, and some refuse 0)."""
    off = use(name).request_off
    if off is not None and value == getattr(DEFAULT, name):
        return off
    if isinstance(value, tuple):
        return list(value)
    return value


def from_request(body: Any, defaults: Sampling) -> dict[str, Any]:
    """The engine's values of the settings in a request (`request_fields`): each unset one
    from `defaults`, the request's "off" (top_k -1) the engine's."""
    values = {}
    for name in NAMES:
        value = getattr(body, name)
        if value is None:
            value = getattr(defaults, name)
        elif value == use(name).request_off:
            value = getattr(DEFAULT, name)
        values[name] = tuple(value) if isinstance(value, list) else value
    return values


def given_in_request(body: Any, names: Iterable[str]) -> list[str]:
    """The settings of `names` a request sets (to a value other than its default)."""
    return [
        name
        for name in names
        if getattr(body, name) is not None
        and (use(name).model or getattr(body, name) != getattr(DEFAULT, name))
    ]


def _request_field(name: str, default: Any, optional: bool) -> tuple[Any, FieldInfo]:
    """`name` as a strict JSON field: JSON has one number type, so a strict float still takes
    1 but refuses `true` and "1"; a strict int refuses `true`, 1.5 and "1"."""
    info = Sampling.model_fields[name]
    how = use(name)
    kind = info.annotation
    if name == "dola_layers":  # JSON has lists, not tuples; a request holds at most 64
        index = Annotated[int, Strict(), Field(ge=0, le=4096)]
        layers = Annotated[list[index], Field(min_length=1, max_length=64)]
        return Literal["low", "high"] | layers | None, Field(default)
    annotation = Annotated[kind, Strict()]
    bounds = {key: getattr(m, key) for m in info.metadata for key in BOUNDS if hasattr(m, key)}
    if how.request_off is not None and optional:
        bounds["ge"] = min(bounds.get("ge", how.request_off), how.request_off)
    if how.request_max is not None:
        bounds.pop("lt", None)
        bounds["le"] = min(bounds.get("le", how.request_max), how.request_max)
    return (annotation | None if optional else annotation), Field(default, **bounds)


def request_fields() -> dict[str, tuple[Any, FieldInfo]]:
    """The sampling fields of a chat or text completion request (`muestra serve`), as
    `create_model` takes them: unset (null) means the model's default for a setting its
    generation config gives, else the setting's own default."""
    fields = {}
    for name in NAMES:
        optional = use(name).model or name == "dola_layers"
        fields[name] = _request_field(name, None if optional else getattr(DEFAULT, name), optional)
    return fields


def answer_fields() -> dict[str, tuple[Any, FieldInfo]]:
    """The answer phase's sampling in a request's `muestra.answer` (default greedy)."""
    return {name: _request_field(name, getattr(ANSWER_DEFAULT, name), False) for name in REMOTE}


def phase_request(phase: BaseModel) -> dict[str, Any]:
    """A phase's sampling as a request's `muestra.answer` carries it (no "off" values)."""
    return {name: getattr(phase, name) for name in REMOTE}


# ---- documentation ---------------------------------------------------------------------


def markdown_table() -> str:
    """Every sampling setting: flags, spec keys, server field, bound, defaults and what it
    applies to, as a markdown table (the docs site's reference page: docs/_ext)."""
    lines = [
        "| setting | command line | spec | `muestra serve` | bound | default | applies to |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in NAMES:
        how = use(name)
        flags = [flag(name)] + ([flag(name, "think_"), flag(name, "answer_")] if how.phases else [])
        spec = "`[think]`, `[answer]`" if how.phases else "—"
        default = _shown(getattr(DEFAULT, name))
        if how.phases:
            default += f"; answer {_shown(getattr(ANSWER_DEFAULT, name))}"
            default += "; think: the model's" if how.model else ""
        notes = [f"≤ {how.request_max:g}"] if how.request_max not in (None, INT_CAP) else []
        notes += [f"{how.request_off} = off"] if how.request_off is not None else []
        field = f"`{name}`" + (f" ({'; '.join(notes)})" if notes else "")
        field += "; `muestra.answer` too" if how.phases and how.remote else ""
        strategies = ", ".join(sorted(how.strategies))
        lines.append(
            f"| `{name}` | {', '.join(f'`{f}`' for f in flags)} | {spec} | {field} | "
            f"{rule(name)} | {default} | {strategies}"
            f"{'; generation config' if how.model else ''} |"
        )
    return "\n".join(lines)


def phase_table() -> str:
    """The phases' own settings (beside their sampling): each `[think]` and `[answer]` key
    with its default, bound and help, as a markdown table."""
    lines = ["| table | key | default | bound | what it does |", "|---|---|---|---|---|"]
    for table, model in (("think", ThinkSettings), ("answer", AnswerSettings)):
        for name, info in model.model_fields.items():
            if name in PHASED:
                continue
            bounds = [
                f"{k} {getattr(m, k):g}" for m in info.metadata for k in BOUNDS if hasattr(m, k)
            ]
            default = info.default if info.default_factory is None else info.default_factory()
            lines.append(
                f"| `[{table}]` | `{name}` | `{default!r}` | {', '.join(bounds) or '—'} | "
                f"{(info.description or '').replace('|', '/')} |"
            )
    return "\n".join(lines)


def _shown(value: Any) -> str:
    if value is None:
        return "off"
    return f"{value:g}" if isinstance(value, float) else str(value)
