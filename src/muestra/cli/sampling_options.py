"""A command's sampling flags, derived from the settings' declaration (muestra/settings.py).

`sampling_flags()` gives one typer option per setting — `--NAME`, and for a phase setting
`--think-NAME` (default: the model's generation config) and `--answer-NAME` (default: the
answer's, greedy) — with the setting's help and bound; `with_flags` adds them to a
command's signature. `sampling_values` reads them back from a command's parsed values:
each checked against its bound (refused by flag name, before anything loads) and, for
DoLa, parsed from its text ("low", "high" or "2,4,6").
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import typer

from muestra.errors import InputError
from muestra.settings import (
    ANSWER_DEFAULT,
    DEFAULT,
    NAMES,
    PHASED,
    Sampling,
    check_sampling,
    flag,
    rule,
    use,
)

F = TypeVar("F", bound=Callable[..., Any])
# a flag's parameter name is its setting's, after the phase's prefix
PREFIXES = {"": NAMES, "think_": PHASED, "answer_": PHASED}
PHASE_HELP = {"think_": "The reasoning's {what}{default}.", "answer_": "The answer's {what}."}


def parameter(name: str, prefix: str = "") -> str:
    """The command's parameter name of setting `name`'s flag."""
    return prefix + name


def textual(name: str) -> bool:
    """Whether the setting's flag takes text to parse (DoLa's layers) rather than a number."""
    return Sampling.model_fields[name].annotation not in (float, int)


def sampling_flags(prefixes: tuple[str, ...] = tuple(PREFIXES)) -> list[inspect.Parameter]:
    """The flags of every sampling setting, for each phase prefix ("" is a plain flag)."""
    found = []
    for prefix in prefixes:
        for name in PREFIXES[prefix]:
            info = Sampling.model_fields[name]
            kind: Any = str if textual(name) else info.annotation
            default = _default(name, prefix)
            what = (info.description or "").rstrip(".")
            if prefix:
                model = " (default: the model's generation config)" if use(name).model else ""
                what = PHASE_HELP[prefix].format(what=name.replace("_", " "), default=model)
            help_text = f"{what}{'.' if not prefix else ''} Bound: {rule(name)}."
            option = typer.Option(default, flag(name, prefix), help=help_text)
            found.append(
                inspect.Parameter(
                    parameter(name, prefix),
                    inspect.Parameter.POSITIONAL_OR_KEYWORD,
                    default=option,
                    annotation=kind | None,
                )
            )
    return found


def _default(name: str, prefix: str) -> Any:
    if prefix == "think_":
        return None
    value = getattr(ANSWER_DEFAULT if prefix == "answer_" else DEFAULT, name)
    return None if textual(name) else value


def with_flags(flags: list[inspect.Parameter], after: str) -> Callable[[F], F]:
    """Add `flags` to a typer command after its parameter `after`; the command takes them
    with `**sampling` (and reads them from `ctx.params`)."""

    def add(command: F) -> F:
        signature = inspect.signature(command)
        own = [p for p in signature.parameters.values() if p.kind != p.VAR_KEYWORD]
        at = [p.name for p in own].index(after) + 1
        command.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[*own[:at], *flags, *own[at:]]
        )
        return command

    return add


def sampling_option(name: str, help_text: str) -> Any:
    """The flag of setting `name` for a command that uses it for its own purpose (unset by
    default; the command checks its bound with `settings.check_sampling`)."""
    return typer.Option(None, flag(name), help=f"{help_text} Bound: {rule(name)}.")


def sampling_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling flags among a command's `values`, checked and parsed: each bound held
    (refused naming the flag), DoLa's text turned into its setting."""
    parsed = dict(values)
    for prefix, names in PREFIXES.items():
        given = {}
        for name in names:
            key = parameter(name, prefix)
            if key not in values or values[key] is None:
                continue
            value = values[key]
            if textual(name):
                value = parse_layers(value, flag(name, prefix))
            parsed[key] = given[name] = value
        check_sampling(given, lambda name, prefix=prefix: flag(name, prefix))
    return parsed


def parse_layers(text: str, name: str) -> str | tuple[int, ...]:
    """DoLa's layers from a flag: low, high or comma-separated layer indices."""
    if text in ("low", "high"):
        return text
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise InputError(
            f"{name} {text!r}: use low, high or comma-separated layer indices (2,4,6)"
        ) from None
