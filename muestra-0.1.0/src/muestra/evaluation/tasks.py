"""Multiple-choice (and open) question sets as files.

A task is a JSONL, JSON, CSV or Parquet file, one question per row:

    {"id": "q01", "question": "What is 2 + 2?", "options": ["3", "4", "5", "22"],
     "answer": "B", "category": "arithmetic"}

`options` holds 2–10 choices, lettered A–J in order; `answer` is a letter (or
`answer_index`, 0-based); `category` is optional. A row without `options` is an open
question (`answer` is then the expected text, optional) — only `--method vote` takes those.
MMLU-Pro's and MMLU-ProX's published layouts are read as they are: `question_id`,
`options` as a list or `option_0` … `option_9` columns (trailing "N/A" padding dropped),
`answer` letter, `answer_index`, `category`.

Few-shot examples come from a dev file with the same columns: `--dev FILE`, else
`NAME.dev.jsonl` beside `NAME.jsonl` when it exists. `hf:OWNER/NAME[:CONFIG]` reads a
dataset already in the local Hugging Face cache (nothing is downloaded). The two sets that
ship with muestra are `easy-en` and `easy-es` (the same 40 easy questions in English and
Spanish, 5 categories, 4 options, 10 right answers per letter; 5 dev questions each).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from muestra.errors import InputError

LETTERS = "ABCDEFGHIJ"
DATA = Path(__file__).parent / "data"
SHIPPED = ("easy-en", "easy-es")
FORMATS = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Item:
    id: str
    question: str
    options: tuple[str, ...] | None  # None: an open question
    answer: str | None  # a letter, or an open question's expected text
    category: str | None = None

    @property
    def letters(self) -> tuple[str, ...]:
        return tuple(LETTERS[: len(self.options or ())])

    @property
    def answer_text(self) -> str | None:
        """The right option's text (an open question's expected answer)."""
        if self.options is None:
            return self.answer
        return self.options[LETTERS.index(self.answer)] if self.answer else None


@dataclass(frozen=True)
class Task:
    name: str
    source: str
    items: tuple[Item, ...]
    shots: tuple[Item, ...] = field(default=())
    hash: str = ""

    @property
    def open(self) -> bool:
        return any(item.options is None for item in self.items)

    @property
    def categories(self) -> list[str]:
        return sorted({i.category for i in self.items if i.category is not None})


def load_task(source: str | Path, dev: str | Path | None = None, split: str = "test") -> Task:
    """A task from a file, a shipped name (`easy-en`, `easy-es`) or `hf:OWNER/NAME[:CONFIG]`
    in the local Hugging Face cache; few-shot examples from `dev` or the file beside it."""
    text = str(source)
    if text.startswith("hf:"):
        return _from_hf_cache(text, split, dev)
    path = DATA / f"{text}.jsonl" if text in SHIPPED and not Path(text).exists() else Path(text)
    if not path.exists():
        raise InputError(
            f"task file {path} does not exist; give a .jsonl/.json/.csv/.parquet file, "
            f"one of the shipped sets ({', '.join(SHIPPED)}), or hf:OWNER/NAME[:CONFIG]"
        )
    if path.is_dir():
        raise InputError(f"task {path} is a folder; give a .jsonl/.json/.csv/.parquet file")
    items = parse_rows(_read_rows(path), str(path))
    if dev is not None and not Path(dev).exists():
        raise InputError(f"dev file {dev} does not exist")
    if dev is not None and Path(dev).is_dir():
        raise InputError(
            f"--dev {dev} is a folder; give the file of few-shot examples "
            "(.jsonl/.json/.csv/.parquet)"
        )
    dev_path = Path(dev) if dev is not None else _beside(path)
    shots = parse_rows(_read_rows(dev_path), str(dev_path)) if dev_path else ()
    name = path.name.removesuffix(path.suffix)
    digest = hashlib.sha256(path.read_bytes() + (dev_path.read_bytes() if dev_path else b""))
    return Task(name, str(path), items, shots, digest.hexdigest())


def _beside(path: Path) -> Path | None:
    candidate = path.with_name(path.name.removesuffix(path.suffix) + ".dev" + path.suffix)
    return candidate if candidate.exists() else None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise InputError(f"{path}: unknown task format {suffix!r}; use one of {FORMATS}")
    try:
        if suffix == ".jsonl":
            rows = []
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise InputError(f"{path}:{number}: not JSON ({err.msg})") from err
            return rows
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise InputError(f"{path}: expected a JSON list of questions")
            return data
        import pandas as pd

        # CSV cells stay text (an option "4" is not the number 4)
        frame = pd.read_csv(path, dtype=str) if suffix == ".csv" else pd.read_parquet(path)
        return [_plain(row) for row in frame.to_dict(orient="records")]
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err.reason})") from err
    except (OSError, ValueError) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"{path}: cannot read ({err})") from err


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """A pandas row as plain Python: NaN → None, numpy arrays → lists."""
    out = {}
    for key, value in row.items():
        if hasattr(value, "tolist"):
            value = value.tolist()
        if isinstance(value, float) and math.isnan(value):
            value = None
        out[str(key)] = value
    return out


def parse_rows(rows: list[Any], source: str) -> tuple[Item, ...]:
    if not rows:
        raise InputError(f"{source}: no questions")
    columns = {key for row in rows if isinstance(row, dict) for key in row}
    if columns and "question" not in columns:
        raise InputError(
            f"{source}: no `question` column; the columns found are {', '.join(sorted(columns))}. "
            "A question set needs id, question, options (or option_0 …) and answer."
        )
    items = [_item(row, f"{source}: row {number}") for number, row in enumerate(rows, 1)]
    ids = [item.id for item in items]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise InputError(f"{source}: question ids must be unique; repeated: {repeated[:5]}")
    return tuple(items)


def _item(row: Any, where: str) -> Item:
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected an object with id, question, options, answer")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise InputError(f"{where}: `question` must be non-empty text (got {question!r})")
    ident = row.get("id", row.get("question_id"))
    if ident is None or str(ident).strip() == "":
        raise InputError(f"{where}: missing `id` (or MMLU-Pro's `question_id`)")
    options = _options(row, where)
    category = row.get("category")
    answer = row.get("answer")
    if options is None:  # an open question
        return Item(
            str(ident),
            question,
            None,
            None if answer is None else str(answer),
            None if category is None else str(category),
        )
    letters = LETTERS[: len(options)]
    if answer is None and row.get("answer_index") is not None:
        index = row["answer_index"]
        index = int(index) if isinstance(index, str) and index.strip().isdigit() else index
        if not isinstance(index, int) or not 0 <= index < len(options):
            raise InputError(f"{where}: `answer_index` {index!r} is not 0–{len(options) - 1}")
        answer = letters[index]
    if not isinstance(answer, str) or answer.strip().upper() not in tuple(letters):
        raise InputError(
            f"{where}: `answer` must be one of the letters {', '.join(letters)} "
            f"(one per option, in order); got {answer!r}"
        )
    return Item(
        str(ident),
        question,
        tuple(options),
        answer.strip().upper(),
        None if category is None else str(category),
    )


def _options(row: dict[str, Any], where: str) -> list[str] | None:
    options = row.get("options")
    if options is None:
        numbered = [row[f"option_{i}"] for i in range(len(LETTERS)) if f"option_{i}" in row]
        options = numbered or None
    if options is None:
        return None
    if isinstance(options, str):  # a CSV cell holding a JSON list
        try:
            options = json.loads(options)
        except json.JSONDecodeError as err:
            raise InputError(
                f"{where}: `options` must be a list (got the text {options!r})"
            ) from err
    if not isinstance(options, list):
        raise InputError(f"{where}: `options` must be a list of texts (got {options!r})")
    while options and options[-1] in (None, "N/A"):  # MMLU-Pro v1.1 / ProX padding
        options = options[:-1]
    if not 2 <= len(options) <= len(LETTERS) or not all(isinstance(o, str) for o in options):
        raise InputError(
            f"{where}: `options` must hold 2–{len(LETTERS)} texts (got {len(options)}: "
            f"{str(options)[:120]})"
        )
    for index, option in enumerate(options):
        if not option.strip():
            raise InputError(f"{where}: option {LETTERS[index]} is empty; every option needs text")
    seen: dict[str, int] = {}
    for index, option in enumerate(options):
        if option.strip() in seen:
            first = LETTERS[seen[option.strip()]]
            raise InputError(
                f"{where}: options {first} and {LETTERS[index]} are the same text "
                f"({option.strip()[:60]!r}); a question cannot be scored when two options "
                "are one answer"
            )
        seen[option.strip()] = index
    return [str(o) for o in options]


def _from_hf_cache(source: str, split: str, dev: str | Path | None) -> Task:
    """`hf:OWNER/NAME[:CONFIG]` from the local Hugging Face hub cache, never downloaded:
    the parquet files of CONFIG (a folder of the dataset repo) and `split`; few-shot
    examples from its `validation` split unless `dev` is given."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, _, config = source.removeprefix("hf:").partition(":")
    try:
        cache = os.environ.get("HF_HUB_CACHE")  # read now, not at import
        root = Path(
            snapshot_download(repo, repo_type="dataset", local_files_only=True, cache_dir=cache)
        )
    except (LocalEntryNotFoundError, ValueError, OSError) as err:
        raise InputError(
            f"{source}: dataset {repo} is not in the local Hugging Face cache and muestra "
            "does not download datasets; fetch it on a machine with network "
            f"(`hf download {repo} --repo-type dataset`) or pass a local file"
        ) from err
    base = root / config if config else root

    def files(name: str) -> list[Path]:
        return sorted(p for p in base.rglob("*.parquet") if p.name.startswith(name))

    found = files(split)
    if not found:
        raise InputError(f"{source}: no {split}*.parquet under {base}")
    rows = [row for path in found for row in _read_rows(path)]
    items = parse_rows(rows, f"{source} ({split})")
    shot_rows = [r for p in files("validation") for r in _read_rows(p)] if dev is None else []
    shots = parse_rows(shot_rows, f"{source} (validation)") if shot_rows else ()
    if dev is not None:
        shots = parse_rows(_read_rows(Path(dev)), str(dev))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in found)).hexdigest()
    name = repo.split("/")[-1] + (f"-{config}" if config else "")
    return Task(name, source, items, shots, digest)
