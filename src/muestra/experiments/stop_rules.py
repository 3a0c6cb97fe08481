"""What a `[stop]` table needs of a spec, checked when the spec loads (before any model),
and when `field_probs` describe the answers a condition draws. Duck-typed over the spec's
models, so that `spec` can call it without importing the runner's side."""

from __future__ import annotations

import json
from typing import Any

from muestra.errors import InputError
from muestra.settings import DEFAULT, PHASED


def field_probs_caveat(answer: Any, remote: bool = False, lang: str = "en") -> str | None:
    """None when a condition's `field_probs` describe the distribution its answers are
    drawn from (temperature 1, no filter, sampled locally); else why not, in words (in
    `lang`: en or es)."""
    from muestra.analysis.language import say

    if remote:
        return say("caveat_remote", lang)
    if not answer.field_probs:
        return say("caveat_off", lang)
    if answer.strategy == "beam":
        return say("caveat_beam", lang)
    if answer.prompt_lookup is not None or answer.draft_model:
        return say("caveat_free", lang)
    if answer.temperature == 0:
        return say("caveat_greedy", lang)
    # the sampling settings that move the draws away from plain sampling at temperature 1
    changed = [
        key if isinstance(getattr(answer, key), tuple | str) else f"{key} = {getattr(answer, key)}"
        for key in PHASED
        if getattr(answer, key) != getattr(DEFAULT, key)
    ]
    if changed:
        return say("caveat_settings", lang, settings=", answer.".join(changed))
    return None


# the `field` of a probe's [stop] rule: its `value` names a model-free score of the text
PROBE_SCORE = "probe score"


def tracked_name(field: str, value: str) -> str:
    """What a rule tracks, in words: "gender=male", or a probe's score ("lexicon:care")."""
    return value if field == PROBE_SCORE else f"{field}={value}"


def value_label(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _allowed(stop: Any, spec: Any, schema: dict[str, Any] | None) -> list[str] | None:
    """The values the tracked field can take (None: any text); refuses an unknown field."""
    from muestra.answers.answer_probs import categorical_fields

    if schema is not None:
        fields = categorical_fields(schema)
        if stop.field not in fields:
            raise ValueError(
                f"field = {stop.field!r} is not an enum or boolean field of the answer "
                f"schema; its fields with a fixed set of values: {', '.join(fields) or 'none'}"
            )
        return [value_label(v) for v in fields[stop.field]]
    if stop.field != "answer":
        raise ValueError(
            f'field = {stop.field!r}: an answer without a schema is tracked as "answer"'
        )
    choices = [*(spec.answer.choice or [])]
    choices += [c for item in spec.prompt.items for c in item.choice or []]
    return choices or None


def check_stop(
    stop: Any,
    spec: Any,
    conditions: list[Any],
    schema: dict[str, Any] | None,
    where: str,
) -> None:
    """Refuse a `[stop]` table the run could not follow, before any model loads."""
    try:
        allowed = _allowed(stop, spec, schema)
        templated = "{" in stop.value  # e.g. "{answer}": each item's own value
        if allowed is not None and not templated and stop.value not in allowed:
            raise ValueError(
                f"value = {stop.value!r} is not a value of {stop.field}: {', '.join(allowed)}"
            )
        compared(stop, spec, conditions)
        for condition in conditions:
            think = condition.think
            if condition.answer.strategy == "beam" or (think and think.strategy == "beam"):
                raise ValueError(
                    f"condition {condition.label!r} ranks beams; a sequential run needs "
                    "independent draws"
                )
        if stop.estimator == "field_probs":
            remote = any(m.endpoint is not None for m in spec.model_list)
            for condition in conditions:
                caveat = field_probs_caveat(condition.answer, remote)
                if caveat is None and schema is None and not allowed:
                    caveat = "the answer has no enum, boolean or choice to score"
                if caveat is not None:
                    raise ValueError(
                        f'estimator = "field_probs" needs answers drawn at temperature '
                        f"1 without filters, but {caveat} (condition {condition.label!r}); "
                        'use estimator = "counts" or "auto"'
                    )
    except ValueError as err:
        raise InputError(f"{where}: [stop] {err}") from None


def compared(stop: Any, spec: Any, conditions: list[Any]) -> str | None:
    """ "prompt", "condition" or "variant": what `stop.compare` names (None without it).
    Two variants are compared within each group of items that has the first."""
    if stop.compare is None:
        return None
    items = spec.prompt.items
    prompts = {item.id for item in items}
    labels = {c.label for c in conditions}
    variants = {item.variant for item in items if item.variant is not None}
    for kind, names in (("prompt", prompts), ("condition", labels), ("variant", variants)):
        if all(name in names for name in stop.compare):
            if kind == "variant":
                _check_variant_pairs(stop.compare, items)
            return kind
    shown = ", ".join(sorted(variants)) or "none"
    raise ValueError(
        f"compare = {stop.compare} must name two prompt ids ({', '.join(sorted(prompts))}), "
        f"two condition labels ({', '.join(sorted(labels))}) or two variants ({shown})"
    )


def _check_variant_pairs(names: list[str], items: list[Any]) -> None:
    """Each group with one of the two variants has the other (its partner in the pairs)."""
    first, second = names
    for group in sorted({item.group for item in items if item.variant in names}):
        have = {item.variant for item in items if item.group == group}
        missing = [n for n in names if n not in have]
        if missing:
            raise ValueError(
                f"compare = {names}: group {group!r} has no item of variant {missing[0]!r}, "
                f"so its {first} − {second} difference has no pairs"
            )
        counts = [sum(item.group == group and item.variant == n for item in items) for n in names]
        if counts != [1, 1]:
            raise ValueError(
                f"compare = {names}: group {group!r} has {counts[0]} and {counts[1]} items of "
                "these variants; a pair is one item of each"
            )
