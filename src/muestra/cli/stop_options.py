"""The flags of a sequential run (`[stop]` in a spec), shared by `run` and `eval`: each
one a `StopSpec` field, completing or overriding the spec's table."""

from __future__ import annotations

from typing import Any

import typer

from muestra.errors import InputError

StopOnOption = typer.Option(
    None,
    "--stop-on",
    help="FIELD=VALUE: sample each cell until this answer value's share is settled "
    "([stop] field and value; e.g. gender=male).",
)
PrecisionOption = typer.Option(
    None, "--precision", help="Stop a cell once its band is within ± this share (0.05: ±5 points)."
)
ReferenceOption = typer.Option(
    None, "--reference", help="Stop a cell once its band excludes this share (e.g. 0.5)."
)
CompareOption = typer.Option(
    None,
    "--compare",
    help="A,B: two prompt ids or two condition labels; track the difference of their shares.",
)
MinSamplesOption = typer.Option(
    None, "--min-samples", help="Samples a cell takes before its first look (default 10)."
)
MaxSamplesOption = typer.Option(
    None,
    "--max-samples",
    help="Samples a cell takes at most (default: --samples, else the spec's or probe's samples).",
)
EveryOption = typer.Option(
    None, "--every", help="Samples each open cell takes per round, between looks (default 10)."
)
EstimatorOption = typer.Option(
    None,
    "--estimator",
    help="auto | counts | field_probs: what estimates the share (auto: the exact answer "
    "probabilities where the answer is drawn at temperature 1 without filters, else counts).",
)


def stop_flags(
    stop_on: str | None = None,
    compare: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """The `StopSpec` fields the flags give (None where a flag is not given)."""
    found = dict(fields)
    if stop_on is not None:
        field, sep, value = stop_on.partition("=")
        if not sep or not field or not value:
            raise InputError(f"--stop-on {stop_on!r}: write FIELD=VALUE, e.g. gender=male")
        found |= {"field": field.strip(), "value": value.strip()}
    if compare is not None:
        names = [n.strip() for n in compare.split(",")]
        if len(names) != 2 or not all(names):
            raise InputError(f"--compare {compare!r}: write two names, A,B")
        found["compare"] = names
    return found
