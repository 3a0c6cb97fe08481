"""Preference pairs for reward models and DPO: read from a file, or built from an
experiment's own samples.

A pair is TRL's preference layout, `{"prompt", "chosen", "rejected"}`, where each part is
plain text or a list of chat messages (conversational). Files may also leave the prompt
implicit, as Anthropic's hh-rlhf does (the shared beginning of both texts is the prompt):
TRL's `maybe_extract_prompt` splits it off.

Pairs built from a store pair two samples of the same prompt, model and condition: one
that satisfies the `chosen` rule and one that satisfies the `rejected` rule. Rules are
pandas `query` expressions over the columns of `muestra export` (answer fields, `valid`,
`think_tokens`, `var_*`, scores such as `reward`…), e.g. `gender == "female"`. The rules,
the store's run and spec hash are written beside the pairs (`PAIRS.meta.json`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from muestra.errors import InputError

Completion = Literal["answer", "full"]
Text = str | list[dict[str, Any]]


class PreferenceDataError(InputError):
    """A preference file or rule that cannot be used (names the file, line and field)."""


@dataclass(frozen=True)
class Pair:
    prompt: Text
    chosen: Text
    rejected: Text

    def record(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


@dataclass
class PairSet:
    pairs: list[Pair]
    meta: dict[str, Any] = field(default_factory=dict)

    def records(self) -> list[dict[str, Any]]:
        return [p.record() for p in self.pairs]

    @property
    def sha256(self) -> str:
        text = "\n".join(json.dumps(r, sort_keys=True, ensure_ascii=False) for r in self.records())
        return hashlib.sha256(text.encode()).hexdigest()

    @staticmethod
    def check_out(path: Path) -> None:
        """Refuse an output path that is a folder (or under a file), before any work."""
        if path.is_dir():
            raise PreferenceDataError(
                f"--out {path} is a folder; pairs are one JSONL file: name a file, e.g. "
                f"{path / 'pairs.jsonl'}"
            )
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise PreferenceDataError(f"--out {path}: {parent} is a file, not a folder")
                break

    def write(self, path: Path) -> Path:
        """The pairs as JSONL at `path`, and their provenance at `PATH.meta.json`; each
        written to a temporary file beside it and renamed, so neither is ever half there."""
        import os
        import tempfile

        self.check_out(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {**self.meta, "pairs": len(self.pairs), "sha256": self.sha256}
        meta_path = path.with_name(path.name + ".meta.json")
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records())
        for target, text in (
            (path, lines),
            (meta_path, json.dumps(meta, indent=2, ensure_ascii=False) + "\n"),
        ):
            fd, scratch = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as out:
                    out.write(text)
                os.replace(scratch, target)
            except BaseException:
                Path(scratch).unlink(missing_ok=True)
                raise
        return meta_path

    def split(self, eval_fraction: float, seed: int) -> tuple[PairSet, PairSet]:
        """A held-out part (`eval_fraction` of the pairs, at least one when there are two
        or more) chosen by `seed`; the rest trains."""
        import random

        if not 0 <= eval_fraction < 1:
            raise PreferenceDataError(f"eval fraction must be in [0, 1), got {eval_fraction}")
        order = list(range(len(self.pairs)))
        random.Random(seed).shuffle(order)
        n_eval = round(len(order) * eval_fraction)
        if eval_fraction > 0 and len(order) >= 2:
            n_eval = min(max(n_eval, 1), len(order) - 1)
        held = sorted(order[:n_eval])
        rest = sorted(order[n_eval:])
        return (
            PairSet([self.pairs[i] for i in rest], self.meta),
            PairSet([self.pairs[i] for i in held], self.meta),
        )


ROLES = ("system", "user", "assistant")


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            for m in value
        )
    )


def read_pairs(path: Path) -> PairSet:
    """Pairs from a JSONL file (one object per line) or a JSON list of objects."""
    return pair_set(pair_rows(path), path)


def pair_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a preference file, each checked (a one-line `PreferenceDataError`
    naming the file and row otherwise) — without TRL, so that a command refuses a bad
    file before anything heavy is imported."""
    if not path.is_file():
        raise PreferenceDataError(f"no preference file at {path}")
    text = path.read_text("utf-8")
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise PreferenceDataError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(rows, list):
            raise PreferenceDataError(
                f"{path}: expected a list of pairs, got {type(rows).__name__}"
            )
        numbered = list(enumerate(rows, 1))
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise PreferenceDataError(f"{path}, line {number}: not valid JSON ({err})") from err
    for number, row in numbered:
        where = f"{path}, {'item' if path.suffix == '.json' else 'line'} {number}"
        if not isinstance(row, dict):
            raise PreferenceDataError(f"{where}: expected an object, got {type(row).__name__}")
        for key in ("chosen", "rejected"):
            value = row.get(key)
            if not (isinstance(value, str) and value.strip()) and not _is_messages(value):
                raise PreferenceDataError(
                    f"{where}: field {key!r} must be a non-empty text or a list of "
                    f"{{role, content}} messages (role one of {', '.join(ROLES)}, content "
                    f"a text), got {value!r:.60}"
                )
        if "prompt" in row and not (
            (isinstance(row["prompt"], str) and row["prompt"].strip())
            or _is_messages(row["prompt"])
        ):
            raise PreferenceDataError(
                f"{where}: field 'prompt' must be a non-empty text or a list of "
                f"{{role, content}} messages, got {row['prompt']!r:.60}"
            )
        if type(row["chosen"]) is not type(row["rejected"]):
            raise PreferenceDataError(
                f"{where}: 'chosen' and 'rejected' must both be texts or both messages"
            )
        if row["chosen"] == row["rejected"]:
            raise PreferenceDataError(f"{where}: 'chosen' and 'rejected' are the same")
    if not numbered:
        raise PreferenceDataError(f"{path}: no pairs")
    return [row for _, row in numbered]


def pair_set(rows: list[dict[str, Any]], path: Path) -> PairSet:
    """Checked rows (`pair_rows`) as pairs: TRL splits the prompt two conversations share
    off them; the file's `.meta.json` (written by `muestra pairs`) comes along."""
    from trl.data_utils import maybe_extract_prompt

    pairs = []
    for row in rows:
        split = maybe_extract_prompt(
            {k: row[k] for k in ("prompt", "chosen", "rejected") if k in row}
        )
        pairs.append(Pair(split.get("prompt", ""), split["chosen"], split["rejected"]))
    meta_path = path.with_name(path.name + ".meta.json")
    meta = json.loads(meta_path.read_text("utf-8")) if meta_path.is_file() else {}
    return PairSet(pairs, {**meta, "source": str(path)})


def pair_text(prompt: Text, completion: Text) -> Text:
    """Prompt and completion as one text (or one conversation), as a reward model reads them."""
    if isinstance(prompt, list) and isinstance(completion, list):
        return [*prompt, *completion]
    if isinstance(prompt, list):
        return [*prompt, {"role": "assistant", "content": completion}]
    return f"{prompt}{completion}"


# --- pairs from an experiment's samples -------------------------------------------------


@dataclass(frozen=True)
class Reasoning:
    """How a condition's reasoning was written, to rebuild the completion the model wrote:
    the instruction added to the prompt (text mode) and the text around the reasoning."""

    instruction: str | None
    open_text: str
    close_text: str


def reasoning_format(think_json: str | None, tokenizer: Any) -> Reasoning | None:
    """The reasoning format of a stored condition (None: it had no think phase), settled
    as the run settled it (`answers.structured.think_phase`)."""
    from muestra.answers.structured import think_phase
    from muestra.settings import DEFAULT, ThinkSettings

    spec = json.loads(think_json) if think_json else None
    if not spec:
        return None
    settings = ThinkSettings(
        mode=spec.get("mode", "auto"),
        instruction=spec.get("instruction") or None,
        close_text=spec.get("close_text"),
    )
    think = think_phase(settings, tokenizer, DEFAULT)  # (its sampling plays no part here)
    if think.mode == "text":
        return Reasoning(think.instruction, "", think.close_text)
    # the think block as chat templates write it; a budget-forced close is not recorded
    return Reasoning(None, f"{think.open_tag}\n", f"\n{think.close_tag}\n\n")


def run_prompts(
    db: Any, run_id: int, completion: Completion, tokenizer: Any
) -> tuple[dict[str, Text], dict[str, Reasoning | None]]:
    """A run's stored prompts by key, and its conditions' reasoning formats by label (all
    None for `completion` "answer")."""
    from muestra.experiments.store import condition_rows, prompt_rows

    messages = {
        row["prompt_key"]: json.loads(row["messages_json"]) for row in prompt_rows(db, run_id)
    }
    formats = {
        row["label"]: reasoning_format(row["think_json"], tokenizer)
        if completion == "full"
        else None
        for row in condition_rows(db, run_id)
    }
    return messages, formats


def sample_text(row: Any, messages: dict[str, Text], fmt: Reasoning | None) -> tuple[Text, Text]:
    """(prompt, completion) of one sample (a row of `samples_frame`) as the model saw it."""
    prompt = _prompt(messages[row["prompt_id"]], fmt)
    return prompt, _completion(row, fmt, prompt)


def store_pairs(
    db: Any,
    chosen: str,
    rejected: str,
    *,
    run_id: int | None = None,
    completion: Completion = "answer",
    max_per_prompt: int = 64,
    tokenizer: Any = None,
) -> PairSet:
    """Pairs of samples of the same (model, condition, prompt) of a run: each sample that
    matches `chosen` with each that matches `rejected`, interleaved so that every sample is
    used before any is repeated, at most `max_per_prompt` per cell.

    `completion` is "answer" (the answer text alone) or "full" (the reasoning, the text
    that closed it and the answer, after the prompt the model saw: in plain-text mode the
    instruction is added to it). "full" needs the model's `tokenizer` to settle mode auto.
    """
    run, frame = _run_frame(db, run_id)
    chosen_mask = _matches(frame, chosen, "chosen")
    rejected_mask = _matches(frame, rejected, "rejected")
    both = frame[chosen_mask & rejected_mask]
    if len(both):
        raise PreferenceDataError(
            f"{len(both)} samples match both rules (e.g. prompt {both.iloc[0]['prompt_id']!r}, "
            f"sample {both.iloc[0]['sample']}): make the rules exclusive"
        )
    messages, formats = run_prompts(db, int(run["id"]), completion, tokenizer)
    pairs: list[Pair] = []
    cells = 0
    for (_model, condition, prompt_id), cell in frame.groupby(
        ["model", "condition", "prompt_id"], sort=False
    ):
        good = cell[chosen_mask[cell.index]]
        bad = cell[rejected_mask[cell.index]]
        if good.empty or bad.empty:
            continue
        cells += 1
        fmt = formats.get(condition)
        prompt = _prompt(messages[prompt_id], fmt)
        for i, j in _interleave(len(good), len(bad), max_per_prompt):
            pairs.append(
                Pair(
                    prompt,
                    _completion(good.iloc[i], fmt, prompt),
                    _completion(bad.iloc[j], fmt, prompt),
                )
            )
    if not pairs:
        raise PreferenceDataError(
            f"no prompt of run {run['id']} has samples on both sides: chosen "
            f"{int(chosen_mask.sum())}, rejected {int(rejected_mask.sum())} of {len(frame)}"
        )
    meta = {
        "built_from": {
            "run_id": int(run["id"]),
            "run_name": run["name"],
            "spec_hash": run["spec_hash"],
            "seed": int(run["seed"]),
        },
        "chosen_rule": chosen,
        "rejected_rule": rejected,
        "completion": completion,
        "max_per_prompt": max_per_prompt,
        "matched": {"chosen": int(chosen_mask.sum()), "rejected": int(rejected_mask.sum())},
        "cells": cells,
    }
    return PairSet(pairs, meta)


def _run_frame(db: Any, run_id: int | None) -> tuple[Any, Any]:
    """The run (default: the latest) and its samples, with `valid` and each score as a
    column, for the rules to read."""
    from muestra.experiments.results import samples_frame
    from muestra.experiments.store import latest_run, run_by_id

    try:
        run = run_by_id(db, run_id) if run_id else latest_run(db)
    except InputError as err:
        raise PreferenceDataError(str(err)) from None
    frame = samples_frame(db, int(run["id"]))
    if frame.empty:
        raise PreferenceDataError(f"run {run['id']} ({run['name']}) has no samples")
    frame["valid"] = frame["error"].isna()
    if frame["scores"].notna().any():
        for key in sorted({k for s in frame["scores"].dropna() for k in s if k != "logliks"}):
            frame[key] = [s.get(key) if isinstance(s, dict) else None for s in frame["scores"]]
    return run, frame


def _matches(frame: Any, rule: str, side: str) -> Any:
    try:
        picked = frame.query(rule, engine="python")
    except Exception as err:  # pandas raises many kinds for a bad expression
        columns = ", ".join(c for c in frame.columns if c not in ("field_probs", "scores"))
        raise PreferenceDataError(
            f"the {side} rule {rule!r} does not evaluate: {err}. Columns: {columns} "
            "(quote names that are Python words with backticks, e.g. `class` == 'Tank')"
        ) from err
    return frame.index.isin(picked.index)


def _interleave(n_good: int, n_bad: int, cap: int) -> list[tuple[int, int]]:
    """(i, j) index pairs of the cross product ordered by round: round r pairs i with
    (i + r) mod n_bad, so each sample appears once per round before any repeats."""
    out = []
    for r in range(n_bad):
        for i in range(n_good):
            out.append((i, (i + r) % n_bad))
            if len(out) >= cap:
                return out
    return out


def _prompt(messages: Text, fmt: Reasoning | None) -> Text:
    from muestra.answers.phases import with_instruction

    if fmt is not None and fmt.instruction is not None:
        return with_instruction(messages, fmt.instruction)
    return messages


def _completion(row: Any, fmt: Reasoning | None, prompt: Text) -> Text:
    answer = row["answer_text"]
    if fmt is None or not isinstance(row["reasoning"], str):
        text = answer
    else:
        text = f"{fmt.open_text}{row['reasoning']}{fmt.close_text}{answer}"
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]
