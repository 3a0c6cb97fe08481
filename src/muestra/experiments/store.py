"""The experiment store: one SQLite file, schema only through numbered migrations.

Tables: `runs` (spec text and hash, muestra version), `models` (id and provenance),
`conditions` (sweep overrides and the resolved phase settings), `prompts` (messages,
variables, group/variant) and `samples` (one row per finished sample: seed, phase
settings, reasoning, answer, field probabilities, finish reason, error, token counts,
timings). WAL mode; each finished batch is written in one transaction, so a crash or
`kill -9` loses at most the batch in flight and never leaves half a batch.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from muestra.errors import InputError

MIGRATIONS: list[tuple[str, Callable[[sqlite3.Connection], None]]] = []


def migration(name: str) -> Callable[[Callable[[sqlite3.Connection], None]], Any]:
    def register(fn: Callable[[sqlite3.Connection], None]) -> Any:
        MIGRATIONS.append((name, fn))
        return fn

    return register


@migration("m001_initial")
def _m001(db: sqlite3.Connection) -> None:
    db.executescript(
        """
        CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            spec_path TEXT NOT NULL,
            spec_text TEXT NOT NULL,
            spec_hash TEXT NOT NULL,
            seed INTEGER NOT NULL,
            muestra_version TEXT NOT NULL,
            created_at TEXT NOT NULL
        );
        CREATE TABLE models (
            id INTEGER PRIMARY KEY,
            run_id INTEGER NOT NULL REFERENCES runs(id),
            label TEXT NOT NULL,
            model_ref TEXT NOT NULL,
            provenance_json TEXT,
            UNIQUE (run_id, label)
        );
        CREATE TABLE conditions (
            id INTEGER PRIMARY KEY,
            run_id INTEGER NOT NULL REFERENCES runs(id),
            label TEXT NOT NULL,
            overrides_json TEXT NOT NULL,
            think_json TEXT,
            answer_json TEXT NOT NULL,
            UNIQUE (run_id, label)
        );
        CREATE TABLE prompts (
            id INTEGER PRIMARY KEY,
            run_id INTEGER NOT NULL REFERENCES runs(id),
            prompt_index INTEGER NOT NULL,
            prompt_key TEXT NOT NULL,
            messages_json TEXT NOT NULL,
            variables_json TEXT NOT NULL,
            group_name TEXT,
            variant TEXT,
            UNIQUE (run_id, prompt_key)
        );
        CREATE TABLE samples (
            id INTEGER PRIMARY KEY,
            run_id INTEGER NOT NULL REFERENCES runs(id),
            model_id INTEGER NOT NULL REFERENCES models(id),
            condition_id INTEGER NOT NULL REFERENCES conditions(id),
            prompt_id INTEGER NOT NULL REFERENCES prompts(id),
            sample_index INTEGER NOT NULL,
            seed INTEGER NOT NULL,
            think_budget INTEGER,
            reasoning TEXT,
            think_tokens INTEGER NOT NULL,
            budget_hit INTEGER NOT NULL,
            answer_text TEXT NOT NULL,
            answer_json TEXT,
            field_probs_json TEXT,
            finish_reason TEXT NOT NULL,
            error TEXT,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            batch_seconds REAL NOT NULL,
            muestra_version TEXT NOT NULL,
            created_at TEXT NOT NULL,
            UNIQUE (model_id, condition_id, prompt_id, sample_index)
        );
        CREATE INDEX samples_by_cell ON samples (run_id, model_id, condition_id, prompt_id);
        """
    )


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def connect(path: Path, create: bool = True) -> sqlite3.Connection:
    """Open (and migrate) the store at `path`; errors say what is wrong with the path."""
    path = Path(path)
    if not create and not path.is_file():
        raise InputError(f"store {path} does not exist; run `muestra run SPEC.toml --out {path}`")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA foreign_keys=ON")
        migrate(db)
    except (sqlite3.OperationalError, OSError) as err:
        raise InputError(
            f"cannot open the store {path} for writing ({err}); choose a writable path with --out"
        ) from err
    db.row_factory = sqlite3.Row
    return db


def migrate(db: sqlite3.Connection) -> list[str]:
    """Apply the migrations not yet applied, in order; returns their names."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS _migrations (id INTEGER PRIMARY KEY, name TEXT UNIQUE, "
        "applied_at TEXT)"
    )
    done = {row[0] for row in db.execute("SELECT name FROM _migrations")}
    applied = []
    for name, fn in MIGRATIONS:
        if name in done:
            continue
        with db:
            fn(db)
            db.execute("INSERT INTO _migrations (name, applied_at) VALUES (?, ?)", (name, now()))
        applied.append(name)
    return applied


def dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


def latest_run(db: sqlite3.Connection) -> sqlite3.Row:
    row = db.execute("SELECT * FROM runs ORDER BY id DESC LIMIT 1").fetchone()
    if row is None:
        raise InputError("the store holds no run yet; start one with `muestra run SPEC.toml`")
    return row


def insert_samples(db: sqlite3.Connection, rows: Iterable[dict[str, Any]]) -> int:
    """Write finished samples in one transaction; already stored ones are left as they are."""
    rows = list(rows)
    if not rows:
        return 0
    columns = list(rows[0])
    sql = (
        f"INSERT OR IGNORE INTO samples ({', '.join(columns)}) "
        f"VALUES ({', '.join('?' for _ in columns)})"
    )
    try:
        with db:
            cursor = db.executemany(sql, [tuple(r[c] for c in columns) for r in rows])
    except sqlite3.OperationalError as err:
        raise InputError(
            f"cannot write to the store ({err}); nothing of this batch was stored"
        ) from err
    return cursor.rowcount
