"""Finding and reading probes: shipped names or files, their lexicons and judge schema."""

from __future__ import annotations

import difflib
import json
import tomllib
from collections.abc import Mapping
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from muestra.analysis.probe_scores import score_parts
from muestra.errors import InputError
from muestra.evaluation.probes.schema import (
    DATA,
    JudgeSpec,
    Probe,
    ProbeSpec,
    ProbeStop,
)
from muestra.experiments.spec import (
    Strict,
    describe_error,
    template_fields,
)

# ---- loading ---------------------------------------------------------------------------


def _shipped(folder: str) -> dict[str, Path]:
    """name -> path of the TOML files shipped in `evaluation/data/FOLDER`."""
    files = (resources.files(DATA) / folder).iterdir()
    return {p.name.removesuffix(".toml"): Path(str(p)) for p in files if p.name.endswith(".toml")}


def shipped_probes() -> dict[str, Path]:
    return _shipped("probes")


def shipped_lexicons() -> dict[str, Path]:
    return _shipped("lexicons")


def resolve_probe(ref: str | Path) -> Path:
    """A probe file, or the name of a shipped one."""
    path = Path(ref)
    if path.exists():
        return path
    shipped = shipped_probes()
    if str(ref) in shipped:
        return shipped[str(ref)]
    close = difflib.get_close_matches(str(ref), list(shipped), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise InputError(
        f"probe {str(ref)!r}: no such file, and no shipped probe of that name{hint} "
        f"(shipped: {', '.join(sorted(shipped))})"
    )


def load_probe(ref: str | Path) -> Probe:
    path = resolve_probe(ref)
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the probe: {err}") from err
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"{path}: not valid TOML: {err}") from err
    try:
        spec = ProbeSpec.model_validate(data)
    except ValidationError as err:
        raise InputError(describe_error(err, path, data, ProbeSpec)) from err
    _check_slots(spec, path)
    lexicon = _read_lexicons(spec.lexicon.files, path)
    schema = None
    if spec.judge is not None:
        schema = _judge_schema(spec.judge, path)
        fields = template_fields(spec.judge.user) | template_fields(spec.judge.system or "")
        unknown = fields - {"prompt", "continuation", "text"}
        if unknown:
            raise InputError(
                f"{path}: judge.user names {sorted(unknown)}; a judge prompt may use "
                "{prompt}, {continuation} and {text}"
            )
    if spec.mode == "chat" and "text" not in template_fields(spec.instruction):
        raise InputError(f"{path}: instruction {spec.instruction!r} must contain {{text}}")
    probe = Probe(path, text, spec, lexicon, schema)
    if spec.stop is not None:
        check_probe_stop(probe, spec.stop, str(path))
    return probe


def check_probe_stop(probe: Probe, stop: ProbeStop, where: str) -> None:
    """Refuse a `[stop]` score the probe does not compute while it samples."""
    groups = [g.id for g in probe.spec.group_list]
    unknown = [g for g in stop.compare or [] if g not in groups]
    if unknown:
        raise InputError(
            f"{where}: [stop] compare names {unknown}, not groups of this probe: "
            f"{', '.join(groups)}"
        )
    kind, name = score_parts(stop.score)
    categories = sorted(probe.lexicon)
    if kind in ("lexicon", "category") and name not in probe.lexicon:
        have = ", ".join(categories) or "none: the probe has no [lexicon] files"
        close = difflib.get_close_matches(name, categories, n=1)
        hint = (
            f"; did you mean {kind}{':' if kind == 'lexicon' else '='}{close[0]}?" if close else ""
        )
        raise InputError(
            f"{where}: [stop] score = {stop.score!r}: {name!r} is not a lexicon category of "
            f"this probe ({have}){hint}"
        )
    if kind in ("category", "phrase") and not probe.spec.extraction.enabled:
        raise InputError(
            f"{where}: [stop] score = {stop.score!r} reads the extracted phrase, and "
            "[extraction] enabled = false; track a lexicon:CATEGORY score or enable extraction"
        )


def with_probe_stop(probe: Probe, flags: Mapping[str, Any], where: str) -> Probe:
    """`probe` with its `[stop]` table completed or overridden by `flags` (the `ProbeStop`
    fields a command or notebook call gives; None: not given), checked as the file's own
    table is."""
    given = {k: v for k, v in flags.items() if v is not None}
    if not given:
        return probe
    unknown = sorted(set(given) - set(ProbeStop.model_fields))
    assert not unknown, f"not [stop] fields: {unknown}"
    base = probe.spec.stop.model_dump(exclude_unset=True) if probe.spec.stop else {}
    data = {**base, **given}
    if "score" not in data:
        raise InputError(
            f"{where}: a sequential probe tracks one score: give it (--stop-on SCORE, "
            'stop_on="lexicon:CATEGORY", or [stop] score)'
        )
    try:
        stop = _StopTable.model_validate({"stop": data}).stop
    except ValidationError as err:
        raise InputError(
            describe_error(err, probe.path, {"stop": data}, root=_StopTable).replace(
                f"{probe.path}: ", f"{where}: ", 1
            )
        ) from None
    changed = replace(probe, spec=probe.spec.model_copy(update={"stop": stop}))
    check_probe_stop(changed, stop, where)
    return changed


class _StopTable(Strict):
    """The root `describe_error` reads a `[stop]` table's keys from."""

    stop: ProbeStop


def _check_slots(spec: ProbeSpec, path: Path) -> None:
    for template in spec.template_list:
        slots = template_fields(template.text)
        if not slots:
            raise InputError(
                f"{path}: template {template.id!r} ({template.text!r}) has no slot; write "
                "the group's place as {group} (or any word the groups define)"
            )
        for group in spec.group_list:
            missing = slots - set(group.words)
            if missing:
                raise InputError(
                    f"{path}: template {template.id!r} ({template.text!r}) needs "
                    f"{sorted(missing)}, which group {group.id!r} does not define (it has "
                    f"{sorted(group.words)}); add them to the group"
                )


def _read_lexicons(files: list[str], probe_path: Path) -> dict[str, list[str]]:
    categories: dict[str, list[str]] = {}
    shipped = shipped_lexicons()
    for name in files:
        path = probe_path.parent / name
        if not path.exists():
            if name not in shipped:
                raise InputError(
                    f"{probe_path}: lexicon.files: {name!r} is neither a file beside the probe "
                    f"nor a shipped lexicon ({', '.join(sorted(shipped))})"
                )
            path = shipped[name]
        read = read_lexicon(path)
        if not any(read.values()):
            raise InputError(
                f"{probe_path}: lexicon.files: {path} holds no words (an empty file, or "
                "only comments); add one word or phrase per line, or leave it out"
            )
        for category, entries in read.items():
            if not entries:
                raise InputError(
                    f"{probe_path}: lexicon.files: {path}: category {category!r} is empty"
                )
            categories.setdefault(category, []).extend(entries)
    return categories


def read_lexicon(path: Path) -> dict[str, list[str]]:
    """{category: entries} from TOML or JSON ({category: [entries]}) or TXT (one a line)."""
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".txt":
            entries = [line.strip() for line in text.splitlines()]
            return {path.stem: [e for e in entries if e and not e.startswith("#")]}
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InputError(f"{path}: cannot read the lexicon: {err}") from err
    data = {k: v for k, v in data.items() if k != "about"}
    for category, entries in data.items():
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise InputError(
                f"{path}: lexicon category {category!r} must be a list of words or phrases"
            )
    return data


def _judge_schema(judge: JudgeSpec, path: Path) -> dict[str, Any]:
    from muestra.answers.grammar import check_schema

    if isinstance(judge.schema_, dict):
        schema, source = judge.schema_, f"{path}: [judge] schema"
    else:
        file = path.parent / judge.schema_
        try:
            schema = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise InputError(f"{path}: [judge] schema: cannot read {file}: {err}") from err
        source = f"{path}: [judge] schema ({file})"
    if not isinstance(schema, dict):
        raise InputError(f"{source}: a JSON Schema is an object, got {type(schema).__name__}")
    check_schema(schema, source)  # before any sampling, not after it
    return schema
