"""Experiment specs: a TOML file, validated before any model loads.

Shape (see examples/personajes.toml):

    name = "personajes"
    seed = 1234
    samples = 50                       # per prompt, condition and model
    [model]                            # or [[models]] to compare several in one run
    id = "Qwen/Qwen3-4B-Thinking-2507"
    [prompt]
    system = "..."
    user = "Genera un personaje para la siguiente descripción:\\n<{descripcion}>"
    [[prompt.items]]
    id = "neutral_1"
    descripcion = "..."                # any other key is a template variable
    group = "lider"                    # optional: counterfactual pairs share a group…
    variant = "mujer"                  # …and differ in variant
    think_budget = 750                 # optional: this item's think budget
    [think]
    budget = 750
    temperature = 1.3
    # strategy = "beam", num_beams = 4: the samples are the best reasonings, ranked
    # dola_layers = "high": DoLa while reasoning
    [answer]
    temperature = 0
    max_tokens = 200
    schema = "personaje.schema.json"   # relative to the spec, or an inline table
    # strategy = "beam": the most likely complete answers under the schema
    # prompt_lookup = 8 / draft_model = "layers:24": free-text answers only (no schema)
    [sweep]                            # optional: every combination is a condition
    "think.temperature" = [0.6, 1.3]

Every error names the file, the key path and the value, and suggests the closest key
when a key is unknown. Everything a run would otherwise refuse only after its model loaded
is refused here: each condition's answer grammar is compiled without a model, and every
rendered prompt is held to `prompt.max_chars`.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import re
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from muestra.errors import InputError
from muestra.experiments.toml_text import dump_toml
from muestra.limits import MAX_THREADS
from muestra.settings import (
    LOOKUP,
    PHASED,
    REMOTE,
    SPECULATIVE,
    AnswerSettings,
    ThinkSettings,
    changed,
    use,
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(Strict):
    id: str = Field(description="Hub id or local folder; with `endpoint`, the served name.")
    label: str | None = Field(None, description="Name used in results (default: the id).")
    dtype: str = Field("auto", description="auto | bfloat16 | float16 | float32")
    device: str = Field("auto", description="auto | cpu | cuda")
    trust_remote_code: bool = Field(
        False,
        description="Run the Python code a model ships (its auto_map); only for a source "
        "you trust. `muestra run --trust-remote-code` sets it for every local model.",
    )
    runtime: Literal["auto", "torch", "llamacpp"] = Field(
        "auto",
        description="What computes the logits: llamacpp runs a GGUF with llama.cpp's CPU "
        "kernels, torch a transformers model; auto: llamacpp for a GGUF alone (when "
        "llama-cpp-python is installed), else torch.",
    )
    threads: int | None = Field(
        None,
        ge=1,
        le=MAX_THREADS,
        description="CPU threads (default: the cores, or OMP_NUM_THREADS).",
    )
    batch_invariant: bool = Field(
        True,
        description="llamacpp: decode so that a sample's logits never depend on the rows "
        "beside it (README, 'llama.cpp runtime'); false: llama.cpp's own batching, faster "
        "for a single row.",
    )
    kv_cache: Literal["f16", "q8_0"] | None = Field(
        None,
        description="llamacpp: the KV cache's type. f16 (default, llama.cpp's) or q8_0, "
        "which takes 34 bytes per 32 values instead of 64 (0.53x the memory: twice the "
        "rows in the same --max-memory) and changes the logits slightly; a sample stays "
        "the same alone or in a batch (exact batching only).",
    )
    thread_wait: Literal["sleep", "spin"] | None = Field(
        None,
        description="How idle compute threads wait, for the whole run: sleep (give the core "
        "back at once; what a machine shared with other work needs) | spin (OpenMP's "
        "default: a little faster on idle cores). Default: OMP_WAIT_POLICY, else sleep.",
    )
    endpoint: str | list[str] | None = Field(
        None,
        description="OpenAI-compatible base URL(s), e.g. http://host:8000/v1 (muestra serve, "
        "vLLM, SGLang); several serving the same model share the run, each request going to "
        "the healthy one with the most free slots, and each row records its endpoint.",
    )
    api_key_env: str | None = Field(None, description="Environment variable with the API key.")
    concurrency: int = Field(
        16, ge=1, le=4096, description="Requests in flight at once, per endpoint."
    )
    retries: int = Field(
        6,
        ge=0,
        le=100,
        description="Retries of one request after a 408/409/429, a 5xx, a timeout, a lost "
        "connection or a 200 the runner cannot read (each on another healthy endpoint when "
        "there is one).",
    )
    timeout: float = Field(600.0, gt=0, description="Seconds to wait for one response.")
    generation_config: str | None = Field(
        None,
        description="With `endpoint`: a generation_config.json, a model folder or a Hub id in "
        "the local Hugging Face cache whose sampling fills the think fields the spec leaves "
        "unset (default: `id`, when it is a folder or a cached Hub id).",
    )
    sampling_fallback: Literal["neutral", "server"] | None = Field(
        None,
        description="With `endpoint`: a think sampling field set neither by the spec nor by "
        'the generation config is sent as the neutral value ("neutral": temperature 1, '
        'filters off) or left to the server\'s default ("server", recorded in the store); '
        "unset, the run stops before its first request and names the fields.",
    )

    @property
    def endpoints(self) -> list[str]:
        given = [self.endpoint] if isinstance(self.endpoint, str) else list(self.endpoint or [])
        return [e.rstrip("/") for e in given]

    @model_validator(mode="after")
    def _endpoint_urls(self) -> ModelSpec:
        if self.endpoint is None and self.id.startswith("~"):
            # one name for one folder: "~/kit" from a spec or a notebook, /home/me/kit from a
            # shell, are the same model in the store
            self.id = str(Path(self.id).expanduser())
        for url in self.endpoints:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"endpoint {url!r} must start with http:// or https://")
        if isinstance(self.endpoint, list) and not self.endpoint:
            raise ValueError("endpoint is an empty list")
        local_only = [
            k
            for k, default in (
                ("dtype", "auto"),
                ("device", "auto"),
                ("trust_remote_code", False),
                ("runtime", "auto"),
                ("threads", None),
                ("batch_invariant", True),
                ("thread_wait", None),
                ("kv_cache", None),
            )
            if getattr(self, k) != default
        ]
        if self.endpoint is not None and local_only:
            raise ValueError(
                f"{' and '.join(local_only)} apply to local models; the endpoint decides how it "
                "computes: remove them or remove `endpoint`"
            )
        remote_only = [k for k in ("generation_config", "sampling_fallback") if getattr(self, k)]
        if self.endpoint is None and remote_only:
            raise ValueError(
                f"{' and '.join(remote_only)} apply to endpoint models only; a local model "
                "reads its own generation config: remove them or add `endpoint`"
            )
        return self

    @property
    def name(self) -> str:
        return self.label or self.id


class PromptItem(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str = Field(
        min_length=1,
        description="The item's id, unique in the spec: names its prompt in the results. "
        "Every key other than those below is a template variable.",
    )
    group: str | None = Field(
        None,
        description="Counterfactual group: the items of one group differ in `variant` and "
        "are compared; sample i of each variant draws from the same random stream.",
    )
    variant: str | None = Field(
        None, description="This item's variant within its `group` (e.g. vecino / vecina)."
    )
    think_budget: int | None = Field(
        None, ge=0, description="This item's think budget, in place of [think] budget."
    )
    choice: list[str] | None = Field(
        None,
        min_length=1,
        description="This item's answer choices (e.g. a question's option letters); they "
        "replace [answer] choice for it. Not with a schema, regex or grammar answer.",
    )

    @property
    def variables(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _distinct_choices(self) -> PromptItem:
        if self.choice is not None and len(set(self.choice)) != len(self.choice):
            raise ValueError(f"choice of item {self.id!r} repeats a value: {self.choice}")
        return self


class PromptSpec(Strict):
    system: str | None = Field(
        None, description="System message; {name} is filled from each item as in `user`."
    )
    user: str = Field(description="User message; {name} is filled from each item.")
    raw: bool = Field(False, description="Send `user` as plain text, without a chat template.")
    enable_thinking: bool | None = Field(
        None,
        description="The chat template's enable_thinking switch (hybrid models such as "
        "Qwen3; false closes an empty think block); unset: the template's default. Sent to "
        "an endpoint as chat_template_kwargs.",
    )
    max_chars: int = Field(
        1_000_000,
        ge=1,
        description="Longest rendered prompt (system + user, in characters) an item may give.",
    )
    items: list[PromptItem] = Field(
        min_length=1, description="The prompts: one per item, each filling the templates."
    )

    @model_validator(mode="after")
    def _unique_ids(self) -> PromptSpec:
        ids = [item.id for item in self.items]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(f"prompt item ids must be unique; repeated: {repeated}")
        return self


class ThinkSpec(ThinkSettings):
    """A spec's [think] table: `ThinkSettings` (muestra/settings.py), checked as a spec."""

    @model_validator(mode="after")
    def _beam(self, info: ValidationInfo) -> ThinkSpec:
        return _check_beam(self, "think", info)


# the ways an answer can be constrained, by their TOML keys (a spec gives one at most)
ANSWER_KINDS = ("schema", "regex", "choice", "grammar")


class AnswerSpec(AnswerSettings):
    """A spec's [answer] table: `AnswerSettings` (muestra/settings.py) and the grammar the
    answer follows, checked as a spec."""

    schema_: str | dict[str, Any] | None = Field(
        None,
        alias="schema",
        description="The JSON Schema the answer follows: a file (relative to the spec) or "
        "an inline table. An endpoint receives it as a strict response_format.",
    )
    regex: str | None = Field(
        None, description="The answer matches this regular expression (local models only)."
    )
    choice: list[str] | None = Field(
        None,
        description="The answer is one of these strings, stored as the field `answer` "
        "(local models only).",
    )
    grammar: str | None = Field(
        None,
        description="An EBNF grammar file (relative to the spec) the answer follows (local "
        "models only).",
    )
    field_probs: bool = Field(
        True,
        description="Store the exact probability the model gave every allowed value of each "
        "enum/boolean/choice field of the answer (local models only: an endpoint returns "
        "no logits).",
    )

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    @property
    def kinds(self) -> list[str]:
        """The answer grammars given, of `ANSWER_KINDS` (one at most: `_check_grammars`)."""
        return [
            k for k in ANSWER_KINDS if getattr(self, "schema_" if k == "schema" else k) is not None
        ]

    @model_validator(mode="after")
    def _beam(self, info: ValidationInfo) -> AnswerSpec:
        return _check_beam(self, "answer", info)

    @model_validator(mode="after")
    def _stop(self) -> AnswerSpec:
        if not self.stop:
            return self
        if any(not s for s in self.stop):
            raise ValueError("answer.stop strings must not be empty")
        clash = self.kinds
        clash += [k for k in ("prompt_lookup", "draft_model") if getattr(self, k) is not None]
        clash += ['strategy = "beam"'] if self.strategy == "beam" else []
        if clash:
            shown = ", ".join(clash)
            raise ValueError(
                f"answer.stop ends a sampled free-text answer; it cannot take {shown}: "
                "remove one of them"
            )
        return self

    @model_validator(mode="after")
    def _drafted(self) -> AnswerSpec:
        """Prompt lookup and speculative decoding take no step hooks: free text only."""
        lookup = self.prompt_lookup is not None
        name = "prompt_lookup" if lookup else "draft_model"
        if self.prompt_lookup is None and self.draft_model is None:
            default = type(self).model_fields["num_speculative_tokens"].default
            if self.num_speculative_tokens != default:  # (a sweep's copy sets every field)
                raise ValueError("num_speculative_tokens applies with answer.draft_model only")
            return self
        clash = self.kinds
        clash += ["draft_model"] if lookup and self.draft_model else []
        clash += ['strategy = "beam"'] if self.strategy == "beam" else []
        strategy = LOOKUP if lookup else SPECULATIVE
        # prompt lookup is greedy: every sampling setting stays at the answer's default
        clash += [
            key for key in changed(self, PHASED) if lookup or strategy not in use(key).strategies
        ]
        if clash:
            shown = ", ".join(clash)
            raise ValueError(
                f"answer.{name} decodes a free-text answer"
                + (" greedily" if self.prompt_lookup is not None else "")
                + f" without step hooks; it cannot take {shown}: remove them"
            )
        return self


def _check_beam(section: Any, name: str, info: ValidationInfo) -> Any:
    """Beam search scores the model's own log-probabilities: sampling settings and DoLa
    do not apply to it, and beam settings given without `strategy = "beam"` are a
    mistake (except in a sweep's conditions, where the strategy itself may be swept)."""
    if section.strategy == "beam":
        given = changed(section, PHASED)
        if given:
            raise ValueError(
                f'{name}.strategy = "beam" scores the model\'s own log-probabilities; '
                f"{', '.join(given)} do not apply to it: remove them"
            )
    elif not (info.context or {}).get("sweep") and f"{name}.strategy" not in (
        (info.context or {}).get("swept") or ()
    ):
        given = [
            key
            for key in ("num_beams", "length_penalty", "early_stopping")
            if key in section.model_fields_set
        ]
        if given:
            raise ValueError(
                f"{', '.join(given)} apply to beam search only: set {name}.strategy = "
                '"beam", or remove them'
            )
    return section


class AnalysisSpec(Strict):
    alpha: float = Field(0.05, gt=0, lt=1, description="Significance level after adjustment.")
    reference: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="Reference distribution per field, e.g. sexo = {masculino = 0.5, ...}.",
    )
    terms: dict[str, str] | None = Field(
        None, description="Regexes counted in reasoning traces (default: gender terms)."
    )
    language: Literal["en", "es"] = Field(
        "en", description="Language of findings, notes and figure labels: en or es."
    )


class SequentialRule(Strict):
    """What settles a sequential run's cells, shared by an experiment's `[stop]`
    (`StopSpec`) and a probe's (`ProbeStop`): see `muestra.experiments.stopping`."""

    precision: float | None = Field(
        None,
        gt=0,
        le=0.5,
        description="Stop a cell once its band is within ± this (a share: 0.05 is ±5 points).",
    )
    reference: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="Stop a cell once its band excludes this share (with `compare`: this "
        "difference, e.g. 0).",
    )
    compare: list[str] | None = Field(None, min_length=2, max_length=2)  # described below
    min_samples: int = Field(
        10, ge=1, le=1_000_000, description="Samples a cell takes before its first look."
    )
    max_samples: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Samples a cell takes at most (default: the spec's or probe's `samples`).",
    )
    every: int = Field(
        10, ge=1, le=1_000_000, description="Samples each open cell takes per round (a look)."
    )
    alpha: float = Field(
        0.05, gt=0, lt=1, description="1 − coverage of the bands, valid at every look at once."
    )

    @model_validator(mode="after")
    def _something_to_settle(self) -> Self:
        if self.precision is None and self.reference is None:
            raise ValueError("give precision, reference or both: what settles a cell")
        if self.max_samples is not None and self.min_samples > self.max_samples:
            raise ValueError(
                f"min_samples = {self.min_samples} is over max_samples = {self.max_samples}"
            )
        if self.compare is not None and self.compare[0] == self.compare[1]:
            raise ValueError(f"compare names {self.compare[0]!r} twice; give two cells")
        return self


class StopSpec(SequentialRule):
    """A sequential run (`[stop]`): each cell samples in rounds until the band of its
    tracked share (or of a difference of two cells) is settled; see
    `muestra.experiments.stopping`."""

    field: str = Field(
        min_length=1,
        description="The answer field tracked: an enum/boolean field of the schema (dotted "
        'when nested), or "answer" for a choice (or other unstructured) answer.',
    )
    value: str = Field(
        min_length=1, description="The value whose share is tracked (booleans: true / false)."
    )
    compare: list[str] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="Two prompt ids, two condition labels, or two variants (compared within "
        "each group of items): track the difference of their shares (first minus second), "
        "the two cells sampled in pairs of the same index; other cells track their own share.",
    )
    estimator: Literal["auto", "counts", "field_probs"] = Field(
        "auto",
        description="counts: the share of drawn answers; field_probs: the mean exact "
        "probability of the value (Rao–Blackwell: valid only when the answer is drawn at "
        "temperature 1 without filters); auto: field_probs where valid, else counts.",
    )


class RunSpec(Strict):
    """How a run uses the machine it runs on (local models only)."""

    max_memory: int | str | None = Field(
        None,
        description='The memory budget of a local model\'s run: "8GiB", "12GB", "500MiB" or '
        "bytes. Rows beyond what fits wait for the next batch; a run that cannot fit one row "
        "is refused before the model loads (default: 80% of the memory available). "
        "`--max-memory` overrides it.",
    )

    @field_validator("max_memory", mode="before")
    @classmethod
    def _a_size(cls, value: Any) -> Any:
        from muestra.models.memory import parse_memory

        if value is not None:
            try:
                parse_memory(value, "max_memory")
            except InputError as err:
                raise ValueError(str(err).removeprefix("max_memory: ")) from None
        return value


class Spec(Strict):
    name: str = Field(min_length=1, description="The experiment's name, shown with its runs.")
    seed: int = Field(
        0,
        description="The run's seed: sample i of a prompt is drawn with a seed derived from "
        "(seed, prompt, i), so a resumed run stores the same rows.",
    )
    samples: int = Field(
        ge=1,
        description="Samples per prompt, condition and model (with [stop]: the most a cell "
        "takes, unless [stop] max_samples says otherwise).",
    )
    model: ModelSpec | None = Field(None, description="The model (or give [[models]]).")
    models: list[ModelSpec] | None = Field(
        None, description="Several models, each run on every prompt and condition."
    )
    prompt: PromptSpec
    think: ThinkSpec | None = None
    answer: AnswerSpec = Field(default_factory=AnswerSpec)
    sweep: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="Conditions: a think.* or answer.* setting and its values, e.g. "
        '"think.temperature" = [0.6, 1.3]; every combination of the lists is a condition.',
    )
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec)
    stop: StopSpec | None = Field(
        None, description="Sample each cell until its answer is settled (a sequential run)."
    )
    run: RunSpec = Field(default_factory=RunSpec)

    @model_validator(mode="after")
    def _one_model_table(self) -> Spec:
        if (self.model is None) == (self.models is None):
            raise ValueError("give exactly one of [model] or [[models]]")
        return self

    @property
    def model_list(self) -> list[ModelSpec]:
        return [self.model] if self.model is not None else list(self.models or [])


@dataclass(frozen=True)
class Condition:
    label: str  # "default" or e.g. "think.temperature=0.6"
    overrides: dict[str, Any]
    think: ThinkSpec | None
    answer: AnswerSpec


@dataclass(frozen=True)
class LoadedSpec:
    path: Path
    text: str
    spec: Spec
    conditions: list[Condition]
    answer_schema: dict[str, Any] | None  # the resolved JSON Schema, when one is given

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def _where(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) if not isinstance(part, int) else f"[{part}]" for part in loc)


def describe_error(
    err: ValidationError, path: Path, data: dict[str, Any], root: type[BaseModel] | None = None
) -> str:
    """One line for the first error of `data` validated as `root` (default: `Spec`)."""
    errors = err.errors()
    first = errors[0]
    loc = tuple(p for p in first["loc"] if p not in ("function-after",))
    where = _where(loc) or "(top level)"
    if first["type"] == "missing":  # a required key misspelled is an unknown key beside it
        unknown = [tuple(e["loc"]) for e in errors if e["type"] == "extra_forbidden"]
        near = {str(u[-1]): u for u in unknown if u[:-1] == loc[:-1]}
        hint = difflib.get_close_matches(str(loc[-1]), list(near), n=1)
        if hint:
            return (
                f"{path}: unknown key {_where(near[hint[0]])}; did you mean {str(loc[-1])!r}? "
                f"({where} is required)"
            )
    if first["type"] == "extra_forbidden":
        parent: Any = data
        for part in loc[:-1]:
            parent = parent[part] if isinstance(parent, dict | list) else {}
        allowed = _allowed_keys(root or Spec, loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else f"; allowed: {', '.join(allowed)}"
        return f"{path}: unknown key {where}{suggestion}"
    value = first.get("input")
    shown = f" (got {_short(value)})" if not isinstance(value, dict) else ""
    return f"{path}: {where}: {first['msg']}{shown}"


def _short(value: Any, limit: int = 200) -> str:
    """`repr(value)`, cut so that a huge value cannot flood the error message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


def _allowed_keys(root: type[BaseModel], parent: tuple[Any, ...]) -> list[str]:
    """The keys of the table at `parent` (a pydantic error location) under `root`."""
    model = root
    for part in parent:
        if isinstance(part, int):
            continue
        fields = model.model_fields
        found = fields.get(str(part)) or next((f for f in fields.values() if f.alias == part), None)
        inner = _model_in(found.annotation) if found is not None else None
        if inner is None:
            break
        model = inner
    return sorted(f.alias or name for name, f in model.model_fields.items())


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (`X`, `X | None`, `list[X]`…), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def template_fields(template: str) -> set[str]:
    """Names of `{name}` placeholders; any other brace (e.g. JSON in a prompt) is literal."""
    return set(PLACEHOLDER.findall(template))


def fill(template: str, variables: dict[str, Any]) -> str:
    return PLACEHOLDER.sub(lambda m: str(variables.get(m.group(1), m.group(0))), template)


def _check_templates(spec: Spec, path: Path) -> None:
    needed = template_fields(spec.prompt.user) | template_fields(spec.prompt.system or "")
    for index, item in enumerate(spec.prompt.items):
        missing = sorted(needed - set(item.variables))
        if missing:
            raise InputError(
                f"{path}: prompt.items[{index}] (id {item.id!r}) has no value for template "
                f"variable(s) {', '.join(missing)}; add them to the item"
            )


def _check_prompt_sizes(spec: Spec, path: Path) -> None:
    limit = spec.prompt.max_chars
    for index, item in enumerate(spec.prompt.items):
        variables = item.variables
        size = len(fill(spec.prompt.user, variables)) + len(
            fill(spec.prompt.system or "", variables)
        )
        if size > limit:
            raise InputError(
                f"{path}: prompt.items[{index}] (id {item.id!r}) renders to {size:,} characters, "
                f"over prompt.max_chars = {limit:,}; shorten the item, or raise prompt.max_chars "
                "if the model's context really holds it"
            )


SWEEP = {"sweep": True}


def _conditions(spec: Spec, path: Path) -> list[Condition]:
    if not spec.sweep:
        return [Condition("default", {}, spec.think, spec.answer)]
    keys = list(spec.sweep)
    for key in keys:
        section, _, field = key.partition(".")
        target = {"think": ThinkSpec, "answer": AnswerSpec}.get(section)
        if target is None or field not in target.model_fields or field in ("schema_",):
            raise InputError(
                f"{path}: sweep key {key!r} must name a think.* or answer.* setting "
                '(e.g. "think.temperature")'
            )
        if section == "think" and spec.think is None:
            raise InputError(f"{path}: sweep key {key!r} needs a [think] table")
        if not spec.sweep[key]:
            raise InputError(f"{path}: sweep.{key} is an empty list; give at least one value")
    conditions = []
    for values in itertools.product(*(spec.sweep[k] for k in keys)):
        overrides = dict(zip(keys, values, strict=True))
        think = spec.think.model_dump(by_alias=True) if spec.think else None
        answer = spec.answer.model_dump(by_alias=True)
        for key, value in overrides.items():
            section, _, field = key.partition(".")
            (think if section == "think" else answer)[field] = value
        for name, values in (("think", think), ("answer", answer)):
            if values is not None and overrides.get(f"{name}.strategy") == "beam":
                _drop_sampling(values, name, overrides)
        try:
            condition = Condition(
                ",".join(f"{k}={v}" for k, v in overrides.items()),
                overrides,
                ThinkSpec.model_validate(think, context=SWEEP) if think is not None else None,
                AnswerSpec.model_validate(answer, context=SWEEP),
            )
        except ValidationError as err:
            first = err.errors()[0]
            raise InputError(
                f"{path}: sweep value {first.get('input')!r} for {keys}: {first['msg']}"
            ) from err
        conditions.append(condition)
    return conditions


def _drop_sampling(values: dict[str, Any], name: str, overrides: dict[str, Any]) -> None:
    """A swept beam condition: the section's sampling settings belong to its sampled
    conditions; this one searches, so they go back to their defaults (and the store
    records what ran). A sampling setting swept alongside is kept, and refused."""
    model = ThinkSpec if name == "think" else AnswerSpec
    for key in PHASED:
        if f"{name}.{key}" not in overrides:
            values[key] = model.model_fields[key].default


def _resolve_schema(answer: AnswerSpec, path: Path) -> dict[str, Any] | None:
    from muestra.answers.grammar import GrammarSpec

    if answer.grammar is not None and not (path.parent / answer.grammar).is_file():
        raise InputError(
            f"{path}: answer.grammar file {path.parent / answer.grammar} does not exist"
        )
    schema = answer.schema_
    if schema is None:
        return None
    if isinstance(schema, str):
        schema = (path.parent / schema).resolve()
    try:  # reads the file when given one, and refuses what xgrammar cannot enforce
        return GrammarSpec.json_schema(schema, source="the inline schema").schema
    except InputError as err:
        raise InputError(f"{path}: answer.schema: {err}") from err


def _check_grammars(conditions: list[Condition], schema: dict[str, Any] | None, path: Path) -> None:
    """Build each condition's answer grammar as the runner will, and compile it without a
    model, so a bad one stops the run before the model loads and the store is created."""
    from muestra.answers.grammar import GrammarSpec

    checked: set[str] = set()
    for condition in conditions:
        answer = condition.answer
        where = f"{path}: answer" + ("" if not condition.overrides else f" ({condition.label})")
        given = answer.kinds  # (the schema is not swept: every condition has the spec's)
        if len(given) > 1:
            raise InputError(
                f"{where} takes one of {', '.join(ANSWER_KINDS)}; got {', '.join(given)}"
            )
        if answer.choice is not None:
            grammar = GrammarSpec.choice(answer.choice, source=f"{where}.choice")
        elif answer.regex is not None:
            grammar = GrammarSpec.regex(answer.regex, source=f"{where}.regex")
        elif answer.grammar is not None:
            grammar = GrammarSpec.ebnf(path.parent / answer.grammar)
        elif schema is not None:
            grammar = GrammarSpec.json_schema(schema)
        else:
            continue
        if grammar.key not in checked:
            checked.add(grammar.key)
            grammar.check_compiles(f"{where}.{given[0]} {_short(_shown_grammar(answer, given[0]))}")


def _check_item_choices(spec: Spec, conditions: list[Condition], schema: Any, path: Path) -> None:
    """An item's own `choice` replaces the answer's choice; it cannot replace a schema,
    regex or grammar (the answers would no longer be one kind)."""
    items = [item for item in spec.prompt.items if item.choice is not None]
    if not items:
        return
    for condition in conditions:
        other = [k for k in ("regex", "grammar") if getattr(condition.answer, k) is not None]
        other += ["schema"] if schema is not None else []
        if other:
            raise InputError(
                f"{path}: prompt item {items[0].id!r} sets its own choice, but the answer is "
                f"a {other[0]}; item choices replace answer.choice only: remove one of them"
            )


def _shown_grammar(answer: AnswerSpec, key: str) -> Any:
    return answer.schema_ if key == "schema" else getattr(answer, key)


def _parse_toml(path: Path) -> tuple[str, dict[str, Any]]:
    from muestra.answers.grammar import MAX_NESTING, check_nesting, read_text_file

    text = read_text_file(path, "spec file")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"{path}: TOML syntax error: {err}") from err
    except RecursionError as err:
        raise InputError(
            f"{path}: tables or arrays nested too deeply to read; keep them under "
            f"{MAX_NESTING} levels"
        ) from err
    check_nesting(data, str(path))
    return text, data


def load_spec(path: Path | str, check_models: bool = True) -> LoadedSpec:
    path = Path(path)
    text, data = _parse_toml(path)
    return _loaded(path, text, data, check_models)


def spec_from_data(data: dict[str, Any], path: Path, check_models: bool = True) -> LoadedSpec:
    """A spec built by a program (e.g. `muestra eval`), checked as a file is; its text, the
    TOML that `dump_toml` writes, is what the store keeps and hashes. `path` is where
    relative file names resolve and what the store records as the spec's source."""
    text = dump_toml(data)
    return _loaded(path, text, tomllib.loads(text), check_models)


def _loaded(path: Path, text: str, data: dict[str, Any], check_models: bool) -> LoadedSpec:
    sweep = data.get("sweep")
    swept = set(sweep) if isinstance(sweep, dict) else set()
    try:
        spec = Spec.model_validate(data, context={"swept": swept})
    except ValidationError as err:
        raise InputError(describe_error(err, path, data)) from err
    _check_templates(spec, path)
    _check_prompt_sizes(spec, path)
    conditions = _conditions(spec, path)
    schema = _resolve_schema(spec.answer, path)
    _check_grammars(conditions, schema, path)
    for condition in conditions:
        if condition.think is not None and condition.answer.stop:
            raise InputError(
                f"{path}: answer.stop ends a free-text answer without a think phase "
                f"(condition {condition.label!r} has [think]); remove one of them"
            )
    _check_item_choices(spec, conditions, schema, path)
    check_beam_samples(conditions, spec.samples, str(path))
    if spec.stop is not None:
        from muestra.experiments.stop_rules import check_stop

        check_stop(spec.stop, spec, conditions, schema, str(path))
    for model in spec.model_list:
        if check_models:  # not when the caller replaces the spec's model (`--model`)
            _check_model_ref(model, path)
        if model.endpoint is not None:
            _check_remote(spec, path)
    return LoadedSpec(path, text, spec, conditions, schema)


def beam_phase(condition: Condition) -> tuple[str, int] | None:
    """(phase, num_beams) when a condition's samples are ranked beams: the reasoning is
    beam-searched, or the answer is and there is no think phase to sample."""
    if condition.think is not None and condition.think.strategy == "beam":
        return "think", condition.think.num_beams
    if condition.think is None and condition.answer.strategy == "beam":
        return "answer", condition.answer.num_beams
    return None


def check_beam_samples(conditions: list[Condition], samples: int, where: str) -> None:
    """A beam search returns at most num_beams sequences: refuse asking for more."""
    for condition in conditions:
        found = beam_phase(condition)
        if found is not None and samples > found[1]:
            phase, beams = found
            label = "" if not condition.overrides else f" (condition {condition.label})"
            raise InputError(
                f"{where}: samples = {samples} but {phase}.num_beams = {beams}{label}: the "
                f'samples of a {phase}.strategy = "beam" condition are its best {phase} '
                f"sequences, ranked, and a beam search returns at most num_beams; set "
                f"samples <= {beams} or raise {phase}.num_beams"
            )


def _check_remote(spec: Spec, path: Path) -> None:
    """What an OpenAI-compatible endpoint cannot do, refused before any request."""
    for condition in _conditions(spec, path):
        for name, section in (("think", condition.think), ("answer", condition.answer)):
            if section is None:
                continue
            drafted = name == "answer" and (
                condition.answer.prompt_lookup is not None or condition.answer.draft_model
            )
            if drafted:
                raise InputError(
                    f"{path}: answer.prompt_lookup and answer.draft_model need a local model"
                )
            local = changed(section, [key for key in PHASED if key not in REMOTE])
            if section.strategy == "beam" or local:
                what = 'strategy = "beam"' if section.strategy == "beam" else local[0]
                raise InputError(
                    f"{path}: {name}.{what} needs a local model; an endpoint samples with "
                    "the OpenAI API's settings only"
                )
    if spec.prompt.raw:
        raise InputError(
            f"{path}: prompt.raw needs a local model; a remote endpoint takes chat messages"
        )
    if any(item.choice is not None for item in spec.prompt.items):
        raise InputError(
            f"{path}: a prompt item's choice needs a local model; a remote endpoint enforces "
            "only a JSON Schema (answer.schema, sent as response_format)"
        )
    for key in ("regex", "choice", "grammar"):
        if getattr(spec.answer, key) is not None or any(k == f"answer.{key}" for k in spec.sweep):
            raise InputError(
                f"{path}: answer.{key} needs a local model; a remote endpoint enforces only a "
                "JSON Schema (answer.schema, sent as response_format)"
            )


def _check_model_ref(model: ModelSpec, path: Path) -> None:
    if model.endpoint is not None:
        return
    ref = Path(model.id).expanduser()
    if model.id.startswith((".", "/", "~")) and not ref.exists():
        from muestra.models.kit.presets import PRESETS

        preset = ref.name if ref.name in PRESETS else "tiny"
        raise InputError(
            f"{path}: model.id {model.id!r} is not a folder; build one with "
            f"`muestra kit build --preset {preset} --out {model.id}`, pass --model, "
            "or fix the path"
        )
