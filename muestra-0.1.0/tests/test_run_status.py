"""Runs have a status in the store — running, failed with its reason, done — and
`summary`, `analyze`, `report` and `export` never present a failed, stopped or running
run as a finished result. (A run killed with SIGKILL: test_experiments' kill test.)"""

from __future__ import annotations

import sqlite3

import pytest

from muestra.errors import InputError
from muestra.experiments.runner import Runner
from muestra.experiments.spec import load_spec
from test_experiments import write_spec


def status_of(store) -> tuple[str, str | None]:
    db = sqlite3.connect(store)
    try:
        return db.execute("SELECT status, status_reason FROM runs ORDER BY id DESC").fetchone()
    finally:
        db.close()


def interrupted_run(spec, store, error: BaseException) -> None:
    """A run that stores its first batch, then meets `error`."""

    def stop(progress) -> None:
        raise error

    with Runner(load_spec(spec), store, batch_rows=2) as runner:
        runner.open()
        with pytest.raises(type(error)):
            runner.run(stop)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (KeyboardInterrupt(), "interrupted (Ctrl-C)"),
        (RuntimeError("the disk is full"), "RuntimeError: the disk is full"),
    ],
    ids=["ctrl-c", "error"],
)
def test_a_failed_run_is_shown_as_failed_everywhere(cli, tiny_kit, tmp_path, error, reason):
    spec = write_spec(tmp_path, tiny_kit, samples=3)
    store = tmp_path / "f.db"
    interrupted_run(spec, store, error)
    assert status_of(store) == ("failed", reason)
    warning = f"run 1 is not finished — failed: {reason}"
    for command in (
        ["summary", str(store)],
        ["analyze", str(store)],
        ["export", str(store), "-o", str(tmp_path / "e.csv")],
        ["report", str(store), "-o", str(tmp_path / "r.html")],
    ):
        shown = cli(*command)
        assert shown.code == 0, shown.stderr
        assert warning in shown.stderr and "partial result" in shown.stderr, command
    assert cli("summary", str(store), "--json").json()["run_status"] == {
        "status": "failed",
        "reason": reason,
    }
    assert cli("analyze", str(store), "--json").json()["run_status"]["status"] == "failed"
    html = (tmp_path / "r.html").read_text()
    assert "Not finished: " in html and reason in html
    # resumed to the end: done, and nothing warns any more
    assert cli("run", str(spec), "--out", str(store)).code == 0
    assert status_of(store) == ("done", None)
    for command in (["summary", str(store)], ["analyze", str(store)]):
        assert "warning" not in cli(*command).stderr
    assert "Not finished" not in (
        cli("report", str(store), "-o", str(tmp_path / "r2.html")).code == 0
        and (tmp_path / "r2.html").read_text()
    )


def test_a_running_run_is_shown_as_running(cli, tiny_kit, tmp_path):
    """While a process holds the store, its run reads as running (here: this process,
    whose runner is still open)."""
    spec = write_spec(tmp_path, tiny_kit, samples=1)
    store = tmp_path / "r.db"
    with Runner(load_spec(spec), store) as runner:
        runner.open()
        with runner.tracking():
            runner.run()  # inside the block: its samples stored, the run not yet done
            shown = cli("summary", str(store), "--json")
            assert shown.json()["run_status"]["status"] == "running"
            assert "still running in process" in shown.stderr
    assert status_of(store) == ("done", None)


def test_a_failed_eval_and_an_unjudged_probe_are_not_shown_as_finished(
    cli, tiny_kit, tmp_path, monkeypatch
):
    from muestra.evaluation import probes
    from test_probes import _tiny_probe

    path = _tiny_probe(tmp_path, judge=True)
    store = tmp_path / "p.db"

    def broken(*args, **kwargs):
        raise InputError("judge exploded")

    monkeypatch.setattr(probes.running, "copy_judgements", broken)
    result = cli("probe", str(path), "--model", str(tiny_kit), "--out", str(store))
    assert result.code == 2 and "judge exploded" in result.stderr
    db = sqlite3.connect(store)
    statuses = db.execute("SELECT id, status, status_reason FROM runs ORDER BY id").fetchall()
    db.close()
    assert statuses[0][1] == "failed" and "its judge (run 2) failed" in statuses[0][2]
    shown = cli("analyze", str(store))
    assert "is not finished — failed: its judge" in shown.stderr
