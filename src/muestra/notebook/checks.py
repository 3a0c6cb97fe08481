"""The notebook API's arguments, checked before any work.

Each public function's annotations are its contract, validated by pydantic in strict mode
(`"3"` is not a count, `True` is not a number, `None` is not a path) with the bounds the
annotations carry (`Count`: a whole number ≥ 1). The first violation is one `InputError`
naming the function, the argument and the value given — before a spec is read or a model
loaded.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, validate_call

from muestra.errors import InputError

Count = Annotated[int, Field(ge=1)]  # samples, questions, run ids…
PathLike = str | Path
Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0)]
Alpha = Annotated[float, Field(gt=0, lt=1)]

STRICT = ConfigDict(strict=True, arbitrary_types_allowed=True)
F = TypeVar("F", bound=Callable[..., Any])


def checked(fn: F) -> F:
    """`fn` with its arguments validated against its annotations first (module docstring)."""
    validated = validate_call(config=STRICT)(fn)
    names = list(inspect.signature(fn).parameters)
    label = fn.__qualname__.replace(".__init__", "")

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return validated(*args, **kwargs)
        except ValidationError as err:
            if err.title not in (fn.__name__, fn.__qualname__):  # raised by the work itself
                raise
            loc = err.errors()[0]["loc"][0]
            argument = names[loc] if isinstance(loc, int) else str(loc)
            same = [e for e in err.errors() if e["loc"][:1] == (loc,)]
            raise InputError(describe(label, argument, same)) from None

    return call  # type: ignore[return-value]


def check_values(where: str, values: Mapping[str, Any], target: type) -> None:
    """Check keyword `values` against the annotated field types of `target` (a dataclass)
    in strict mode; the first wrong one is an `InputError` naming it."""
    hints = typing.get_type_hints(target, include_extras=True)
    for name, value in values.items():
        if name in hints:
            try:
                TypeAdapter(hints[name]).validate_python(value, strict=True)
            except ValidationError as err:
                raise InputError(describe(where, name, err.errors())) from None


def describe(where: str, argument: str, errors: list[Any]) -> str:
    """One line: the function, the argument with its value, and what it should be (a
    union such as `str | Path` reports one error per member: each is said)."""
    wanted = list(dict.fromkeys(_lower(e["msg"]) for e in errors))
    said = " or ".join([wanted[0], *(w.removeprefix("should be ") for w in wanted[1:])])
    return f"{where}(): {argument}={_short(errors[0].get('input'))} — {said}"


def _lower(message: str) -> str:
    message = message.replace("Input should be ", "should be ")
    return message[:1].lower() + message[1:]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
