"""Sequential runs: each cell samples in rounds until its answer is settled.

A spec's `[stop]` table (`StopSpec`) tracks one answer value's share per model ×
condition × prompt cell, or, with `compare`, the difference of two cells' shares (two
prompts, two conditions, or two variants within each group of items, sampled in pairs of
the same sample index); a probe's `[stop]` tracks a model-free score of the text instead,
read by the runner's `stop_value` (`evaluation/probes/running.py`). `Rounds` plans a
run as rounds: every open cell takes `every` more samples (the first round `min_samples`),
all of them batched together by the runner; after each round each open cell reads the
anytime-valid band of its quantity (`muestra.analysis.sequential`) over its samples in
index order and stops when the band is within ± `precision`, excludes `reference`, or
the cell reached `max_samples`. The decision at a look depends only on the samples before
it, and sample i always gets the seed of (run seed, prompt, i): a resumed run replays the
same looks over the stored samples and continues the same sequence. Each stop (why, at
how many samples, the band there) is written to the store's `stops` table.

Two estimators of a share. `counts`: the indicator of the drawn answer. `field_probs`
(Rao–Blackwell): the exact probability the model gave the value where it chose it (temperature 1,
no top-k/top-p/min-p, under the grammar mask: `answers/answer_probs.py`). When the answer
is drawn from exactly that distribution, E[field_probs] is the share and its variance is
no larger than the indicator's, so the band narrows sooner (tests/test_sequential.py,
tests/test_rao_blackwell.py). A greedy answer (or one drawn at another temperature, or
with a filter, by beam search, by an endpoint) is not: there field_probs describe another
quantity and the run counts answers, and says so (`field_probs_caveat`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from pydantic import ValidationError

from muestra.analysis.language import say
from muestra.analysis.sequential import Band, StopRule, as_difference, betting_cs
from muestra.errors import InputError
from muestra.experiments.spec import LoadedSpec, StopSpec, Strict, describe_error, fill
from muestra.experiments.stop_rules import (
    PROBE_SCORE,
    check_stop,
    compared,
    field_probs_caveat,
    tracked_name,
    value_label,
)
from muestra.experiments.store import (
    cell_answers,
    condition_rows,
    count_samples,
    has_field_probs,
    record_stop,
    run_stop_rule,
    set_run_stop_rule,
    stored_stops,
)

# the runner's `Unit` (one model × condition × prompt cell and its missing samples) and the
# `Runner` itself, which imports this module: typed loosely here to keep imports one way
Unit = Any
Runner = Any


def rule_of(stop: StopSpec, cap: int) -> StopRule:
    return StopRule(
        stop.precision,
        stop.reference,
        min(stop.min_samples, cap),
        cap,
        stop.every,
        stop.alpha,
    )


@dataclass(frozen=True)
class Tracker:
    """One tracked quantity: a cell's share, or the difference of two cells' shares."""

    cells: tuple[Unit, ...]  # one, or two (first minus second)
    estimator: str  # "counts" | "field_probs"
    label: str  # e.g. "gender=male" or "gender=male: neutral_1 − neutral_2"


@dataclass(frozen=True)
class Look:
    """A tracker read after `samples` samples of each of its cells."""

    samples: int
    band: Band  # on the share, or on the difference
    reason: str | None


class Rounds:
    """The rounds of a sequential run, over the runner's cells and store."""

    def __init__(self, runner: Runner, stop: StopSpec, cap: int) -> None:
        self.runner = runner
        self.stop = stop
        self.rule = rule_of(stop, cap)
        # a sample's tracked value when it is not an answer field (a probe's score)
        self.value_of = getattr(runner, "stop_value", None)
        self.trackers = self._trackers()
        assert runner.db is not None and runner.run_id is not None
        self.closed = {
            (row["model_id"], row["condition_id"], row["prompt_id"])
            for row in stored_stops(runner.db, runner.run_id)
        }

    def _trackers(self) -> list[Tracker]:
        runner, stop = self.runner, self.stop
        spec = runner.spec
        cells = runner.cells()
        kind = compared(stop, spec.spec, spec.conditions)
        tracked = tracked_name(stop.field, stop.value)
        found, paired = [], set()
        if kind is not None:
            first, second = stop.compare or []
            for a in cells:
                if _name(a, kind) != first:
                    continue
                b = next(u for u in cells if _name(u, kind) == second and _partners(a, u, kind))
                label = f"{tracked}: {first} − {second}"
                found.append(Tracker((a, b), self._estimator((a, b)), label))
                paired |= {id(a), id(b)}
        for cell in cells:
            if id(cell) not in paired:
                found.append(Tracker((cell,), self._estimator((cell,)), tracked))
        return found

    def _estimator(self, cells: tuple[Unit, ...]) -> str:
        if self.stop.estimator != "auto":
            return self.stop.estimator
        caveats = {
            field_probs_caveat(c.condition.answer, c.model.endpoint is not None) for c in cells
        }
        scored = self.runner.spec.answer_schema is not None or any(
            c.condition.answer.choice or c.item.choice for c in cells
        )
        if caveats == {None} and scored:
            return "field_probs"
        for cell in cells:
            caveat = field_probs_caveat(cell.condition.answer, cell.model.endpoint is not None)
            if caveat is not None:
                self.runner.note_once(
                    f"model {cell.model.name}, condition {cell.condition.label}: {caveat}, so "
                    "field_probs do not describe these answers' shares; the stop rule counts "
                    "answers"
                )
        return "counts"

    def of(self, model_name: str) -> Iterator[list[Unit]]:
        """Each round's units for this model's open cells, until every cell is stopped.
        Looks are taken (and stops written) before each round is planned."""
        mine = [t for t in self.trackers if t.cells[0].model.name == model_name]
        while True:
            units = [u for t in mine if not self._is_closed(t) for u in self._next(t)]
            if not units:
                return
            yield units

    def _is_closed(self, tracker: Tracker) -> bool:
        return all(_key(c) in self.closed for c in tracker.cells)

    def _next(self, tracker: Tracker) -> list[Unit]:
        """The samples `tracker`'s cells need for their next look; [] once it stopped
        (the stop written)."""
        stored = [self._answers(c) for c in tracker.cells]
        for look in self.looks(tracker, stored):
            if look.reason is not None:
                self._close(tracker, look)
                return []
        have = min(len(_prefix(s)) for s in stored)
        target = next(n for n in self.rule.looks() if n > have)
        return [
            replace(c, missing=tuple(i for i in range(target) if i not in s))
            for c, s in zip(tracker.cells, stored, strict=True)
            if any(i not in s for i in range(target))
        ]

    def looks(self, tracker: Tracker, stored: list[dict[int, Any]]) -> Iterator[Look]:
        """The looks the stored samples allow (each cell's samples 0..n−1 all stored), in
        order, up to the first that settles."""
        have = min(len(_prefix(s)) for s in stored)
        values, counts = _sequence(stored, have, tracker.estimator)
        lows, highs = betting_cs(values, self.rule.alpha) if len(values) else ((), ())
        for n in self.rule.looks():
            if n > have:
                return
            used = int(counts[n - 1])
            b = Band(0, float("nan"), 0.0, 1.0)  # no valid sample yet: all of [0, 1]
            if used:
                b = Band(used, float(values[:used].mean()), lows[used - 1], highs[used - 1])
            if len(tracker.cells) == 2:
                b = as_difference(b)
            reason = self.rule.reason(b, samples=n)
            yield Look(n, b, reason)
            if reason is not None:
                return

    def _answers(self, cell: Unit) -> dict[int, Any]:
        assert self.runner.db is not None
        rows = cell_answers(self.runner.db, cell.model_id, cell.condition_id, cell.prompt_id)
        if self.value_of is not None:
            return {row["sample_index"]: self.value_of(cell.item, row) for row in rows}
        target = fill(self.stop.value, cell.item.variables)  # e.g. "{answer}": the key
        return {row["sample_index"]: self._value(row, target) for row in rows}

    def _value(self, row: Any, target: str) -> tuple[float, float | None] | None:
        """(indicator, exact probability or None) of the tracked value; None when the
        sample has no such answer (an error, a field left out)."""
        if row["error"] is not None or row["answer_json"] is None:
            return None
        answer: Any = json.loads(row["answer_json"])
        field = self.stop.field
        if isinstance(answer, dict):
            for part in field.split("."):
                answer = answer.get(part) if isinstance(answer, dict) else None
        elif field != "answer":
            return None
        if answer is None:
            return None
        probs = json.loads(row["field_probs_json"]) if row["field_probs_json"] else {}
        exact = (probs.get(field) or {}).get(target)
        indicator = float(value_label(answer) == target)
        return indicator, None if exact is None else min(max(float(exact), 0.0), 1.0)

    def _close(self, tracker: Tracker, look: Look) -> None:
        assert self.runner.db is not None and self.runner.run_id is not None
        for cell in tracker.cells:
            record_stop(
                self.runner.db,
                {
                    "run_id": self.runner.run_id,
                    "model_id": cell.model_id,
                    "condition_id": cell.condition_id,
                    "prompt_id": cell.prompt_id,
                    "tracked": tracker.label,
                    "estimator": tracker.estimator,
                    "reason": look.reason,
                    "samples": look.samples,
                    "used": look.band.n,
                    "estimate": look.band.estimate,
                    "low": look.band.low,
                    "high": look.band.high,
                },
            )
            self.closed.add(_key(cell))


def _name(cell: Unit, kind: str) -> str | None:
    """The name `compare` gives `cell` when it names `kind`s."""
    if kind == "prompt":
        return str(cell.item.id)
    if kind == "condition":
        return str(cell.condition.label)
    return cell.item.variant  # type: ignore[no-any-return]


def _partners(a: Unit, b: Unit, kind: str) -> bool:
    """Whether `b` is the cell `a` is compared with: the same model, and everything but
    the compared name the same (variants: the same group of items)."""
    if a.model is not b.model:
        return False
    if kind == "prompt":
        return a.condition is b.condition
    if kind == "condition":
        return a.item is b.item
    return a.condition is b.condition and a.item.group == b.item.group


def _key(cell: Unit) -> tuple[int, int, int]:
    return cell.model_id, cell.condition_id, cell.prompt_id


def _prefix(stored: dict[int, Any]) -> range:
    """0..n−1: the contiguous samples stored from index 0."""
    n = 0
    while n in stored:
        n += 1
    return range(n)


def _sequence(
    stored: list[dict[int, Any]], have: int, estimator: str
) -> tuple[np.ndarray, np.ndarray]:
    """The values in [0, 1] of the samples 0..have−1 (pairs of cells: (x − y + 1)/2; a
    sample without an answer, or a pair with one, is skipped), and how many values come
    from the first n samples, for every n."""
    values, counts = [], np.zeros(have, dtype=int)
    for i in range(have):
        found = [s[i] for s in stored]
        if all(f is not None for f in found):
            x = [f[1] if estimator == "field_probs" and f[1] is not None else f[0] for f in found]
            values.append(x[0] if len(x) == 1 else (x[0] - x[1] + 1) / 2)
        counts[i] = len(values)
    return np.asarray(values, dtype=float), counts


def check_stored_rule(
    db: sqlite3.Connection, run_id: int, stop: StopSpec | None, store: str
) -> None:
    """Record the rule a run samples under, and refuse to resume it under another (its
    stored samples would belong to a different sequence of looks)."""
    rule = json.dumps(stop.model_dump(), sort_keys=True) if stop is not None else None
    stored = run_stop_rule(db, run_id)
    if stored == rule:
        return
    if stored is None and not count_samples(db, run_id):
        set_run_stop_rule(db, run_id, rule)
        return
    was = "without a [stop] rule" if stored is None else f"with the [stop] rule {stored}"
    now = "without one" if rule is None else f"with {rule}"
    raise InputError(
        f"{store}: this run was sampled {was}, and is now resumed {now}; its stops would "
        "not replay. Resume it with the same rule, use another --out, or --force-new to "
        "start a new run in the same store."
    )


def with_stop(loaded: LoadedSpec, flags: Mapping[str, Any], where: str) -> LoadedSpec:
    """`loaded` with its `[stop]` table completed or overridden by `flags` (the
    `StopSpec` fields a command or notebook call gives; None: not given), checked as a
    spec's own table is."""
    given = {k: v for k, v in flags.items() if v is not None}
    if not given:
        return loaded
    unknown = sorted(set(given) - set(StopSpec.model_fields))
    assert not unknown, f"not [stop] fields: {unknown}"
    base = loaded.spec.stop.model_dump(exclude_unset=True) if loaded.spec.stop else {}
    data = {**base, **given}
    if "field" not in data or "value" not in data:
        raise InputError(
            f"{where}: a sequential run tracks one answer value: give its field and value "
            '(--stop-on FIELD=VALUE, stop_on="field=value", or [stop] field and value)'
        )
    try:
        stop = StopSpec.model_validate(data)
    except ValidationError as err:
        raise InputError(
            describe_error(err, loaded.path, {"stop": data}, root=_StopTable).replace(
                f"{loaded.path}: ", f"{where}: ", 1
            )
        ) from None
    check_stop(stop, loaded.spec, loaded.conditions, loaded.answer_schema, where)
    return replace(loaded, spec=loaded.spec.model_copy(update={"stop": stop}))


class _StopTable(Strict):
    """The root `describe_error` reads a `[stop]` table's keys from."""

    stop: StopSpec


# ---- what the commands and views show ------------------------------------------------------

STOP_HEADERS = ["model", "condition", "prompt", "tracked", "estimator", "stopped", "samples",
                "estimate", "95% band (anytime-valid)"]  # fmt: skip


def stopped_because(row: Mapping[str, Any], rule: Mapping[str, Any]) -> str:
    """Why a cell stopped, in words."""
    if row["reason"] == "precision":
        return f"within ±{rule.get('precision')}"
    if row["reason"] == "reference":
        return f"excludes {rule.get('reference')}"
    return "reached max_samples"


def stop_rows(db: sqlite3.Connection, run_id: int) -> tuple[dict[str, Any] | None, list[dict]]:
    """A run's [stop] rule (None: a fixed-n run) and its cells' stops, for display."""
    stored = run_stop_rule(db, run_id)
    rule = json.loads(stored) if stored else None
    rows = []
    for row in stored_stops(db, run_id):
        rows.append(
            {
                "model": row["model_label"],
                "condition": row["condition_label"],
                "prompt": row["prompt_key"],
                "tracked": row["tracked"],
                "estimator": row["estimator"],
                "stopped": stopped_because(row, rule or {}),
                "samples": row["samples"],
                "used": row["used"],
                "estimate": row["estimate"],
                "low": row["low"],
                "high": row["high"],
                "at": row["created_at"],
            }
        )
    return rule, rows


def stop_table(rows: list[dict[str, Any]]) -> list[list[str]]:
    """`stop_rows` as text cells under `STOP_HEADERS`."""
    return [
        [r["model"], r["condition"], r["prompt"], r["tracked"], r["estimator"], r["stopped"],
         str(r["samples"]), "—" if r["estimate"] is None else f"{r['estimate']:.3f}",
         f"[{r['low']:.3f}, {r['high']:.3f}]"]
        for r in rows
    ]  # fmt: skip


def stop_note(rule: Mapping[str, Any] | None, lang: str = "en") -> str | None:
    """One line on the rule of a sequential run and what its bands assume (in `lang`: en
    or es)."""
    if rule is None:
        return None
    settles = say("stop_or", lang).join(
        [say("stop_within", lang, precision=rule["precision"])] * (rule["precision"] is not None)
        + [say("stop_excluding", lang, reference=rule["reference"])]
        * (rule["reference"] is not None)
    )
    probe = rule["field"] == PROBE_SCORE
    cap = rule["max_samples"] or say("stop_cap_probe" if probe else "stop_cap_spec", lang)
    note = say(
        "stop_rule", lang, every=rule["every"], min_samples=rule["min_samples"],
        tracked=tracked_name(rule["field"], rule["value"]), settles=settles, cap=cap,
        level=1 - rule["alpha"],
        estimators=say("stop_estimators_probe" if probe else "stop_estimators", lang),
    )  # fmt: skip
    if rule["reference"] is not None:
        caveat = "stop_probe_reference_caveat" if probe else "stop_reference_caveat"
        note += say(caveat, lang, field=rule["field"])
    return note


def stop_section(stops: Mapping[str, Any]) -> list[Any]:
    """The report's section on a sequential run's stops (`{"rule", "cells"}` as
    `stored_analysis` keeps them); none for a fixed-n run."""
    from muestra.report.html import Section

    if stops.get("rule") is None:
        return []
    note = stop_note(stops["rule"])
    table = (STOP_HEADERS, stop_table(stops["cells"]))
    return [Section("Where each cell stopped", [table], [note or ""])]


def field_probs_notes(db: sqlite3.Connection, run_id: int, lang: str = "en") -> list[str]:
    """One note per condition whose stored field_probs do not describe its answers (a
    greedy answer, another temperature, a filter): their mean is not the answers' share
    (in `lang`: en or es)."""
    from muestra.experiments.spec import AnswerSpec

    notes = []
    for row in condition_rows(db, run_id):
        if not has_field_probs(db, row["id"]):
            continue
        # as stored (not validated again: a store may predate a field's current checks)
        answer = AnswerSpec.model_construct(**json.loads(row["answer_json"]))
        caveat = field_probs_caveat(answer, lang=lang)
        if caveat is not None:
            notes.append(say("field_probs_note", lang, label=row["label"], caveat=caveat))
    return notes
