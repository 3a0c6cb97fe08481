"""Plan and run an experiment: model × condition × prompt × sample, resumable.

`Runner.plan()` lists the work units not yet in the store; `Runner.run()` groups the
samples of each prompt into engine batches (so they share one prefill), hands each batch
to its executor (experiments/executor.py: by default the think → answer phases, decoded;
an evaluation may bring its own) and writes each finished batch in one transaction. What
a run samples is checked before anything opens (experiments/run_settings.py).
Interrupting (Ctrl-C, `kill -9`, a crash) loses at most the batch in flight; running
the same command again resumes exactly where it stopped, because sample `i` of prompt
`p` always gets the seed derived from (run seed, p's seed index, i), whichever batch it
lands in. The seed index follows the run's recorded seeding scheme (`seed_indices`): the
variants of a group share theirs, so their sample i draws from one random stream; a run
stored before the scheme was recorded resumes on its own ("prompt").
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from muestra.engine.progress import RateTracker, progress_text, resident_bytes
from muestra.errors import InputError
from muestra.experiments.executor import Batch, BatchExecutor, Decoding, Unit
from muestra.experiments.planning import MemoryPlan
from muestra.experiments.prompts import messages_for, think_budget
from muestra.experiments.run_settings import run_settings
from muestra.experiments.spec import (
    Condition,
    LoadedSpec,
    ModelSpec,
)
from muestra.experiments.store import (
    condition_think,
    connect,
    discard_run,
    dumps,
    insert_run,
    insert_samples,
    mark_run,
    model_provenance,
    newest_run,
    now,
    record_memory_plan,
    run_exists,
    set_model_provenance,
    stored_indices,
    upsert,
)
from muestra.settings import REMOTE
from muestra.version import __version__

SEEDING = "paired"  # the seeding scheme new runs record
SCHEMES = ("prompt", "paired")


def seed_indices(groups: list[str | None], scheme: str | None) -> list[int]:
    """The index `p` each prompt (in spec order, with its group or None) passes to
    `engine.seeds.sample_seed(run seed, p, i)`. Scheme "prompt" (runs stored before the
    scheme was recorded): its own index. Scheme "paired" (every new run): the prompts of
    one counterfactual group (vecino / vecina) take the index of the group's first
    prompt, so sample i of every variant draws from the same random stream. With the same
    uniforms, two variants whose next-token distributions agree pick the same token: their
    answers differ where the variant changes the model's distribution, not because two
    independent draws happened to differ. Ungrouped prompts keep their own index."""
    scheme = scheme or "prompt"
    assert scheme in SCHEMES, f"unknown seeding scheme {scheme!r}"
    if scheme == "prompt":
        return list(range(len(groups)))
    first: dict[str, int] = {}
    return [i if g is None else first.setdefault(g, i) for i, g in enumerate(groups)]


__all__ = ["Progress", "Runner", "Unit", "seed_indices"]


@dataclass
class Progress:
    """Where a run is: samples done of total, tokens, seconds since it started; tokens
    per second and the seconds left at the recent rate (None until a sample is stored)
    and this process's resident memory (engine/progress.py)."""

    done: int
    total: int
    tokens: int
    elapsed: float
    tokens_per_s: float = 0.0
    eta_s: float | None = None
    rss_bytes: int | None = None

    def text(self) -> str:
        """ "340 tok/s · ETA 1m05s · RSS 812.0 MiB" (the bars' shared wording)."""
        return progress_text(self.tokens_per_s, self.eta_s, self.rss_bytes)


class Runner:
    def __init__(
        self,
        spec: LoadedSpec,
        store: Path,
        *,
        model: str | None = None,
        samples: int | None = None,
        force_new: bool = False,
        resume_any: bool = False,
        batch_rows: int | None = None,
        on_note: Callable[[str], None] | None = None,
        trust_remote_code: bool = False,
        model_options: Mapping[str, Any] | None = None,
        executor: BatchExecutor | None = None,
        on_plan: Callable[[MemoryPlan], None] | None = None,
        stop_value: Callable[[Any, Any], tuple[float, float | None] | None] | None = None,
    ) -> None:
        """`executor` turns each batch into stored rows (experiments/executor.py; default:
        the spec's phases, decoded); `on_plan` is shown each local model's memory plan
        (default: `on_note`); `stop_value(item, stored row)` gives a sequential run's
        tracked value of a sample when it is not an answer field (a probe's score; see
        `experiments/stopping.py`); every other argument is checked by `run_settings`
        (`model_options` may hold `max_memory`, the run's memory budget)."""
        self.spec = spec
        self.stop_value = stop_value
        self.store = Path(store)
        settings = run_settings(
            spec,
            model=model,
            samples=samples,
            batch_rows=batch_rows,
            trust_remote_code=trust_remote_code,
            model_options=model_options,
        )
        self.samples = settings.samples
        self.models = settings.models
        self.batch_rows = settings.batch_rows  # the model's memory plan may lower it (_sample)
        self.rows_asked = settings.batch_rows
        self.budget = settings.budget
        self.memory_plans: dict[str, MemoryPlan] = {}  # per local model, made in _sample
        self.on_plan = on_plan
        self.executor: BatchExecutor = executor or Decoding()
        self.force_new = force_new
        self.resume_any = resume_any  # resume any run of this spec, not only the latest
        self.on_note = on_note or (lambda _: None)
        self.db: sqlite3.Connection | None = None
        self.run_id: int | None = None
        self.noted: set[str] = set()  # notes already given (once per run, not per batch)
        self._tracked = False  # inside `tracking()`: the status is kept by the outer block
        # set by `open()`: the store's state and this run's row ids
        self.remote_sampling: dict[str, dict[str, Any]] = {}  # model → condition → sampling
        self.created_store = False  # open() made the store file (a discarded run removes it)
        self.new_run = False  # open() inserted the run (else it resumes one)
        self.model_ids: dict[str, int] = {}
        self.condition_ids: dict[str, int] = {}
        self.prompt_ids: dict[str, int] = {}
        self.seed_indices: list[int] = []  # per prompt item, from the run's seeding scheme

    # ---- the store ----------------------------------------------------------------------

    def open(self) -> int:
        """Create or reopen this spec's run in the store; refuse a changed spec, and a local
        model that cannot load or an endpoint model whose think sampling cannot be resolved
        (both before writing anything)."""
        remote = [m for m in self.models if m.endpoint is not None]
        self.remote_sampling = {}
        if remote:  # not imported otherwise: it loads torch, and a dry run needs none
            from muestra.experiments.sampling import resolve_think

            self.remote_sampling = {m.name: resolve_think(self.spec, m) for m in remote}
        self._check_local_models()
        self.created_store = not self.store.exists()
        self.db = connect(self.store)
        try:
            self.new_run = False
            self.run_id = self._open_run(self.db)
            self._register()
            self.seed_indices = self._seed_indices(self.db)
        except BaseException:
            self.db.close()  # releases the store's lock: a refused run leaves it to the next
            self.db = None
            raise
        return self.run_id

    def close(self) -> None:
        """Close the store (and release its lock); the runner can be opened again."""
        if self.db is not None:
            self.db.close()
            self.db = None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _check_local_models(self) -> None:
        """Refuse a local model that is missing, offline, without weights or in need of
        remote code before the store is created or a run row written, so that it leaves
        neither behind. The weights themselves load in run(), one model at a time."""
        local = [m for m in self.models if m.endpoint is None]
        if local:  # not imported otherwise: it loads torch
            from muestra.models.loading import check_model_without_download

            for model in local:
                check_model_without_download(model.id, trust_remote_code=model.trust_remote_code)

    def _open_run(self, db: sqlite3.Connection) -> int:
        """The id of this spec's run in the store, inserted unless it is the latest."""
        last = newest_run(db)
        if self.resume_any and not self.force_new:
            last = newest_run(db, self.spec.hash)
        if last is not None and not self.force_new:
            if last["spec_hash"] != self.spec.hash:
                raise InputError(
                    f"{self.store} holds a run of a different spec (its text changed since "
                    f"{last['created_at']}). Use another --out, or --force-new to start a new "
                    "run in the same store."
                )
            return int(last["id"])
        self.new_run = True
        spec = self.spec
        return insert_run(db, spec.spec.name, str(spec.path), spec.text, spec.hash,
                          spec.spec.seed, SEEDING, spec.answer_schema)  # fmt: skip

    def _seed_indices(self, db: sqlite3.Connection) -> list[int]:
        """Each prompt item's seed index under the scheme the run recorded."""
        (scheme,) = db.execute("SELECT seeding FROM runs WHERE id = ?", (self.run_id,)).fetchone()
        return seed_indices([item.group for item in self.spec.spec.prompt.items], scheme)

    def _upsert(self, table: str, key: dict[str, Any], values: dict[str, Any]) -> int:
        assert self.db is not None
        return upsert(self.db, table, key, values)

    def _register(self) -> None:
        run = {"run_id": self.run_id}
        self.model_ids = {
            m.name: self._upsert("models", {**run, "label": m.name}, {"model_ref": m.id})
            for m in self.models
        }
        self.condition_ids = {c.label: self._register_condition(c) for c in self.spec.conditions}
        self.prompt_ids = {
            item.id: self._upsert(
                "prompts",
                {**run, "prompt_key": item.id},
                {
                    "prompt_index": index,
                    "messages_json": dumps(messages_for(self.spec, item)),
                    "variables_json": dumps(item.variables),
                    "group_name": item.group,
                    "variant": item.variant,
                },
            )
            for index, item in enumerate(self.spec.spec.prompt.items)
        }

    def _register_condition(self, condition: Condition) -> int:
        """The condition's row; its think_json keeps, under "remote", the think sampling
        resolved for each endpoint model. A resumed run must resolve to the same."""
        assert self.db is not None
        think = condition.think.model_dump() if condition.think else None
        remote = {
            name: by_label[condition.label].record()
            for name, by_label in self.remote_sampling.items()
            if condition.label in by_label
        }
        if think is not None and remote:
            think["remote"] = remote
        condition_id = self._upsert(
            "conditions",
            {"run_id": self.run_id, "label": condition.label},
            {
                "overrides_json": dumps(condition.overrides),
                "think_json": dumps(think),
                "answer_json": dumps(condition.answer.model_dump(by_alias=True)),
            },
        )
        stored = condition_think(self.db, condition_id)
        before = ((json.loads(stored) if stored else None) or {}).get("remote", {})
        for name, record in remote.items():
            old = before.get(name) or {}
            # a run stored before modes were resolved reasoned in tags; one stored before a
            # setting was sent left it to the server: only what it recorded is compared
            keys = [k for k in REMOTE if k in old or not old] + ["mode"]
            now = {k: record.get(k) for k in keys}
            was = {k: old.get(k, "tags" if k == "mode" else None) for k in keys}
            if was != now:
                raise InputError(
                    f"{self.store}: condition {condition.label!r} of model {name!r} was sampled "
                    f"with {was} but its think sampling now resolves to {now} (a "
                    "generation_config.json appeared or changed). Use another --out, or "
                    "--force-new to start a new run in the same store."
                )
        return condition_id

    # ---- planning -----------------------------------------------------------------------

    def plan(self) -> list[Unit]:
        assert self.db is not None, "open() first"
        units = []
        for model in self.models:
            for condition in self.spec.conditions:
                for index, item in enumerate(self.spec.spec.prompt.items):
                    ids = (
                        self.model_ids[model.name],
                        self.condition_ids[condition.label],
                        self.prompt_ids[item.id],
                    )
                    stored = stored_indices(self.db, *ids)
                    missing = tuple(i for i in range(self.samples) if i not in stored)
                    if missing:
                        units.append(Unit(model, condition, item, index, *ids, missing,
                                          self.seed_indices[index]))  # fmt: skip
        return units

    def cells(self) -> list[Unit]:
        """Every model × condition × prompt cell, in plan order (no samples missing)."""
        return [
            Unit(
                model,
                condition,
                item,
                index,
                self.model_ids[model.name],
                self.condition_ids[condition.label],
                self.prompt_ids[item.id],
                (),
                self.seed_indices[index],
            )
            for model in self.models
            for condition in self.spec.conditions
            for index, item in enumerate(self.spec.spec.prompt.items)
        ]

    def estimate_tokens(self, units: list[Unit]) -> int:
        total = 0
        for unit in units:
            budget = think_budget(unit.condition, unit.item) or 0
            total += len(unit.missing) * (budget + unit.condition.answer.max_tokens)
        return total

    # ---- running ------------------------------------------------------------------------

    @contextmanager
    def tracking(self) -> Iterator[None]:
        """The run's status in the store while the block runs: "running", then "failed"
        with the reason if it raises (Ctrl-C included), else "done". `run` tracks itself;
        a command with more to do after sampling (scoring, judging) wraps it all."""
        assert self.db is not None and self.run_id is not None, "open() first"
        if self._tracked:
            yield
            return
        self._tracked = True
        mark_run(self.db, self.run_id, "running")
        try:
            yield
        except BaseException as err:
            reason = (
                "interrupted (Ctrl-C)"
                if isinstance(err, KeyboardInterrupt)
                else f"{type(err).__name__}: {err}"[:1000]
            )
            if self.db is not None and self._run_exists():
                mark_run(self.db, self.run_id, "failed", reason)
            raise
        finally:
            self._tracked = False
        mark_run(self.db, self.run_id, "done")

    def _run_exists(self) -> bool:
        assert self.db is not None
        assert self.run_id is not None
        return run_exists(self.db, self.run_id)

    def run(self, on_progress: Callable[[Progress], None] | None = None) -> Progress:
        with self.tracking():
            return self._sample(on_progress)

    def _sample(self, on_progress: Callable[[Progress], None] | None) -> Progress:
        units = self.plan()
        total = sum(len(u.missing) for u in units)
        progress = Progress(0, total, 0, 0.0, rss_bytes=resident_bytes())
        started = time.perf_counter()
        rate = RateTracker(total)

        def store(rows: list[dict[str, Any]]) -> None:
            assert self.db is not None
            insert_samples(self.db, rows)
            tokens = sum(r["completion_tokens"] for r in rows)
            rate.add(len(rows), tokens)
            progress.done += len(rows)
            progress.tokens += tokens
            progress.elapsed = time.perf_counter() - started
            progress.tokens_per_s, progress.eta_s = rate.rates()[1], rate.eta()
            progress.rss_bytes = resident_bytes()
            if on_progress:
                on_progress(progress)

        try:  # before any weights load: a model that cannot fit one row is refused here
            self._plan_memory(units)
        except BaseException:
            self._discard()
            raise
        rounds = self._rounds()
        for model in self.models:
            mine = [u for u in units if u.model.name == model.name]
            if not mine and rounds is None:
                continue
            # a fixed-n run is one round; a sequential one samples its open cells in rounds
            each_round = [mine] if rounds is None else rounds.of(model.name)
            worker = None
            for round_units in each_round:
                try:
                    if model.endpoint is not None:
                        self._run_remote(model, round_units, store)
                        continue
                    if worker is None:
                        plan = self.memory_plans.get(model.name)
                        self.batch_rows = plan.rows if plan else self.rows_asked
                        worker = self.executor.load(self, model)
                    for batch in _batches(round_units, self.batch_rows):
                        store(self.executor.run_batch(self, worker, batch))
                except BaseException:
                    # one rule for every backend: a run this command created that fails
                    # before storing any sample leaves nothing behind (_discard)
                    if progress.done == 0:
                        self._discard()
                    raise
        return progress

    def _plan_memory(self, units: list[Unit]) -> None:
        """Each local model's memory plan (experiments/planning.py): shown, and stored with
        the run; its rows at once cap the model's batches."""
        from muestra.experiments.planning import plan_models

        assert self.db is not None and self.run_id is not None
        if not getattr(self.executor, "plans_memory", False):
            return  # an executor of its own (executor.py) brings its own resources
        self.memory_plans = plan_models(self.spec, units, self.rows_asked, self.budget)
        for name, plan in self.memory_plans.items():
            (self.on_plan or (lambda p: self.on_note(p.describe())))(plan)
            record_memory_plan(self.db, self.run_id, self.model_ids[name], plan.as_dict())

    def _rounds(self) -> Any:
        """The rounds of a sequential run (`[stop]`), None for a fixed-n one; a resumed
        run must keep the rule it was sampled with."""
        from muestra.experiments.stopping import Rounds, check_stored_rule

        assert self.db is not None and self.run_id is not None
        stop = self.spec.spec.stop
        check_stored_rule(self.db, self.run_id, stop, str(self.store))
        return Rounds(self, stop, self.samples) if stop is not None else None

    def note_once(self, note: str) -> None:
        """Give `note` to the user once per run."""
        if note not in self.noted:
            self.noted.add(note)
            self.on_note(note)

    def _discard(self) -> None:
        """Undo what `open` wrote when the run fails before storing any sample, whatever
        the backend (a local model that does not load or is refused on its first batch,
        endpoints that fail the start's checks or refuse every request, Ctrl-C): a store
        this invocation created is removed, a run it added is deleted. A resumed run, or
        one with samples, stays, marked failed."""
        if self.db is None or not self.new_run:
            return
        if self.created_store:
            self.db.close()  # the lock goes with it; then the files (-wal, -shm, .lock too)
            self.db = None
            for suffix in ("", "-wal", "-shm", "-journal", ".lock"):
                self.store.with_name(self.store.name + suffix).unlink(missing_ok=True)
            return
        assert self.run_id is not None
        discard_run(self.db, self.run_id)

    def _run_remote(
        self, model: ModelSpec, units: list[Unit], store: Callable[[list[dict[str, Any]]], None]
    ) -> None:
        from muestra.experiments.remote import RemoteRunner

        def provenance(data: dict[str, Any]) -> None:  # the endpoints answered
            self._store_provenance(model, data)

        remote = RemoteRunner(
            self.spec,
            model,
            self.spec.spec.seed,
            self.row,
            store,
            self.on_note,
            provenance,
            sampling=self.remote_sampling[model.name],
        )
        remote.run(units)

    def _store_provenance(self, model: ModelSpec, data: dict[str, Any]) -> None:
        """Record where the model's weights came from and what computed with them; a run
        resumed with other weights or another runtime is refused (its samples would mix)."""
        assert self.db is not None
        stored = model_provenance(self.db, self.model_ids[model.name])
        if stored:
            before = json.loads(stored)
            was, now = _computing(before), _computing(data)
            if was != now:
                raise InputError(
                    f"{self.store}: model {model.name!r} of this run was sampled with {was}, "
                    f"and now loads as {now}; its samples would mix. Use another --out, or "
                    "--force-new to start a new run in the same store."
                )
        set_model_provenance(self.db, self.model_ids[model.name], data)

    def load(self, model: ModelSpec) -> Any:
        """The local model with every setting of its spec, its provenance stored."""
        from muestra.models.loading import load_model

        loaded = load_model(
            model.id,
            dtype=model.dtype,  # type: ignore[arg-type]
            device=model.device,  # type: ignore[arg-type]
            trust_remote_code=model.trust_remote_code,
            runtime=model.runtime,
            threads=model.threads,
            batch_invariant=model.batch_invariant,
            thread_wait=model.thread_wait,
            kv_cache=model.kv_cache,
        )
        self._store_provenance(model, loaded.provenance.as_dict())
        plan = self.memory_plans.get(model.name)
        cap = getattr(loaded.runtime, "cap_cells", None)
        if plan is not None and cap is not None and plan.kv_cells is not None:
            # llama.cpp's cache holds what the plan counted, never more: its contexts
            # grow by doubling, which without this cap took up to twice the plan's KV
            cap(plan.kv_cells)
        return loaded

    def row(
        self, unit: Unit, sample: Any, think_budget: int | None, seconds: float
    ) -> dict[str, Any]:
        """The store's row of one finished sample of `unit`."""
        return {
            "run_id": self.run_id,
            "model_id": unit.model_id,
            "condition_id": unit.condition_id,
            "prompt_id": unit.prompt_id,
            "sample_index": sample.sample,
            "seed": sample.seed,
            "think_budget": think_budget,
            "reasoning": sample.reasoning,
            "think_tokens": sample.think_tokens,
            "budget_hit": int(sample.budget_hit),
            "answer_text": sample.answer_text,
            "answer_json": dumps(sample.answer),
            "field_probs_json": dumps(sample.field_probs),
            "beam_json": dumps(getattr(sample, "beam", None)),
            "finish_reason": sample.finish_reason,
            "error": sample.error,
            "prompt_tokens": sample.num_prompt_tokens,
            "completion_tokens": sample.num_tokens,
            "batch_seconds": seconds,
            "muestra_version": __version__,
            "created_at": now(),
        }


def _batches(units: list[Unit], rows: int) -> Iterator[Batch]:
    """Batches of at most `rows` samples; one condition, think budget and item choice per
    batch, and one unit per seed index (two variants of a group, which share a seed index,
    go to different batches: the batch's samples are told apart by it). A unit whose
    samples are a beam search's ranks goes whole into one batch: one search gives every
    rank, and its beams decode together whatever the batch (split, the search ran once
    per part)."""
    from muestra.experiments.spec import beam_phase

    current: Batch = []
    size = 0
    key = None
    for unit in units:
        choice = tuple(unit.item.choice) if unit.item.choice is not None else None
        unit_key = (unit.condition.label, unit.item.think_budget, choice)
        whole = beam_phase(unit.condition) is not None
        pending = list(unit.missing)
        while pending:
            taken = {u.seed_index for u, _ in current if u is not unit}
            if current and (key != unit_key or size >= rows or unit.seed_index in taken):
                yield current
                current, size = [], 0
            key = unit_key
            take = pending if whole else pending[: rows - size]
            pending = pending[len(take) :]
            current.append((unit, take))
            size += len(take)
    if current:
        yield current


def _computing(provenance: dict[str, Any]) -> dict[str, Any]:
    """What decides a model's samples in its provenance: the weights and the runtime."""
    runtime = provenance.get("runtime") or {}
    return {
        "weights_sha256": provenance.get("weights_sha256"),
        "runtime": runtime.get("runtime", "torch"),
        "batch_invariant": runtime.get("exact"),
        "kv_cache": _kv_cache(runtime),
    }


def _kv_cache(runtime: dict[str, Any]) -> str | None:
    """llama.cpp's KV cache type in a runtime's record (recorded before it was a setting:
    f16, the only one there was); None on torch."""
    return runtime.get("kv_cache", "f16") if runtime.get("runtime") == "llamacpp" else None
