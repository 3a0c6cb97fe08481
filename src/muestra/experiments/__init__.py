"""Experiments: TOML specs, a resumable runner, the SQLite store, summaries and exports."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from muestra.experiments.spec import LoadedSpec, load_spec
from muestra.paths import default_store


@dataclass
class Run:
    """A finished (or resumed) run, for notebooks: `.to_pandas()`, `.summary()`."""

    store: Path
    run_id: int

    def to_pandas(self) -> Any:
        from muestra.experiments.results import samples_frame
        from muestra.experiments.store import connect

        with connect(self.store, create=False) as db:
            return samples_frame(db, self.run_id)

    def summary(self, by: str = "prompt") -> dict[str, Any]:
        from muestra.experiments.results import summarize

        return summarize(self.to_pandas(), by=by)


def run(
    spec: str | Path | LoadedSpec,
    out: str | Path | None = None,
    *,
    model: str | None = None,
    samples: int | None = None,
) -> Run:
    """Run (or resume) an experiment spec and return it; the store defaults to NAME.db."""
    from muestra.experiments.runner import Runner

    loaded = spec if isinstance(spec, LoadedSpec) else load_spec(spec, check_models=model is None)
    store = Path(out) if out is not None else default_store(loaded.spec.name, beside=loaded.path)
    with Runner(loaded, store, model=model, samples=samples) as runner:
        run_id = runner.open()
        runner.run()
    return Run(store, run_id)


__all__ = ["LoadedSpec", "Run", "load_spec", "run"]
