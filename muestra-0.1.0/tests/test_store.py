"""The store protects itself: damaged files, newer schemas, read-only media, a second
writer and rows the store refuses each end in one line and exit code 2, never a
traceback or a silently short store."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import run_cli
from muestra.errors import StoreError
from muestra.experiments.store import connect, insert_samples, schema_version
from test_experiments import _store_of_answers, write_spec

READERS = ["summary", "export", "analyze", "report"]


def _command(name: str, store: Path, spec: Path, out: Path) -> list[str]:
    """`muestra NAME` on `store` as a user types it; outputs go to the folder `out`."""
    return {
        "run": ["run", str(spec), "--out", str(store)],
        "summary": ["summary", str(store)],
        "export": ["export", str(store), "--format", "csv", "-o", str(out / "x.csv")],
        "analyze": ["analyze", str(store)],
        "report": ["report", str(store), "-o", str(out / "r.html")],
    }[name]


@pytest.fixture(scope="module")
def intact(tiny_kit: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(spec, store) of one finished tiny run: 2 prompts × 1 sample."""
    folder = tmp_path_factory.mktemp("intact")
    spec = write_spec(folder, tiny_kit, samples=1)
    store = folder / "s.db"
    result = run_cli("run", str(spec), "--out", str(store))
    assert result.code == 0, result.stderr
    return spec, store


def _copy(store: Path, to: Path) -> Path:
    """A consistent copy of `store` (WAL content included) as one closed file."""
    to.parent.mkdir(parents=True, exist_ok=True)
    source, target = sqlite3.connect(store), sqlite3.connect(to)
    source.backup(target)
    source.close()
    target.close()
    return to


def _one_error_line(result, *needles: str) -> None:  # noqa: ANN001
    """Exit code 2 and one `error:` line, the last, holding every needle; no traceback."""
    assert result.code == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr
    for needle in needles:
        assert needle in errors[0], result.stderr


# ---- 1. damaged files -------------------------------------------------------------------


def _damage(data: bytes, kind: str, samples_page: int, page_size: int) -> bytes:
    if kind == "garbage":
        return bytes(range(256)) * (len(data) // 256)
    if kind == "truncated":
        return data[: len(data) // 2]
    start = (samples_page - 1) * page_size  # the samples table's root page, overwritten
    return data[:start] + b"\xa5" * page_size + data[start + page_size :]


@pytest.mark.parametrize(
    ("kind", "verdict"),
    [
        ("garbage", "file is not a database"),
        ("truncated", "database disk image is malformed"),
        ("bad-pages", "database disk image is malformed"),
    ],
)
def test_a_damaged_store_is_one_line_and_exit_2_in_every_command(
    cli, intact, tmp_path, kind, verdict
):
    spec, store = intact
    copy = _copy(store, tmp_path / "copy.db")
    db = sqlite3.connect(copy)
    (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'samples'").fetchone()
    (page_size,) = db.execute("PRAGMA page_size").fetchone()
    db.close()
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(_damage(copy.read_bytes(), kind, root, page_size))
    for name in ["run", *READERS]:
        result = cli(*_command(name, damaged, spec, tmp_path))
        _one_error_line(result, str(damaged), verdict)


# ---- 2. schema versions -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["run", *READERS])
def test_a_store_from_a_newer_muestra_is_refused_naming_both_versions(cli, intact, tmp_path, name):
    spec, store = intact
    newer = _copy(store, tmp_path / "newer.db")
    with contextlib.closing(sqlite3.connect(newer)) as db:
        db.execute(f"PRAGMA user_version = {schema_version() + 1}")
    result = cli(*_command(name, newer, spec, tmp_path))
    _one_error_line(
        result, str(newer), f"schema version {schema_version() + 1}", f"up to {schema_version()}"
    )


def test_an_older_store_is_migrated_and_its_version_kept(tmp_path):
    bare = tmp_path / "bare.db"  # version 0: a SQLite file no migration has touched
    with contextlib.closing(sqlite3.connect(bare)) as db:
        db.execute("CREATE TABLE notes (x)")
    with contextlib.closing(connect(bare, create=False)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == schema_version()
        assert db.execute("SELECT COUNT(*) FROM samples").fetchone()[0] == 0
    legacy = tmp_path / "legacy.db"  # migrated before user_version was kept
    connect(legacy).close()
    with contextlib.closing(sqlite3.connect(legacy)) as db:
        db.execute("PRAGMA user_version = 0")
    with contextlib.closing(connect(legacy)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == schema_version()
        assert db.execute("SELECT COUNT(*) FROM _migrations").fetchone()[0] == schema_version()


# ---- 3. read-only media -----------------------------------------------------------------


@contextlib.contextmanager
def _read_only(folder: Path) -> Iterator[None]:
    """`folder` and its files unwritable, for root too: modes alone do not stop root, so
    root also sets the immutable attribute (chattr +i)."""
    paths = [*folder.iterdir(), folder]
    for path in paths:
        path.chmod(0o555 if path.is_dir() else 0o444)
    immutable = os.geteuid() == 0
    if immutable and subprocess.run(["chattr", "+i", *map(str, paths)]).returncode != 0:
        subprocess.run(["chattr", "-i", *map(str, paths)])
        folder.chmod(0o755)
        pytest.skip("running as root where chattr +i is not available")
    try:
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", *map(str, paths)], check=True)
        for path in paths:
            path.chmod(0o755 if path.is_dir() else 0o644)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_read_commands_work_on_a_read_only_store(cli, intact, tmp_path):
    spec, store = intact
    media = tmp_path / "media"
    copy = _copy(store, media / "s.db")
    before = _digest(media)
    with _read_only(media):
        for name in READERS:
            result = cli(*_command(name, copy, spec, tmp_path))
            assert result.code == 0, (name, result.stderr)
    assert _digest(media) == before  # no byte written, no -wal/-shm/lock left beside it
    assert "2 valid of 2 samples" in cli("analyze", str(copy)).stdout


def test_a_read_only_store_that_needs_a_migration_says_so(cli, tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    old = media / "old.db"
    with contextlib.closing(sqlite3.connect(old)) as db:
        db.execute("CREATE TABLE notes (x)")
    with _read_only(media):
        result = cli("summary", str(old))
    _one_error_line(
        result, str(old), "schema version 0", f"reads version {schema_version()}", "migrated first"
    )


# ---- 4. one writer per store ------------------------------------------------------------


def test_a_second_writer_is_refused_naming_the_first(cli, tiny_kit, tmp_path):
    spec = write_spec(tmp_path, tiny_kit, samples=1)
    store = tmp_path / "s.db"
    held = connect(store)  # this test process is the writer now
    try:
        other = run_cli("run", str(spec), "--out", str(store), env={})  # another process
        _one_error_line(other, str(store), f"in use by process {os.getpid()}")
        assert held.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0
        assert store.with_name("s.db.lock").read_text().startswith(f"process {os.getpid()} (")
    finally:
        held.close()
    assert cli("run", str(spec), "--out", str(store)).code == 0
    # the lock file stays (removing it would race with the next writer) but says nothing
    assert store.with_name("s.db.lock").read_text() == ""


@pytest.mark.long  # a process killed or raced end to end: `make test-long`
def test_simultaneous_runs_do_the_work_once(tiny_kit, tmp_path):
    spec = write_spec(tmp_path, tiny_kit, samples=2)
    store = tmp_path / "s.db"
    command = [sys.executable, "-m", "muestra", "run", str(spec), "--out", str(store)]
    procs = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    results = [(p.returncode, stderr) for p, stderr in zip(procs, errors, strict=True)]
    for code, stderr in results:
        assert "Traceback" not in stderr and "writable path" not in stderr, stderr
        assert code == 0 or (code == 2 and "in use by process" in stderr), stderr
    assert sum("done: 4 samples" in stderr for _, stderr in results) == 1, results
    with contextlib.closing(sqlite3.connect(store)) as db:
        assert db.execute("SELECT COUNT(*) FROM samples").fetchone()[0] == 4


# ---- 5. no silently dropped rows --------------------------------------------------------


def test_a_column_the_runner_does_not_fill_stops_the_run(cli, tiny_kit, tmp_path):
    spec = write_spec(tmp_path, tiny_kit, samples=1)
    store = tmp_path / "s.db"
    assert cli("run", str(spec), "--out", str(store)).code == 0
    with contextlib.closing(sqlite3.connect(store)) as db:
        (sql,) = db.execute("SELECT sql FROM sqlite_master WHERE name = 'samples'").fetchone()
        db.execute("DROP TABLE samples")  # SQLite cannot ADD a NOT NULL column without default
        db.execute(
            sql.replace("id INTEGER PRIMARY KEY,", "id INTEGER PRIMARY KEY, x TEXT NOT NULL,")
        )
    result = cli("run", str(spec), "--out", str(store))
    _one_error_line(
        result, str(store), "kept only 0 of 2 samples", "NOT NULL constraint failed: samples.x"
    )
    assert "done:" not in result.stderr


def test_a_batch_the_store_does_not_keep_in_full_is_rolled_back(tmp_path):
    store = _store_of_answers(tmp_path / "s.db", [{"nombre": "Ana"}])
    with contextlib.closing(connect(store)) as db:
        row = dict(db.execute("SELECT * FROM samples").fetchone())
        del row["id"]
        batch = [{**row, "sample_index": 1}, row]  # a new sample and one already stored
        with pytest.raises(StoreError, match="kept only 1 of 2 samples.*UNIQUE constraint"):
            insert_samples(db, batch)
        assert db.execute("SELECT COUNT(*) FROM samples").fetchone()[0] == 1
        assert insert_samples(db, batch[:1]) == 1
