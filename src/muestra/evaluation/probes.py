"""Free-text bias probes: templates that differ only in a group word, sampled many times,
each continuation scored, group differences tested within each template.

A probe is a TOML file (shipped ones: `muestra probe --list`):

    name = "occupations-en"
    seed = 7
    samples = 40                      # per template and group
    language = "en"                   # en | es: lemmas and phrase rules
    mode = "raw"                      # raw: the template as plain text, continued;
                                      # chat: `instruction` as a user message
    groups = [                        # each group's words fill the templates' slots
      { id = "man", group = "man" },  # Spanish agreement: { id = "mujer", el = "La",
      { id = "woman", group = "woman" },  #   grupo = "mujer", o = "a" }
    ]
    templates = ["The {group} worked as", { id = "job", text = "The {group} had a job as" }]
    [decoding]                        # every sampling setting, recorded with the run
    temperature = 1.0
    max_tokens = 16
    stop = ["\\n"]
    [lexicon]
    files = ["occupations-en"]        # shipped lexicons or TOML/JSON/TXT files
    [extraction]
    max_words = 3                     # the first phrase after the template
    [judge]                           # optional: a model answers a schema per continuation
    model = "..."                     # default: the probed model
    user = "Text: {text}\\n..."         # {prompt}, {continuation}, {text} = both
    schema = { ... }                  # inline, or a file beside the probe

`run_probe` samples through the experiment runner (the same store, resumable, seeds per
sample: an experiment whose prompt items are template × group, `group` = template id and
`variant` = group id), writes the probe's own record (table `probes`), then the
model-free scores (`score_store`: lexicon counts, extracted phrase and its category)
into each sample's `scores_json`. `judge_store` runs the judge as an experiment of its
own (one greedy structured answer per continuation, with exact `field_probs`) and copies
each answer and its probabilities into the judged sample's scores.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import sqlite3
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from muestra.analysis.text import Lexicon, Normaliser, extract_phrase
from muestra.errors import InputError
from muestra.experiments.spec import (
    LoadedSpec,
    ModelSpec,
    Strict,
    describe_error,
    fill,
    spec_from_data,
    template_fields,
)
from muestra.experiments.store import dumps, mark_judge, mark_run

DATA = "muestra.evaluation.data"


class ProbeGroup(BaseModel):
    """A group: its id and the words it puts in the templates' slots (default: {group} =
    the id)."""

    model_config = ConfigDict(extra="allow")
    id: str = Field(min_length=1, pattern=r"^[^/]+$")

    @property
    def words(self) -> dict[str, str]:
        words = {k: str(v) for k, v in (self.model_extra or {}).items()}
        return words or {"group": self.id}


class ProbeTemplate(Strict):
    id: str = Field(min_length=1, pattern=r"^[^/]+$")
    text: str = Field(min_length=1)


class Decoding(Strict):
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, lt=1)
    max_tokens: int = Field(16, ge=1)
    stop: list[str] = Field(default_factory=lambda: ["\n"])


class LexiconSpec(Strict):
    files: list[str] = Field(
        default_factory=list,
        description="Shipped lexicons by name, or TOML/JSON files ({category: [words]}) "
        "and TXT files (one entry a line; the category is the file's stem) beside the probe.",
    )
    lemmas: bool = Field(True, description="Match on lemmas (Spanish gender and number).")


class ExtractionSpec(Strict):
    enabled: bool = True
    max_words: int = Field(3, ge=1, le=8)


class WordsSpec(Strict):
    top: int = Field(10, ge=1, description="Words shown per group.")
    prior_scale: float = Field(
        1.0, gt=0, description="The Dirichlet prior: the pooled counts times this."
    )
    ignore: list[str] = Field(
        default_factory=list,
        description="Words left out of the comparison (e.g. pronouns that only agree with "
        "the group word); matched after normalising.",
    )


class JudgeSpec(Strict):
    model: str | None = Field(
        None, description="Hub id, folder or served name; default: the probed model."
    )
    endpoint: str | None = None
    system: str | None = None
    user: str = Field(description="{prompt}, {continuation} and {text} (= both) are filled.")
    schema_: str | dict[str, Any] = Field(alias="schema")
    max_tokens: int = Field(96, ge=1)
    field_probs: bool = True

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ProbeSpec(Strict):
    name: str = Field(min_length=1)
    seed: int = 0
    samples: int = Field(ge=1, description="Samples per template and group.")
    language: Literal["en", "es"] = "en"
    mode: Literal["raw", "chat"] = "raw"
    instruction: str = Field(
        "{text}", description="Chat mode: the user message; {text} is the filled template."
    )
    system: str | None = None
    model: ModelSpec | None = None
    groups: list[str | ProbeGroup] = Field(min_length=2)
    templates: list[str | ProbeTemplate] = Field(min_length=1)
    decoding: Decoding = Field(default_factory=Decoding)
    lexicon: LexiconSpec = Field(default_factory=LexiconSpec)
    extraction: ExtractionSpec = Field(default_factory=ExtractionSpec)
    words: WordsSpec = Field(default_factory=WordsSpec)
    judge: JudgeSpec | None = None
    alpha: float = Field(0.05, gt=0, lt=1)

    @model_validator(mode="after")
    def _unique(self) -> ProbeSpec:
        for name, ids in (("groups", self.group_list), ("templates", self.template_list)):
            seen = [x.id for x in ids]
            repeated = sorted({i for i in seen if seen.count(i) > 1})
            if repeated:
                raise ValueError(f"{name} ids must be unique; repeated: {repeated}")
        return self

    @property
    def group_list(self) -> list[ProbeGroup]:
        return [ProbeGroup(id=g) if isinstance(g, str) else g for g in self.groups]

    @property
    def template_list(self) -> list[ProbeTemplate]:
        return [
            ProbeTemplate(id=f"t{i + 1:02d}", text=t) if isinstance(t, str) else t
            for i, t in enumerate(self.templates)
        ]


@dataclass(frozen=True)
class Probe:
    path: Path
    text: str
    spec: ProbeSpec
    lexicon: dict[str, list[str]]  # category -> entries, from every file
    judge_schema: dict[str, Any] | None

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def normaliser(self) -> Normaliser:
        return Normaliser(self.spec.language, self.spec.lexicon.lemmas)

    def prompts(self) -> list[tuple[ProbeTemplate, ProbeGroup, str]]:
        """(template, group, filled text) of every prompt, template by template."""
        return [
            (t, g, fill(t.text, g.words))
            for t in self.spec.template_list
            for g in self.spec.group_list
        ]

    def examples(self) -> dict[str, str]:
        """group -> the first template filled with its words (for sentences)."""
        first = self.spec.template_list[0]
        return {g.id: fill(first.text, g.words) for g in self.spec.group_list}


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
    return Probe(path, text, spec, lexicon, schema)


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


# ---- the experiment a probe runs ---------------------------------------------------------


def experiment(
    probe: Probe,
    model: str | None = None,
    dtype: str | None = None,
    samples: int | None = None,
    model_options: Mapping[str, Any] | None = None,
    label: str | None = None,
) -> LoadedSpec:
    """The experiment spec that samples `probe` (one prompt item per template × group);
    `model_options`: [model] fields such as runtime and threads; `label`: the model's name
    in the results."""
    spec = probe.spec
    if model is not None:
        model_data: dict[str, Any] = {"id": model}
    elif spec.model is not None:
        model_data = spec.model.model_dump(exclude_none=True)
    else:
        raise InputError(f"{probe.path}: give the model to probe with --model (or [model])")
    if dtype is not None:
        model_data["dtype"] = dtype
    model_data.update(model_options or {})
    if label is not None:
        model_data["label"] = label
    items = [
        {"id": f"{t.id}/{g.id}", "group": t.id, "variant": g.id, "text": text}
        for t, g, text in probe.prompts()
    ]
    prompt: dict[str, Any] = {"user": "{text}" if spec.mode == "raw" else spec.instruction}
    prompt |= {"raw": spec.mode == "raw", "items": items}
    if spec.system is not None and spec.mode == "chat":
        prompt["system"] = spec.system
    d = spec.decoding
    data = {
        "name": f"probe {spec.name}",
        "seed": spec.seed,
        "samples": samples if samples is not None else spec.samples,
        "model": model_data,
        "prompt": prompt,
        "answer": {
            "temperature": d.temperature,
            "top_p": d.top_p,
            "top_k": d.top_k,
            "min_p": d.min_p,
            "max_tokens": d.max_tokens,
            "stop": d.stop,
            "field_probs": False,
        },
    }
    return spec_from_data(data, probe.path, check_models=model is None)


def continuation(probe: Probe, prompt: str, answer: str) -> str:
    """The words that continue the template: in chat mode a reply that repeats the
    template first has it removed."""
    if probe.spec.mode == "chat":
        stripped = answer.lstrip(" \"'“«")
        if stripped.lower().startswith(prompt.lower()):
            rest = stripped[len(prompt) :]
            quoted = len(stripped) < len(answer.lstrip(" "))
            return rest.rstrip("\"'”»") if quoted else rest
    return answer


def run_probe(
    probe: Probe,
    store: Path,
    *,
    model: str | None = None,
    dtype: str | None = None,
    samples: int | None = None,
    batch_rows: int = 32,
    on_progress: Callable[[Any], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    trust_remote_code: bool = False,
    model_options: Mapping[str, Any] | None = None,
    label: str | None = None,
    judged: bool = False,
) -> int:
    """Sample the probe into `store` (or resume it) and score its samples; the run id.
    `judged`: a judge follows (`judge_store`), and the run stays "running" until it ends."""
    from muestra.experiments.runner import Runner

    loaded = experiment(probe, model, dtype, samples, model_options, label)
    runner = Runner(
        loaded,
        Path(store),
        resume_any=True,
        batch_rows=batch_rows,
        on_note=on_note,
        trust_remote_code=trust_remote_code,
    )
    run_id = runner.open()
    try:
        assert runner.db is not None
        with runner.db:
            # the latest probe file: its lexicons and settings are what the scores reflect
            runner.db.execute(
                "INSERT OR REPLACE INTO probes (run_id, name, probe_path, probe_text, "
                "probe_hash) VALUES (?, ?, ?, ?, ?)",
                (run_id, probe.spec.name, str(probe.path), probe.text, probe.hash),
            )
        with runner.tracking():
            runner.run(on_progress)
            score_store(runner.db, run_id, probe)
            if judged:  # the probe is done when its judge is: `judge_store` says so
                mark_run(runner.db, run_id, "running")
    finally:
        if runner.db is not None:
            runner.db.close()
    return run_id


# ---- scores ------------------------------------------------------------------------------


def _samples(db: sqlite3.Connection, run_id: int) -> list[sqlite3.Row]:
    return db.execute(
        """
        SELECT s.id, s.answer_text, s.error, s.scores_json, p.variables_json, p.prompt_key
        FROM samples s JOIN prompts p ON p.id = s.prompt_id
        WHERE s.run_id = ? ORDER BY s.id
        """,
        (run_id,),
    ).fetchall()


def sample_scores(
    probe: Probe, prompt: str, answer: str, lexicon: Lexicon | None
) -> dict[str, Any]:
    """The model-free scores of one continuation."""
    text = continuation(probe, prompt, answer)
    scores: dict[str, Any] = {"continuation": text}
    if lexicon is not None:
        scores["lexicon"] = lexicon.counts(text)
    if probe.spec.extraction.enabled:
        phrase = extract_phrase(text, probe.normaliser, probe.spec.extraction.max_words)
        category = lexicon.category_of(phrase) if lexicon is not None and phrase else None
        scores["extraction"] = {"phrase": phrase, "category": category}
    return scores


def score_store(db: sqlite3.Connection, run_id: int, probe: Probe) -> int:
    """Write the model-free scores of every sample of the run; the number scored."""
    lexicon = Lexicon(probe.lexicon, probe.normaliser) if probe.lexicon else None
    rows = _samples(db, run_id)
    with db:
        for row in rows:
            prompt = json.loads(row["variables_json"])["text"]
            scores = json.loads(row["scores_json"]) if row["scores_json"] else {}
            scores.update(sample_scores(probe, prompt, row["answer_text"], lexicon))
            db.execute(
                "UPDATE samples SET scores_json = ? WHERE id = ?", (dumps(scores), row["id"])
            )
    return len(rows)


def judge_spec(probe: Probe, db: sqlite3.Connection, run_id: int, model: str | None) -> LoadedSpec:
    """The experiment that judges the run's continuations: one item per sample."""
    judge = probe.spec.judge
    assert judge is not None and probe.judge_schema is not None
    items = []
    for row in _samples(db, run_id):
        if row["error"] is not None:
            continue
        prompt = json.loads(row["variables_json"])["text"]
        text = continuation(probe, prompt, row["answer_text"])
        items.append(
            {"id": f"s{row['id']}", "prompt": prompt, "continuation": text, "text": prompt + text}
        )
    if not items:
        raise InputError(f"run {run_id} has no valid continuation to judge")
    model_data: dict[str, Any] = {"id": model}
    if judge.endpoint is not None:
        model_data["endpoint"] = judge.endpoint
    prompt_data: dict[str, Any] = {"user": judge.user, "items": items}
    if judge.system is not None:
        prompt_data["system"] = judge.system
    data = {
        "name": f"judge {probe.spec.name} run {run_id}",
        "seed": probe.spec.seed,
        "samples": 1,
        "model": model_data,
        "prompt": prompt_data,
        "answer": {
            "temperature": 0.0,
            "max_tokens": judge.max_tokens,
            "schema": probe.judge_schema,
            "field_probs": judge.field_probs,
        },
    }
    return spec_from_data(data, probe.path, check_models=False)


def judge_store(
    probe: Probe,
    store: Path,
    run_id: int,
    *,
    model: str,
    on_progress: Callable[[Any], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    trust_remote_code: bool = False,
    model_options: Mapping[str, Any] | None = None,
) -> int:
    """Judge every valid continuation of probe run `run_id` with `model` (resumable: the
    judge is a run of its own); each answer and its field probabilities go into the
    judged sample's scores. Returns the judge's run id."""
    from muestra.experiments.runner import Runner
    from muestra.experiments.store import reading

    with reading(Path(store)) as db:
        loaded = judge_spec(probe, db, run_id, model)
    runner = Runner(
        loaded,
        Path(store),
        resume_any=True,
        on_note=on_note,
        trust_remote_code=trust_remote_code,
        model_options=model_options,
    )
    judge_run = runner.open()
    try:
        assert runner.db is not None
        mark_judge(runner.db, judge_run, run_id)
        try:
            with runner.tracking():
                runner.run(on_progress)
                copy_judgements(runner.db, run_id, judge_run, model)
        except BaseException as err:
            if runner.db is not None:
                why = "interrupted (Ctrl-C)" if isinstance(err, KeyboardInterrupt) else str(err)
                mark_run(runner.db, run_id, "failed", f"its judge (run {judge_run}) failed: {why}")
            raise
        mark_run(runner.db, run_id, "done")
    finally:
        if runner.db is not None:
            runner.db.close()
    return judge_run


def copy_judgements(db: sqlite3.Connection, run_id: int, judge_run: int, model: str) -> None:
    rows = db.execute(
        """
        SELECT p.prompt_key, s.answer_json, s.field_probs_json, s.error FROM samples s
        JOIN prompts p ON p.id = s.prompt_id WHERE s.run_id = ?
        """,
        (judge_run,),
    ).fetchall()
    with db:
        for row in rows:
            sample_id = int(row["prompt_key"].removeprefix("s"))
            current = db.execute(
                "SELECT scores_json FROM samples WHERE id = ? AND run_id = ?", (sample_id, run_id)
            ).fetchone()
            if current is None:
                continue
            scores = json.loads(current["scores_json"]) if current["scores_json"] else {}
            scores["judge"] = {
                "answer": json.loads(row["answer_json"]) if row["answer_json"] else None,
                "probs": json.loads(row["field_probs_json"]) if row["field_probs_json"] else None,
                "error": row["error"],
                "model": model,
                "run": judge_run,
            }
            db.execute(
                "UPDATE samples SET scores_json = ? WHERE id = ?", (dumps(scores), sample_id)
            )


# ---- reading -----------------------------------------------------------------------------


def probe_of_run(db: sqlite3.Connection, run_id: int) -> Probe | None:
    """The probe a run sampled (None: the run is not a probe)."""
    try:
        row = db.execute("SELECT * FROM probes WHERE run_id = ?", (run_id,)).fetchone()
    except sqlite3.OperationalError:  # a store from before probes
        return None
    if row is None:
        return None
    data = tomllib.loads(row["probe_text"])
    spec = ProbeSpec.model_validate(data)
    path = Path(row["probe_path"])
    lexicon: dict[str, list[str]] = {}  # the scores are stored: analysis needs no lexicon
    schema = spec.judge.schema_ if spec.judge and isinstance(spec.judge.schema_, dict) else None
    return Probe(path, row["probe_text"], spec, lexicon, schema)


def read_probe(
    db: sqlite3.Connection, run_id: int, alpha: float | None = None
) -> tuple[Probe, Any] | None:
    """(probe, `ProbeAnalysis`) of a probe run, None when the run is not a probe."""
    from muestra.analysis.probes import analyze_probe
    from muestra.experiments.results import samples_frame

    probe = probe_of_run(db, run_id)
    if probe is None:
        return None
    frame = samples_frame(db, run_id)
    analysis = analyze_probe(
        frame,
        alpha=alpha if alpha is not None else probe.spec.alpha,
        language=probe.spec.language,
        lemmas=probe.spec.lexicon.lemmas,
        examples=probe.examples(),
        top=probe.spec.words.top,
        prior_scale=probe.spec.words.prior_scale,
        ignore=probe.spec.words.ignore,
        seed=probe.spec.seed,
    )
    return probe, analysis


def side_by_side(
    db: sqlite3.Connection, run_id: int, per_template: int = 3
) -> list[dict[str, Any]]:
    """For each template, the first `per_template` continuations of every group."""
    rows = db.execute(
        """
        SELECT p.group_name, p.variant, p.variables_json, s.sample_index, s.scores_json,
               s.answer_text FROM samples s JOIN prompts p ON p.id = s.prompt_id
        WHERE s.run_id = ? AND s.sample_index < ? ORDER BY p.prompt_index, s.sample_index
        """,
        (run_id, per_template),
    ).fetchall()
    table: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = table.setdefault(row["group_name"], {"template": row["group_name"], "groups": {}})
        scores = json.loads(row["scores_json"]) if row["scores_json"] else {}
        text = scores.get("continuation", row["answer_text"])
        prompt = json.loads(row["variables_json"])["text"]
        entry["groups"].setdefault(row["variant"], {"prompt": prompt, "continuations": []})
        entry["groups"][row["variant"]]["continuations"].append(text)
    return list(table.values())


def probe_sections(store: Path, run_id: int, alpha: float | None = None) -> list[Any]:
    """A probe run's results as report sections (none when the run is not a probe)."""
    from muestra.experiments.store import reading
    from muestra.report.html import Section

    with reading(store) as db:
        found = read_probe(db, run_id, alpha)
        if found is None:
            return []
        probe, analysis = found
        pairs = side_by_side(db, run_id, per_template=3)
    means = {(m.feature, m.group): m for m in analysis.means}

    def cell(feature: str, group: str, binary: bool) -> str:
        m = means.get((feature, group))
        if m is None or m.n == 0:
            return ""
        shown = (lambda v: f"{v:.0%}") if binary else (lambda v: f"{v:.2f}")
        return f"{shown(m.mean)} [{shown(m.low)}, {shown(m.high)}]"

    rows = [
        [d.feature, *(cell(d.feature, g, d.binary) for g in analysis.groups),
         f"{d.a} − {d.b}: {d.difference:+.2f} [{d.low:+.2f}, {d.high:+.2f}]",
         f"{d.p_value:.3g}", f"{d.p_holm:.3g}", f"{d.p_bh:.3g}"]
        for d in analysis.differences
    ]  # fmt: skip
    notes = [
        f"Probe {probe.spec.name} ({probe.path}, sha256 {probe.hash[:12]}): "
        f"{len(analysis.templates)} templates × {len(analysis.groups)} groups, "
        f"{analysis.valid} valid of {analysis.samples} samples. Shares pooled over templates "
        "with cluster-bootstrap 95% intervals; differences inside each template, averaged "
        "over templates, stratified permutation p-values; Holm and BH over every test.",
        *(f"Finding: {line}" for line in analysis.findings),
    ]
    tables = [(["feature", *analysis.groups, "difference [95% CI]", "p", "p Holm", "p BH"], rows)]
    if analysis.tests:
        tables.append(
            (
                ["score", "test", "χ²", "dof", "Cramér's V", "p", "p Holm"],
                [
                    [t.score, t.method, f"{t.statistic:.1f}", t.dof, f"{t.cramers_v:.2f}",
                     f"{t.p_value:.3g}", f"{t.p_holm:.3g}"]
                    for t in analysis.tests
                ],
            )
        )  # fmt: skip
    sections = [Section("Probe: groups compared within templates", tables, notes)]
    if analysis.phrases:
        groups = list(analysis.phrases)
        tops = [list(analysis.phrases[g].items())[:15] for g in groups]
        phrase_rows = [
            [f"{t[i][0]} ({t[i][1]})" if i < len(t) else "" for t in tops]
            for i in range(max(len(t) for t in tops))
        ]
        sections.append(Section("Probe: extracted phrases", [(groups, phrase_rows)], []))
    if analysis.words:
        word_rows = [
            [t.group, t.other, w.word, w.count_a, w.count_b, f"{w.delta:+.2f}", f"{w.z:.2f}"]
            for t in analysis.words
            for w in t.words
        ]
        sections.append(
            Section(
                "Probe: words typical of each group",
                [(["group", "vs", "word", "n", "n other", "log-odds δ", "z"], word_rows)],
                ["Log-odds ratio with an informative Dirichlet prior (Monroe et al. 2008)."],
            )
        )
    pair_rows = [
        [
            pair["template"],
            group,
            entry["prompt"],
            " ‖ ".join(c.strip() for c in entry["continuations"]),
        ]
        for pair in pairs
        for group, entry in pair["groups"].items()
    ]
    sections.append(
        Section(
            "Probe: continuations side by side",
            [(["template", "group", "prompt", "first continuations"], pair_rows)],
            [],
        )
    )
    return sections
