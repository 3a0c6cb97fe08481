"""Think sampling of a remote model, resolved before its first request.

A server fills each sampling field a request leaves out with its own default: vLLM with
the model's generation config, llama.cpp's llama-server with top-k 40, top-p 0.95,
min-p 0.05. The same spec would then sample a different distribution on each server,
silently. So before a remote run starts, each think setting a remote run sends
(`settings.REMOTE`: temperature, top-p, top-k, min-p) of each condition is resolved,
first match wins:

1. the spec: `[think]`, or the condition's sweep value;
2. the model's `generation_config.json`, when a copy is on this machine: `[model]
   generation_config`, else `id` as a folder or as a model in the Hugging Face cache
   (looked up in the cache only, never on the network); read as a local run reads it
   (`settings.from_generation_config`), so a filter it does not set is off;
3. `[model] sampling_fallback`: "neutral" (the engine's plain sampling: temperature 1,
   filters off) or "server" (left out of the request: the server's default applies).
   A setting every server leaves off (`Use.off_everywhere`: typical-p) is sent off
   without that opt-in: no server would sample it differently.

A field still unresolved stops the run with an `InputError` naming the fields, before
anything is stored or sent. So does a think `mode = "auto"` that no local tokenizer can
settle (`think_mode`): whether the model has think tags decides what is sent, and a guess
would be wrong silently for one kind of model or the other. The answer phase needs no
resolving: every `[answer]` field has an explicit default (greedy). The runner stores each
resolved value and where it came from with the condition.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from muestra.errors import InputError
from muestra.experiments.spec import LoadedSpec, ModelSpec
from muestra.settings import (
    DEFAULT,
    QWEN_THINKING,
    REMOTE,
    Sampling,
    from_generation_config,
    to_request,
    use,
)


@dataclass(frozen=True)
class Setting:
    value: float | int | None  # None: left to the server
    source: str  # spec | generation_config | neutral | server


@dataclass(frozen=True)
class RemoteThink:
    """The think sampling of one (remote model, condition): each of `settings.REMOTE`,
    with where its value came from (`think.top_p.value`, `think.top_p.source`)."""

    settings: dict[str, Setting]
    generation_config: Path | None  # the file read, if any
    fallback: str | None  # the model's sampling_fallback
    mode: str = "tags"  # "tags": the model's think block; "text": plain-text reasoning
    mode_source: str = "spec"  # spec | tokenizer ("auto", settled by the local tokenizer)

    def __getattr__(self, name: str) -> Setting:
        try:
            return self.__dict__["settings"][name]
        except KeyError:
            raise AttributeError(name) from None

    def request_fields(self) -> dict[str, Any]:
        """The fields to send (`settings.to_request`: top_k off goes out as -1)."""
        return {
            name: to_request(name, s.value)
            for name, s in self.settings.items()
            if s.value is not None
        }

    def record(self) -> dict[str, Any]:
        """What the store keeps: the values (null = the server's), their sources, the opt-in."""
        return {
            **{name: s.value for name, s in self.settings.items()},
            "source": {name: s.source for name, s in self.settings.items()},
            "generation_config": str(self.generation_config) if self.generation_config else None,
            "sampling_fallback": self.fallback,
            "mode": self.mode,
            "mode_source": self.mode_source,
        }


def resolve_think(spec: LoadedSpec, model: ModelSpec) -> dict[str, RemoteThink]:
    """The think sampling of each condition with a think phase, by condition label."""
    path = generation_config_file(model)
    config = _read(path, model) if path is not None else None
    resolved, missing, unsettled = {}, set(), []
    for condition in spec.conditions:
        if condition.think is None:
            continue
        settings = {}
        for name in REMOTE:
            given = getattr(condition.think, name)
            if given is not None:
                settings[name] = Setting(given, "spec")
            elif config is not None:
                settings[name] = Setting(getattr(config, name), "generation_config")
            elif model.sampling_fallback == "server":
                settings[name] = Setting(None, "server")
            elif model.sampling_fallback == "neutral" or use(name).off_everywhere:
                settings[name] = Setting(getattr(DEFAULT, name), "neutral")
        missing |= set(REMOTE) - set(settings)
        settled = think_mode(condition.think.mode, path)
        if settled is None:
            unsettled.append(condition.label)
        elif len(settings) == len(REMOTE):
            mode, source = settled
            resolved[condition.label] = RemoteThink(
                settings,
                generation_config=path,
                fallback=model.sampling_fallback,
                mode=mode,
                mode_source=source,
            )
    if missing:
        names = [name for name in REMOTE if name in missing]
        example = getattr(QWEN_THINKING, names[0])
        raise InputError(
            f"{spec.path}: model {model.name!r} (an endpoint) has no value for think "
            f"{', '.join(names)}: the spec does not set them and no generation_config.json "
            f"of {model.generation_config or model.id!r} is on this machine (not a folder, "
            "not in the Hugging Face cache); left out of the request, each server would "
            "pick its own (llama-server: top_k 40, top_p 0.95, min_p 0.05). Set them in "
            f"[think] (e.g. {names[0]} = {example!r}), point [model] "
            "generation_config at a local copy of the model, or opt in with [model] "
            'sampling_fallback = "neutral" (temperature 1, filters off) or "server" (the '
            "server's defaults, recorded in the store)"
        )
    if unsettled:
        raise _unsettled_mode(spec, model, unsettled, path)
    return resolved


def think_mode(mode: str, config: Path | None) -> tuple[str, str] | None:
    """(mode, where it came from) of a remote think phase: "tags" or "text" as the spec
    says; "auto" settled as a local run settles it — by the model's tokenizer, when one
    sits beside its generation_config.json on this machine. None: "auto" with no
    tokenizer here, which `resolve_think` refuses (a guess would send a think budget to a
    model without think tags, or plain-text reasoning to one with them)."""
    if mode != "auto":
        return mode, "spec"
    folder = config.parent if config is not None else None
    if folder is None or not any(
        (folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")
    ):
        return None
    from muestra.answers.phases import ThinkConfig
    from muestra.answers.structured import has_think_tags
    from muestra.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(folder))
    return ("tags" if has_think_tags(tokenizer, ThinkConfig()) else "text"), "tokenizer"


def _unsettled_mode(
    spec: LoadedSpec, model: ModelSpec, labels: list[str], config: Path | None
) -> InputError:
    where = f"beside {config}" if config is not None else f"for {model.id!r} on this machine"
    return InputError(
        f"{spec.path}: model {model.name!r} (an endpoint), condition(s) {', '.join(labels)}: "
        '[think] mode = "auto" needs the model\'s tokenizer to tell whether it has think tags, '
        f"and there is none {where} (no tokenizer.json or tokenizer_config.json). Point "
        "[model] generation_config at a folder holding the model's tokenizer and "
        'generation_config.json, or say it in [think]: mode = "tags" (the model has a think '
        'block, e.g. Qwen3) or mode = "text" (it has none: plain-text reasoning, through '
        "`muestra serve` only)"
    )


def generation_config_file(model: ModelSpec) -> Path | None:
    """The model's generation_config.json on this machine: a file, a folder or the HF cache."""
    ref = model.generation_config or model.id
    path = Path(ref).expanduser()
    if path.is_dir():
        path = path / "generation_config.json"
    if path.is_file():
        return path
    cached = _cached(ref)
    if cached is None and model.generation_config is not None:
        raise InputError(
            f"model {model.name!r}: generation_config {ref!r} is not a generation_config.json, "
            "a folder holding one, nor a model in the Hugging Face cache; fix the path, or "
            f"fetch the file with `hf download {ref} generation_config.json`"
        )
    return cached


def _cached(repo_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:  # the cache only: this never touches the network
        found = try_to_load_from_cache(repo_id, "generation_config.json")
    except ValueError:  # not a Hub id (e.g. a served name like "/models/qwen")
        return None
    return Path(found) if isinstance(found, str) else None


def _read(path: Path, model: ModelSpec) -> Sampling:
    try:
        config = json.loads(path.read_text("utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        return from_generation_config(config)
    except (OSError, ValueError, InputError) as err:
        raise InputError(
            f"model {model.name!r}: cannot read {path} ({err}); fix or remove the file, or set "
            "the sampling fields in [think]"
        ) from err
