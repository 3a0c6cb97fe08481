"""The experiment store: one SQLite file, schema only through numbered migrations.

Tables: `runs` (spec text and hash, muestra version), `models` (id and provenance),
`conditions` (sweep overrides and the resolved phase settings), `prompts` (messages,
variables, group/variant) and `samples` (one row per finished sample: seed, phase
settings, reasoning, answer, field probabilities, finish reason, error, token counts,
timings, and the rank and scores of a beam-searched phase). WAL mode; each finished
batch is written in one transaction, so a crash or `kill -9` loses at most the batch in
flight and never leaves half a batch.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from muestra.errors import InputError, StoreError
from muestra.version import __version__

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


@migration("m002_beams")
def _m002(db: sqlite3.Connection) -> None:
    # beam-searched phases: {"think"|"answer": {"rank", "score", "sum_logprob", ...}}
    db.execute("ALTER TABLE samples ADD COLUMN beam_json TEXT")


@migration("m003_evals")
def _m003(db: sqlite3.Connection) -> None:
    # per-sample scores that are not an answer, e.g. log-likelihoods of each option:
    # {"logliks": {"A": -1.2, ...}, "bytes": {"A": 2, ...}}
    db.execute("ALTER TABLE samples ADD COLUMN scores_json TEXT")
    # a run made by `muestra eval`: the task and how it is scored
    db.execute(
        """
        CREATE TABLE evals (
            run_id INTEGER PRIMARY KEY REFERENCES runs(id),
            method TEXT NOT NULL,
            task_name TEXT NOT NULL,
            task_source TEXT NOT NULL,
            task_hash TEXT NOT NULL,
            settings_json TEXT NOT NULL,
            timing_json TEXT
        )
        """
    )


@migration("m004_probes")
def _m004(db: sqlite3.Connection) -> None:
    # a run made by `muestra probe`: the probe file it sampled (scores live in scores_json)
    db.execute(
        """
        CREATE TABLE probes (
            run_id INTEGER PRIMARY KEY REFERENCES runs(id),
            name TEXT NOT NULL,
            probe_path TEXT NOT NULL,
            probe_text TEXT NOT NULL,
            probe_hash TEXT NOT NULL
        )
        """
    )


@migration("m005_run_status")
def _m005(db: sqlite3.Connection) -> None:
    # what became of a run: running, failed (with its reason) or done; NULL for runs
    # stored before muestra kept it
    db.execute("ALTER TABLE runs ADD COLUMN status TEXT")
    db.execute("ALTER TABLE runs ADD COLUMN status_reason TEXT")
    db.execute("ALTER TABLE runs ADD COLUMN finished_at TEXT")
    # a probe's judge: the id of the run whose samples it judges
    db.execute("ALTER TABLE runs ADD COLUMN judges INTEGER REFERENCES runs(id)")
    # the endpoint (base URL) that produced a remote sample; NULL for a local one
    db.execute("ALTER TABLE samples ADD COLUMN endpoint TEXT")


@migration("m006_run_seeding_schema")
def _m006(db: sqlite3.Connection) -> None:
    # how the run derives its samples' seeds (`engine.seeds.SEEDING`); NULL for runs stored
    # before muestra kept it, which resume on the scheme they started with ("prompt")
    db.execute("ALTER TABLE runs ADD COLUMN seeding TEXT")
    # the resolved JSON Schema of the answers (the spec may name a file that moves)
    db.execute("ALTER TABLE runs ADD COLUMN answer_schema_json TEXT")


@migration("m007_stops")
def _m007(db: sqlite3.Connection) -> None:
    # a sequential run: the [stop] rule it samples under (a resumed run must keep it) and,
    # per model × condition × prompt cell, why and after how many samples it stopped
    db.execute("ALTER TABLE runs ADD COLUMN stop_json TEXT")
    db.execute(
        """
        CREATE TABLE stops (
            id INTEGER PRIMARY KEY,
            run_id INTEGER NOT NULL REFERENCES runs(id),
            model_id INTEGER NOT NULL REFERENCES models(id),
            condition_id INTEGER NOT NULL REFERENCES conditions(id),
            prompt_id INTEGER NOT NULL REFERENCES prompts(id),
            tracked TEXT NOT NULL,
            estimator TEXT NOT NULL,
            reason TEXT NOT NULL,
            samples INTEGER NOT NULL,
            used INTEGER NOT NULL,
            estimate REAL,
            low REAL NOT NULL,
            high REAL NOT NULL,
            created_at TEXT NOT NULL,
            UNIQUE (model_id, condition_id, prompt_id)
        )
        """
    )


@migration("m008_memory_plans")
def _m008(db: sqlite3.Connection) -> None:
    # each local model's memory plan (experiments/planning.py), one row per invocation that
    # sampled it (a resumed run may have another budget): weights, KV per row, rows at once,
    # expected peak, the budget and where it came from
    db.execute(
        """
        CREATE TABLE memory_plans (
            id INTEGER PRIMARY KEY,
            run_id INTEGER NOT NULL REFERENCES runs(id),
            model_id INTEGER NOT NULL REFERENCES models(id),
            plan_json TEXT NOT NULL,
            created_at TEXT NOT NULL
        )
        """
    )


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def schema_version() -> int:
    """The store schema this muestra writes: the number of migrations it knows."""
    return len(MIGRATIONS)


class StoreConnection(sqlite3.Connection):
    """A connection that knows its file and holds the writer's lock until closed."""

    path: Path
    lock: IO[str] | None = None

    def close(self) -> None:
        super().close()
        if self.lock is not None:
            self.lock.seek(0)
            self.lock.truncate()  # a lock file left behind is empty: nobody holds it
            self.lock.close()  # closing the descriptor releases the lock
            self.lock = None


def connect(path: Path, create: bool = True) -> StoreConnection:
    """Open the store at `path`; every failure is a `StoreError` naming the file.

    create=True, the writer (`muestra run`): create the store if missing, take its lock
    (one writer per store, see `_lock`), refuse a damaged file or a newer schema, and
    migrate an older one. create=False, the readers: the store must exist and is opened
    read-only (`mode=ro`) and never written, so a store on read-only media can be read;
    one that needs a migration is migrated first if it can be written.
    """
    path = Path(path)
    if create:
        return _open_writer(path)
    if not path.is_file():
        raise StoreError(f"store {path} does not exist; run `muestra run SPEC.toml --out {path}`")
    db = _open_reader(path)
    try:
        version = _version_of(db, path)
    except (StoreError, sqlite3.DatabaseError) as err:
        db.close()
        if isinstance(err, sqlite3.DatabaseError):
            raise _damaged(path, err) from err
        raise
    if version < schema_version():
        db.close()
        try:
            _open_writer(path).close()
        except StoreError as err:
            raise StoreError(
                f"store {path} has schema version {version} and this muestra reads version "
                f"{schema_version()}; it must be migrated first, which writes to it, and that "
                f"failed ({err.__cause__ or err}). Read a copy in a writable folder."
            ) from err
        db = _open_reader(path)
    return db


@contextmanager
def reading(path: Path) -> Iterator[StoreConnection]:
    """A read-only connection for one block of reads, closed after it; sqlite3's verdict on
    a damaged file, whether at open or mid-read, becomes one `StoreError` naming it."""
    db = connect(path, create=False)
    try:
        yield db
    except sqlite3.DatabaseError as err:
        raise _damaged(Path(path), err) from err
    finally:
        db.close()


def _open_writer(path: Path) -> StoreConnection:
    """Lock, open, check and migrate the store at `path` for writing."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        new_lock = not lock_path.exists()
        lock = _lock(path)
    except OSError as err:
        raise _unwritable(path, err) from err
    db = None
    try:
        db = sqlite3.connect(path, timeout=30, factory=StoreConnection)
        db.path, db.lock = path, lock
        _version_of(db, path)  # 1. refuse what this muestra must not touch, before any write
        problems = [row[0] for row in db.execute("PRAGMA quick_check(3)")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError("; ".join(problems))
        db.execute("PRAGMA journal_mode=WAL")  # 2. then set up and migrate
        db.execute("PRAGMA foreign_keys=ON")
        migrate(db)
    except BaseException as err:
        if db is not None:
            db.close()
        lock.close()
        if new_lock:  # a path that is not a store keeps no lock file beside it
            lock_path.unlink(missing_ok=True)
        if isinstance(err, sqlite3.OperationalError):
            raise _unwritable(path, err) from err
        if isinstance(err, sqlite3.DatabaseError):
            raise _damaged(path, err) from err
        raise
    db.row_factory = sqlite3.Row
    return db


def _open_reader(path: Path) -> StoreConnection:
    """Open the store read-only. WAL mode needs a `-shm` file beside the store; on a
    read-only folder where none can be made, a store with no `-wal` (nothing
    uncheckpointed) is opened as immutable, which needs none."""
    uri = f"{path.resolve().as_uri()}?mode=ro"
    wal = path.with_name(path.name + "-wal")
    for attempt in (uri, f"{uri}&immutable=1"):
        try:
            db = sqlite3.connect(attempt, uri=True, timeout=30, factory=StoreConnection)
            db.path = path
            db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError as err:
            if attempt == uri and not wal.exists():
                continue
            raise StoreError(f"cannot read the store {path} (sqlite3: {err})") from err
        except sqlite3.DatabaseError as err:
            raise _damaged(path, err) from err
        db.row_factory = sqlite3.Row
        return db
    raise AssertionError("unreachable: the immutable attempt returns or raises")


def _version_of(db: sqlite3.Connection, path: Path) -> int:
    """The store's schema version; a version above this muestra's is refused. Stores
    written before `user_version` was kept count their applied migrations instead."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    bookkept = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_migrations'"
    if not version and db.execute(bookkept).fetchone():
        (version,) = db.execute("SELECT COUNT(*) FROM _migrations").fetchone()
    if version > schema_version():
        raise StoreError(
            f"store {path} has schema version {version}, written by a newer muestra; this "
            f"muestra ({__version__}) knows versions up to {schema_version()}. Upgrade "
            "muestra to read or extend it."
        )
    return int(version)


@contextmanager
def scratch_copy(path: Path) -> Iterator[Path]:
    """A temporary copy of the store at `path` (a fresh path when there is none yet),
    removed afterwards: what `muestra run --dry-run` plans on, so it writes nothing."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="muestra-dry-run-") as folder:
        scratch = Path(folder) / Path(path).name
        if Path(path).exists():
            source = connect(Path(path), create=False)
            target = sqlite3.connect(scratch)
            try:
                source.backup(target)
            finally:
                target.close()
                source.close()
        yield scratch


def _lock(path: Path) -> IO[str]:
    """Take the store's writer lock: a POSIX lock (lockf) on `STORE.lock`, which holds the
    owner's pid. It is held per process: a second process is refused, while one process
    may reopen its own store (a notebook running a spec twice). The OS drops the lock when
    its holder exits, even on `kill -9`, so a leftover file never blocks anyone; it is left
    in place because deleting a lock file races with the next process that opens it."""
    import errno
    import fcntl

    handle = open(path.with_name(path.name + ".lock"), "a+", encoding="utf-8")  # noqa: SIM115
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        if err.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        raise StoreError(
            f"store {path} is in use by {holder}; one command writes to a store at a time. "
            "Wait for it to finish, or choose another --out."
        ) from None  # the errno ("resource temporarily unavailable") would only mislead
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} ({_command()} since {now()})\n")
    handle.flush()
    return handle


def _command() -> str:
    """What holds the store: `muestra probe` etc. (the Python API: its script's name)."""
    import sys

    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    verb = sys.argv[1] if name == "muestra" and len(sys.argv) > 1 else None
    return f"muestra {verb}" if verb else name


def _unwritable(path: Path, err: Exception) -> StoreError:
    return StoreError(
        f"cannot open the store {path} for writing ({err}); choose a writable path with --out"
    )


def _damaged(path: Path, err: sqlite3.DatabaseError) -> StoreError:
    return StoreError(
        f"store {path} is damaged or not a muestra store (sqlite3: {err}); restore it from a "
        "copy, or choose another path"
    )


def migrate(db: sqlite3.Connection) -> list[str]:
    """Apply the migrations not yet applied, in order, each with its schema version in
    `PRAGMA user_version`; returns their names."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS _migrations (id INTEGER PRIMARY KEY, name TEXT UNIQUE, "
        "applied_at TEXT)"
    )
    done = {row[0] for row in db.execute("SELECT name FROM _migrations")}
    applied = []
    for version, (name, fn) in enumerate(MIGRATIONS, start=1):
        if name in done:
            continue
        with db:
            fn(db)
            db.execute("INSERT INTO _migrations (name, applied_at) VALUES (?, ?)", (name, now()))
            db.execute(f"PRAGMA user_version = {version}")
        applied.append(name)
    if db.execute("PRAGMA user_version").fetchone()[0] != schema_version():
        db.execute(f"PRAGMA user_version = {schema_version()}")  # a store from before it was kept
    return applied


def dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


def latest_run(db: sqlite3.Connection) -> sqlite3.Row:
    """The store's latest run that is not a probe's judge (a judge's answers live in the
    judged samples' scores, so the probe's run is what `summary`, `analyze`, `export` and
    `report` read by default)."""
    judges = {
        row[0]
        for row in db.execute(
            "SELECT DISTINCT json_extract(scores_json, '$.judge.run') FROM samples "
            "WHERE scores_json LIKE '%\"judge\"%'"
        )
    }  # stores from before `runs.judges`: the judge runs their scores name
    if "judges" in {row[1] for row in db.execute("PRAGMA table_info(runs)")}:
        judges |= {row[0] for row in db.execute("SELECT id FROM runs WHERE judges IS NOT NULL")}
    for row in db.execute("SELECT * FROM runs ORDER BY id DESC"):
        if row["id"] not in judges:
            return row
    raise InputError("the store holds no run yet; start one with `muestra run SPEC.toml`")


def mark_run(db: sqlite3.Connection, run_id: int, status: str, reason: str | None = None) -> None:
    """Record what became of run `run_id`: "running", "failed" (with `reason`) or "done"."""
    assert status in ("running", "failed", "done"), status
    with db:
        db.execute(
            "UPDATE runs SET status = ?, status_reason = ?, finished_at = ? WHERE id = ?",
            (status, reason, None if status == "running" else now(), run_id),
        )


def mark_judge(db: sqlite3.Connection, judge_run: int, run_id: int) -> None:
    """Record that run `judge_run` is the judge of run `run_id`'s samples."""
    with db:
        db.execute("UPDATE runs SET judges = ? WHERE id = ?", (run_id, judge_run))


def run_state(db: sqlite3.Connection, run: sqlite3.Row | int) -> tuple[str, str | None]:
    """(status, what to tell a reader) of a run: "done" (None), "failed" (its reason),
    "running" (a live process holds the store), "stopped" (it was running and its process
    is gone: killed, or the machine stopped), "unknown" (stored before statuses, None)."""
    if isinstance(run, int):
        run = db.execute("SELECT * FROM runs WHERE id = ?", (run,)).fetchone()
    keys = run.keys()
    status = run["status"] if "status" in keys else None
    if status is None:
        return "unknown", None
    if status == "done":
        return "done", None
    if status == "failed":
        return "failed", run["status_reason"] or "no reason recorded"
    holder = _writer(Path(getattr(db, "path", "")))
    if holder:
        return "running", f"still running in {holder}"
    return "stopped", "its process ended before it finished (killed, or the machine stopped)"


def unfinished_warning(db: sqlite3.Connection, run: sqlite3.Row | int) -> str | None:
    """One line for a reader of a run that is not finished ("done" or from before
    statuses were kept: None): what happened, and that its results are partial."""
    status, reason = run_state(db, run)
    if status in ("done", "unknown"):
        return None
    run_id = run if isinstance(run, int) else run["id"]
    return (
        f"run {run_id} is not finished — {status}: {reason}. What follows is a partial "
        "result; run the same command again to resume it."
    )


def require_samples(db: sqlite3.Connection, run: sqlite3.Row | int) -> None:
    """Refuse to show a run with no sample at all (a run that failed or was stopped
    before its first batch): there is nothing to count, test or export."""
    run_id = run if isinstance(run, int) else int(run["id"])
    (count,) = db.execute("SELECT COUNT(*) FROM samples WHERE run_id = ?", (run_id,)).fetchone()
    if count:
        return
    status, reason = run_state(db, run_id)
    said = {"unknown": "", "done": ""}.get(status, f" — {status}: {reason}")
    raise InputError(
        f"run {run_id} of {getattr(db, 'path', 'the store')} has no samples{said}; there is "
        "nothing to show. Run the command that made it again (it resumes the run)."
    )


def _writer(path: Path) -> str | None:
    """Who holds the store's writer lock, if anyone ("process 123 (muestra run …)")."""
    import errno
    import fcntl

    lock = path.with_name(path.name + ".lock")
    if not path.name or not lock.is_file():
        return None
    try:
        holder = lock.read_text("utf-8").strip()
    except OSError:
        return None
    if not holder:
        return None  # truncated on release
    if holder.startswith(f"process {os.getpid()} "):
        return holder  # this process: probing would release its own lock
    try:
        with open(lock, encoding="utf-8") as handle:
            fcntl.lockf(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as err:
        return holder if err.errno in (errno.EACCES, errno.EAGAIN) else None
    return None


def run_by_id(db: sqlite3.Connection, run_id: int | None) -> sqlite3.Row:
    """Run `run_id` of the store (None: `latest_run`); a missing id lists the runs."""
    if run_id is None:
        return latest_run(db)
    row = db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
    if row is None:
        runs = ", ".join(f"{r['id']} ({r['name']})" for r in db.execute("SELECT * FROM runs"))
        raise InputError(f"--run {run_id}: no such run in {getattr(db, 'path', 'the store')}; "
                         f"it holds {runs or 'none'}")  # fmt: skip
    return row


# ---- a run's rows, as the runner opens, resumes and discards them ------------------------


def newest_run(db: sqlite3.Connection, spec_hash: str | None = None) -> sqlite3.Row | None:
    """The store's newest run (of the spec with `spec_hash`, when given); None: none."""
    if spec_hash is None:
        return db.execute("SELECT * FROM runs ORDER BY id DESC LIMIT 1").fetchone()
    return db.execute(
        "SELECT * FROM runs WHERE spec_hash = ? ORDER BY id DESC LIMIT 1", (spec_hash,)
    ).fetchone()


def insert_run(
    db: sqlite3.Connection,
    name: str,
    spec_path: str,
    spec_text: str,
    spec_hash: str,
    seed: int,
    seeding: str | None = None,
    answer_schema: dict[str, Any] | None = None,
) -> int:
    with db:
        cursor = db.execute(
            "INSERT INTO runs (name, spec_path, spec_text, spec_hash, seed, muestra_version, "
            "created_at, seeding, answer_schema_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (name, spec_path, spec_text, spec_hash, seed, __version__, now(), seeding,
             dumps(answer_schema)),
        )  # fmt: skip
    return int(cursor.lastrowid or 0)


RUN_TABLES = ("models", "conditions", "prompts")


def upsert(db: sqlite3.Connection, table: str, key: dict[str, Any], values: dict[str, Any]) -> int:
    """The id of the `table` row with `key` (one of a run's models, conditions, prompts),
    inserted with `values` when absent (an existing row is kept as it is)."""
    assert table in RUN_TABLES, table
    where = " AND ".join(f"{k} = ?" for k in key)
    row = db.execute(f"SELECT id FROM {table} WHERE {where}", tuple(key.values())).fetchone()
    if row is not None:
        return int(row[0])
    columns = {**key, **values}
    with db:
        cursor = db.execute(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
            f"({', '.join('?' for _ in columns)})",
            tuple(columns.values()),
        )
    return int(cursor.lastrowid or 0)


def condition_think(db: sqlite3.Connection, condition_id: int) -> str | None:
    return db.execute("SELECT think_json FROM conditions WHERE id = ?", (condition_id,)).fetchone()[
        0
    ]


def model_provenance(db: sqlite3.Connection, model_id: int) -> str | None:
    return db.execute("SELECT provenance_json FROM models WHERE id = ?", (model_id,)).fetchone()[0]


def set_model_provenance(db: sqlite3.Connection, model_id: int, data: dict[str, Any]) -> None:
    with db:
        db.execute("UPDATE models SET provenance_json = ? WHERE id = ?", (dumps(data), model_id))


def record_memory_plan(
    db: sqlite3.Connection, run_id: int, model_id: int, plan: Mapping[str, Any]
) -> None:
    with db:
        db.execute(
            "INSERT INTO memory_plans (run_id, model_id, plan_json, created_at) "
            "VALUES (?, ?, ?, ?)",
            (run_id, model_id, dumps(dict(plan)), now()),
        )


def memory_plans(db: sqlite3.Connection, run_id: int) -> list[dict[str, Any]]:
    """The memory plans of a run, oldest first: each plan with its model's label."""
    rows = db.execute(
        "SELECT m.label, p.plan_json, p.created_at FROM memory_plans p "
        "JOIN models m ON m.id = p.model_id WHERE p.run_id = ? ORDER BY p.id",
        (run_id,),
    )
    return [{"model": label, **json.loads(plan), "created_at": at} for label, plan, at in rows]


def stored_indices(
    db: sqlite3.Connection, model_id: int, condition_id: int, prompt_id: int
) -> set[int]:
    """The sample indices stored for one model × condition × prompt cell."""
    return {
        row[0]
        for row in db.execute(
            "SELECT sample_index FROM samples WHERE model_id = ? AND condition_id = ? AND "
            "prompt_id = ?",
            (model_id, condition_id, prompt_id),
        )
    }


def run_exists(db: sqlite3.Connection, run_id: int) -> bool:
    return db.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is not None


def discard_run(db: sqlite3.Connection, run_id: int) -> bool:
    """Delete a run that stored no sample, with its rows; False (nothing deleted) if it has
    samples."""
    with db:
        if db.execute("SELECT count(*) FROM samples WHERE run_id = ?", (run_id,)).fetchone()[0]:
            return False
        for table in (
            "stops",
            "memory_plans",
            *RUN_TABLES,
            "evals",
            "probes",
        ):  # every table naming the run
            db.execute(f"DELETE FROM {table} WHERE run_id = ?", (run_id,))
        db.execute("UPDATE runs SET judges = NULL WHERE judges = ?", (run_id,))
        db.execute("DELETE FROM runs WHERE id = ?", (run_id,))
    return True


# ---- what the layers above read and write (every statement lives in this module) --------


def cell_answers(
    db: sqlite3.Connection, model_id: int, condition_id: int, prompt_id: int
) -> list[sqlite3.Row]:
    """One cell's samples (index, answer, its text, field_probs, error), in index order."""
    return db.execute(
        "SELECT sample_index, answer_json, answer_text, field_probs_json, error FROM samples "
        "WHERE model_id = ? AND condition_id = ? AND prompt_id = ? ORDER BY sample_index",
        (model_id, condition_id, prompt_id),
    ).fetchall()


STOP_COLUMNS = [
    "run_id",
    "model_id",
    "condition_id",
    "prompt_id",
    "tracked",
    "estimator",
    "reason",
    "samples",
    "used",
    "estimate",
    "low",
    "high",
]


def has_field_probs(db: sqlite3.Connection, condition_id: int) -> bool:
    """Whether any sample of a condition stored field_probs."""
    return (
        db.execute(
            "SELECT 1 FROM samples WHERE condition_id = ? AND field_probs_json IS NOT NULL "
            "AND field_probs_json != '{}' AND field_probs_json != 'null' LIMIT 1",
            (condition_id,),
        ).fetchone()
        is not None
    )


def record_stop(db: sqlite3.Connection, stop: Mapping[str, Any]) -> None:
    """Write one cell's stop (`STOP_COLUMNS`), in its own transaction."""
    values = [stop[c] for c in STOP_COLUMNS]
    estimate = STOP_COLUMNS.index("estimate")
    if values[estimate] != values[estimate]:  # NaN: no valid sample yet
        values[estimate] = None
    with db:
        db.execute(
            f"INSERT INTO stops ({', '.join(STOP_COLUMNS)}, created_at) "
            f"VALUES ({', '.join('?' for _ in STOP_COLUMNS)}, ?)",
            (*values, now()),
        )


def stored_stops(db: sqlite3.Connection, run_id: int) -> list[sqlite3.Row]:
    """A run's stops with their cells' labels, in the order a run plans its cells."""
    return db.execute(
        """
        SELECT t.*, m.label AS model_label, c.label AS condition_label, p.prompt_key
        FROM stops t JOIN models m ON m.id = t.model_id
        JOIN conditions c ON c.id = t.condition_id JOIN prompts p ON p.id = t.prompt_id
        WHERE t.run_id = ? ORDER BY m.id, c.id, p.prompt_index
        """,
        (run_id,),
    ).fetchall()


def run_stop_rule(db: sqlite3.Connection, run_id: int) -> str | None:
    return db.execute("SELECT stop_json FROM runs WHERE id = ?", (run_id,)).fetchone()[0]


def set_run_stop_rule(db: sqlite3.Connection, run_id: int, rule: str | None) -> None:
    with db:
        db.execute("UPDATE runs SET stop_json = ? WHERE id = ?", (rule, run_id))


SAMPLE_ORDERS = {
    "run": "m.id, c.id, p.prompt_index, s.sample_index",  # as a run plans them
    "written": "s.id",
    "prompt": "p.prompt_index, s.sample_index",
}


def sample_rows(
    db: sqlite3.Connection, run_id: int, first: int | None = None, order: str = "run"
) -> list[sqlite3.Row]:
    """A run's samples with their prompt, model and condition labels, in one of
    `SAMPLE_ORDERS`; `first`: only samples with an index below it."""
    return db.execute(
        f"""
        SELECT s.*, p.prompt_key, p.messages_json, p.variables_json, p.group_name, p.variant,
               m.label AS model_label, c.label AS condition_label
        FROM samples s JOIN prompts p ON p.id = s.prompt_id
        JOIN models m ON m.id = s.model_id JOIN conditions c ON c.id = s.condition_id
        WHERE s.run_id = ? AND s.sample_index < ? ORDER BY {SAMPLE_ORDERS[order]}
        """,
        (run_id, first if first is not None else 2**62),
    ).fetchall()


def count_samples(db: sqlite3.Connection, run_id: int | None) -> int:
    """The samples of run `run_id` (None: the newest run)."""
    return db.execute(
        "SELECT COUNT(*) FROM samples WHERE run_id = COALESCE(?, (SELECT MAX(id) FROM runs))",
        (run_id,),
    ).fetchone()[0]


def merge_scores(db: sqlite3.Connection, run_id: int, scores: Mapping[int, dict[str, Any]]) -> int:
    """Add `scores[sample id]` to each sample's scores (other keys are kept), in one
    transaction; ids that are not samples of `run_id` are skipped. The number written."""
    current = dict(db.execute("SELECT id, scores_json FROM samples WHERE run_id = ?", (run_id,)))
    updates = [
        (dumps({**(json.loads(current[i]) if current[i] else {}), **new}), i)
        for i, new in scores.items()
        if i in current
    ]
    with db:
        db.executemany("UPDATE samples SET scores_json = ? WHERE id = ?", updates)
    return len(updates)


def run_models(db: sqlite3.Connection, run_id: int) -> list[sqlite3.Row]:
    return db.execute("SELECT * FROM models WHERE run_id = ? ORDER BY id", (run_id,)).fetchall()


def latest_model_ref(db: sqlite3.Connection, run_id: int | None = None) -> str | None:
    """The model of run `run_id` (its first), else the store's newest model; None: none."""
    row = (
        db.execute("SELECT model_ref FROM models WHERE run_id = ? ORDER BY id", (run_id,))
        if run_id
        else db.execute("SELECT model_ref FROM models ORDER BY id DESC")
    ).fetchone()
    return row["model_ref"] if row else None


def prompt_rows(db: sqlite3.Connection, run_id: int) -> list[sqlite3.Row]:
    return db.execute(
        "SELECT * FROM prompts WHERE run_id = ? ORDER BY prompt_index", (run_id,)
    ).fetchall()


def condition_rows(db: sqlite3.Connection, run_id: int) -> list[sqlite3.Row]:
    return db.execute("SELECT * FROM conditions WHERE run_id = ? ORDER BY id", (run_id,)).fetchall()


def record_probe(
    db: sqlite3.Connection, run_id: int, name: str, path: str, text: str, digest: str
) -> None:
    """The probe file a run sampled (the latest one: its lexicons and settings are what
    the scores reflect)."""
    with db:
        db.execute(
            "INSERT OR REPLACE INTO probes (run_id, name, probe_path, probe_text, probe_hash) "
            "VALUES (?, ?, ?, ?, ?)",
            (run_id, name, path, text, digest),
        )


def probe_record(db: sqlite3.Connection, run_id: int) -> sqlite3.Row | None:
    """The probe row of a run (None: not a probe, or a store from before probes)."""
    try:
        return db.execute("SELECT * FROM probes WHERE run_id = ?", (run_id,)).fetchone()
    except sqlite3.OperationalError:
        return None


def record_eval(
    db: sqlite3.Connection, run_id: int, method: str, task: Any, settings_json: str | None
) -> None:
    """An evaluation's row (kept when it exists: a resumed evaluation is the same one)."""
    with db:
        db.execute(
            "INSERT OR IGNORE INTO evals (run_id, method, task_name, task_source, task_hash, "
            "settings_json) VALUES (?, ?, ?, ?, ?, ?)",
            (run_id, method, task.name, task.source, task.hash, settings_json),
        )


def eval_record(db: sqlite3.Connection, run_id: int | None) -> sqlite3.Row | None:
    """Evaluation `run_id` (None: the newest) with its run's spec text."""
    return db.execute(
        "SELECT e.*, r.spec_text FROM evals e JOIN runs r ON r.id = e.run_id "
        + ("WHERE e.run_id = ?" if run_id is not None else "ORDER BY e.run_id DESC LIMIT 1"),
        (run_id,) if run_id is not None else (),
    ).fetchone()


def eval_run_ids(db: sqlite3.Connection) -> list[int]:
    return [row[0] for row in db.execute("SELECT run_id FROM evals ORDER BY run_id")]


def set_eval_timing(db: sqlite3.Connection, run_id: int, timing: dict[str, Any]) -> None:
    with db:
        db.execute("UPDATE evals SET timing_json = ? WHERE run_id = ?", (dumps(timing), run_id))


def insert_samples(db: sqlite3.Connection, rows: Iterable[dict[str, Any]]) -> int:
    """Write finished samples in one transaction, all of them or none: if the store keeps
    fewer rows than given (a constraint refuses some, or they are already stored), the
    batch is rolled back and a `StoreError` says how many and why."""
    rows = list(rows)
    if not rows:
        return 0
    columns = list(rows[0])
    into = f"INTO samples ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})"
    values = [tuple(r[c] for c in columns) for r in rows]
    store = getattr(db, "path", "the store")
    try:
        with db:
            written = db.executemany(f"INSERT OR IGNORE {into}", values).rowcount
            if written < len(values):
                raise _Refused(written)
    except _Refused as refused:
        raise StoreError(
            f"{store} kept only {refused.written} of {len(values)} samples of this batch "
            f"(sqlite3: {_refusal(db, f'INSERT {into}', values)}); nothing of this batch was "
            "stored. A store changed by hand, or written by another program, cannot take "
            "this run: use another --out."
        ) from None
    except sqlite3.OperationalError as err:
        raise StoreError(
            f"cannot write to {store} ({err}); nothing of this batch was stored"
        ) from err
    except sqlite3.DatabaseError as err:
        raise _damaged(Path(store), err) from err
    return written


class _Refused(Exception):
    """Rolls back a batch the store did not keep in full."""

    def __init__(self, written: int) -> None:
        self.written = written


def _refusal(db: sqlite3.Connection, sql: str, values: list[tuple[Any, ...]]) -> str:
    """Why the store refuses rows that INSERT OR IGNORE skipped silently: sqlite3's own
    message for the first of them under a plain INSERT, undone before returning."""
    db.execute("SAVEPOINT refusal")
    try:
        for row in values:
            db.execute(sql, row)
    except sqlite3.DatabaseError as err:
        return str(err)
    finally:
        db.execute("ROLLBACK TO refusal")
        db.execute("RELEASE refusal")
    return "no reason given"
