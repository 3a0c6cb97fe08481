"""`muestra eval`: a task scored by one method, through the experiment store.

Every method is an experiment run: the questions become prompt items (id, category as
group, the right answer and options as variables, the option letters as the item's
`choice`), the method becomes the think/answer sections, and the runner samples, stores
and resumes as for any spec. The spec's TOML text is kept in the store (`runs`) and a row
in `evals` names the task and method; the scores are computed from the stored samples, so
rerunning a finished evaluation only reads the store.

- `choice`: one answer per question constrained to the option letters; its exact letter
  probabilities (`field_probs`) give argmax accuracy and expected accuracy. With
  `samples` > 1 the letters are also drawn (temperature 1 unless set) to compare.
- `loglik`: lm-eval's log-likelihood scoring (`loglik.py`); the stored sample's answer is
  the most likely option, `scores` hold every option's log-likelihood.
- `cot`: the model reasons within the think budget (its think tags, or plain text asked
  for in the prompt), then answers a letter under the grammar.
- `vote`: self-consistency: N reasoning paths per question sampled (T 0.7, top-p 0.9 by
  default, as seed 004), each answered greedily under the grammar, the majority voted
  (optionally weighted by each path's letter probability); accuracy for k = 1, 3, … N.
  Open questions (no options) are voted on their normalised answer text.
"""

from __future__ import annotations

import math
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, get_type_hints

from pydantic import Field, TypeAdapter, ValidationError

from muestra.analysis.accuracy import (
    Accuracy,
    McNemar,
    accuracy,
    expected_accuracy,
    majority,
    mcnemar,
    paired_bootstrap,
    vote_curve,
)
from muestra.errors import InputError
from muestra.evaluation import prompts
from muestra.evaluation.tasks import LETTERS, Item, Task
from muestra.experiments.executor import Batch, RunnerView
from muestra.experiments.planning import split_budget
from muestra.experiments.runner import Progress, Runner
from muestra.experiments.spec import LoadedSpec, spec_from_data
from muestra.experiments.store import (
    connect,
    dumps,
    eval_record,
    latest_model_ref,
    prompt_rows,
    record_eval,
)
from muestra.settings import SETTING, check_sampling, flag, sampling_table

Method = Literal["choice", "loglik", "cot", "vote"]
METHODS: tuple[str, ...] = ("choice", "loglik", "cot", "vote")
OPEN_MAX_TOKENS = 48
# the sampling settings a method's preset takes from the command (--temperature, --top-p)
PRESET_SAMPLING = (SETTING.temperature, SETTING.top_p)
OPEN_INSTRUCTION = {
    "en": "Answer with a word or a short phrase only.",
    "es": "Responde solo con una palabra o una frase corta.",
}


def _used_by(*methods: str, default: Any = None, flag: str | None = None) -> Any:
    """A setting only `methods` use: the others refuse it when changed (a setting given
    and then ignored would be a result that does not mean what its command says)."""
    return field(default=default, metadata={"methods": methods, "flag": flag})


Count = Annotated[int, Field(ge=1)]


@dataclass(frozen=True)
class EvalSettings:
    """An evaluation's settings; the annotations are the bounds, checked (strictly: "3" is
    no count) for every caller — the CLI names a wrong one by its flag (`SETTING_FLAGS`),
    the notebook API by its keyword."""

    method: str = "choice"
    format: str = _used_by("loglik", default="cloze")  # letters | cloze
    chat: bool = _used_by("loglik", default=False)  # apply the chat template to the context
    raw: bool = _used_by("choice", "cot", "vote", default=False)  # no chat template
    shots: Annotated[int, Field(ge=0)] = 0
    # the first N questions: a count of 0 or less would keep a slice of them (items[:-1],
    # all but one) and store it as a finished evaluation
    limit: Count | None = None
    # per question (vote: 5, others: 1); cot scores one reasoning: several are a vote
    samples: Count | None = _used_by("choice", "vote", flag="--samples-per-question")
    think_budget: Count = _used_by("cot", "vote", default=256)
    temperature: float | None = _used_by("choice", "cot", "vote")  # draws: 1; cot 0; vote 0.7
    top_p: float | None = _used_by("cot", "vote")  # vote: 0.9
    weighted: bool = _used_by("vote", default=False)  # weight a path by its letter probability
    language: str = "auto"
    regex: str | None = _used_by("vote")  # open vote: the answer is this regex's first group
    seed: int = 0
    dtype: str = "auto"
    # vote, sequential: each question samples until the share of its right answer is
    # within ± precision or excludes reference (at most `samples` paths; [stop] table)
    precision: float | None = _used_by("vote")
    reference: float | None = _used_by("vote")
    min_samples: int = _used_by("vote", default=10)
    every: int = _used_by("vote", default=10)

    def __post_init__(self) -> None:
        check_setting_types(self)
        if self.method not in METHODS:
            raise InputError(f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.format not in ("letters", "cloze"):
            raise InputError(f"--format {self.format!r} is not letters or cloze")
        if self.language not in ("auto", "en", "es"):
            raise InputError(f"--language {self.language!r} is not auto, en or es")
        if self.chat and self.method != "loglik":
            raise InputError("--chat is for --method loglik (the others use the chat template)")
        if self.raw and self.method == "loglik":
            raise InputError("--raw is for choice, cot and vote; loglik is raw unless --chat")
        given = {name: getattr(self, name) for name in PRESET_SAMPLING}
        check_sampling({k: v for k, v in given.items() if v is not None}, flag)
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as err:
                raise InputError(f"--regex {self.regex!r} is not a valid regex ({err})") from err

    def check_applies(self, flags: Mapping[str, str] | None = None) -> None:
        """Refuse, by name, a setting changed from its default that this method does not
        use (`METHOD_SETTINGS`); `flags` names them as the command does."""
        check_methods([self.method], asdict(self), flags)

    @property
    def per_question(self) -> int:
        return self.samples if self.samples is not None else 5 if self.method == "vote" else 1


SETTING_FLAGS = {"limit": "--n", "samples": "--samples-per-question"}  # else --name-like-this


def check_setting_types(settings: EvalSettings) -> None:
    """Each setting against its annotation (type and bounds, strict), named by its flag."""
    for name, adapter in _setting_adapters().items():
        value = getattr(settings, name)
        try:
            adapter.validate_python(value, strict=True)
        except ValidationError as err:
            flag = SETTING_FLAGS.get(name, "--" + name.replace("_", "-"))
            said = err.errors()[0]["msg"].replace("Input should be", "should be")
            raise InputError(f"{flag} {value!r}: {said}") from None


@lru_cache(maxsize=1)
def _setting_adapters() -> dict[str, TypeAdapter[Any]]:
    hints = get_type_hints(EvalSettings, include_extras=True)
    return {f.name: TypeAdapter(hints[f.name]) for f in fields(EvalSettings)}


# the settings only some methods use (`_used_by`), and the flags that set them
METHOD_SETTINGS: dict[str, tuple[str, ...]] = {
    f.name: f.metadata["methods"] for f in fields(EvalSettings) if "methods" in f.metadata
}
EVAL_FLAGS = {
    f.name: f.metadata["flag"] or flag(f.name) for f in fields(EvalSettings) if f.metadata
}


def check_methods(
    methods: Sequence[str], values: Mapping[str, Any], flags: Mapping[str, str] | None = None
) -> None:
    """Every setting in `values` changed from its default applies to at least one of
    `methods`, or is refused by name."""
    default = {f.name: f.default for f in fields(EvalSettings)}
    names = {**EVAL_FLAGS, **(flags or {})}
    refused = [
        f"{names[name]} ({', '.join(applies)})"
        for name, applies in METHOD_SETTINGS.items()
        if values.get(name, default[name]) != default[name] and not set(methods) & set(applies)
    ]
    if refused:
        raise InputError(
            f"{'; '.join(refused)}: not used by --method {','.join(methods)}; each applies "
            "only to the methods in brackets: leave it out or add such a method"
        )


def settings_for(method: str, values: Mapping[str, Any]) -> EvalSettings:
    """One method's settings out of a command's flags: those it does not use stay at their
    defaults (a command may list several methods; `check_methods` has checked the rest)."""
    kept = {
        name: value
        for name, value in values.items()
        if name not in METHOD_SETTINGS or method in METHOD_SETTINGS[name]
    }
    return EvalSettings(method=method, **kept)


@dataclass
class ItemScore:
    id: str
    category: str | None
    answer: str | None
    predicted: str | None
    correct: bool
    probs: dict[str, float] | None = None  # the letters' exact probabilities
    logliks: dict[str, float] | None = None
    votes: dict[str, int] | None = None
    p_correct: float | None = None  # probability of the right answer
    draws_correct: float | None = None  # share of right sampled answers
    predicted_norm: str | None = None  # loglik: the best option by acc_norm
    error: str | None = None


@dataclass
class EvalResult:
    method: str
    model: str
    task: str
    settings: EvalSettings
    store: Path
    run_id: int
    items: list[ItemScore]
    accuracy: Accuracy
    by_category: dict[str, Accuracy]
    expected: tuple[float, float, float] | None = None  # choice / cot: mean p(right)
    acc_norm: Accuracy | None = None  # loglik
    draws: Accuracy | None = None  # choice with samples > 1: every drawn answer
    curve: list[tuple[int, Accuracy]] | None = None  # vote
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    timing: dict[str, Any] | None = None  # `muestra compare`: load, prefill, decode
    tag: str = ""  # tells apart two scorings of one model (`compare`: the runtimes)

    @property
    def label(self) -> str:
        s = self.settings
        how = f" {s.format}" if self.method == "loglik" else ""
        tag = f" ({self.tag})" if self.tag else ""
        return f"{self.method}{how} · {Path(self.model).name or self.model}{tag}"

    def as_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "model": self.model,
            "task": self.task,
            "settings": asdict(self.settings),
            "store": str(self.store),
            "run_id": self.run_id,
            **self.accuracy.as_dict(),
            "by_category": {k: v.as_dict() for k, v in self.by_category.items()},
            "expected_accuracy": None
            if self.expected is None
            else dict(zip(("value", "low", "high"), self.expected, strict=True)),
            "acc_norm": None if self.acc_norm is None else self.acc_norm.as_dict(),
            "draw_accuracy": None if self.draws is None else self.draws.as_dict(),
            "vote_curve": None
            if self.curve is None
            else [{"k": k, **a.as_dict()} for k, a in self.curve],
            "items": [
                {k: v for k, v in asdict(item).items() if v is not None or k == "predicted"}
                for item in self.items
            ],
            "notes": self.notes,
            "timing": self.timing,
        }


# ---- the spec of an evaluation ---------------------------------------------------------


def build_spec(
    model: str,
    task: Task,
    settings: EvalSettings,
    model_options: Mapping[str, Any] | None = None,
) -> LoadedSpec:
    """The experiment spec of `task` scored by `settings.method` on `model`
    (`model_options`: [model] fields such as runtime and threads)."""
    settings.check_applies()
    items = list(task.items if settings.limit is None else task.items[: settings.limit])
    if not items:
        raise InputError(f"{task.source}: no questions to evaluate")
    _check_sizes(items, task)
    _check_model(model)
    is_open = _check_questions(items, task, settings)
    lang = prompts.language_of(task, settings.language)
    method = settings.method
    spec: dict[str, Any] = {
        "name": f"eval {task.name} {method}",
        "seed": settings.seed,
        "samples": settings.per_question,
        "model": {"id": model, "dtype": settings.dtype, **(model_options or {})},
    }
    if method == "loglik":
        spec["prompt"] = _loglik_prompt(items, task, settings, lang)
        spec["answer"] = {"max_tokens": 1, "field_probs": True}
        return spec_from_data(spec, Path(task.source))
    shots = prompts.chat_shots(task.shots, settings.shots, lang) if settings.shots else ""
    instruction = OPEN_INSTRUCTION[lang.code] if is_open else lang.choose
    rows = []
    for item in items:
        row: dict[str, Any] = {
            "id": item.id,
            "group": item.category,
            "text": prompts.chat_question(item, lang, instruction, shots),
            "answer": item.answer,
        }
        if item.options is not None:
            row |= {"choice": list(item.letters), "options": list(item.options)}
        rows.append(row)
    if settings.raw:  # a base model: the question as text, then "Answer:" to continue
        for row in rows:
            row["text"] = f"{row['text']}\n\n{lang.answer}"
    spec["prompt"] = {"user": "{text}", "raw": settings.raw, "items": rows}
    answer: dict[str, Any] = {"max_tokens": OPEN_MAX_TOKENS if is_open else 4}
    temperature, top_p = method_sampling(settings)
    if method == "choice":
        answer |= sampling_table(temperature=temperature)
    elif method in ("cot", "vote"):
        sampled = sampling_table(temperature=temperature, top_p=top_p)
        if is_open:  # an open vote samples the answer itself, no reasoning
            answer |= sampled
        else:
            think = {"budget": settings.think_budget, "mode": "auto", "instruction": lang.reason}
            spec["think"] = {**think, **sampled, **sampling_table(top_k=0, min_p=0.0)}
    if not is_open:
        answer["field_probs"] = True
    spec["answer"] = answer
    if settings.precision is not None or settings.reference is not None:
        spec["stop"] = _vote_stop(settings, is_open, task)
    return spec_from_data(spec, Path(task.source))


def _vote_stop(settings: EvalSettings, is_open: bool, task: Task) -> dict[str, Any]:
    """A sequential vote: each question's paths are sampled until the share of its right
    answer (its letter, `{answer}`) is settled; at most `samples` paths."""
    if is_open:
        raise InputError(
            f"{task.source} has open questions: --precision/--reference track the share of "
            "a question's right letter; they need multiple-choice questions"
        )
    stop = {"field": "answer", "value": "{answer}", "min_samples": settings.min_samples}
    stop |= {"every": settings.every, "max_samples": settings.per_question}
    stop |= {k: getattr(settings, k) for k in ("precision", "reference")}
    return {k: v for k, v in stop.items() if v is not None}


def method_sampling(settings: EvalSettings) -> tuple[float, float]:
    """(temperature, top-p) of a method's sampled phase: the settings' own,
    else the method's own (choice: greedy, temperature 1 when it draws several letters;
    cot: greedy; vote: T 0.7, top-p 0.9, as seed 004)."""
    method = settings.method
    vote = method == "vote"
    draws = method == "choice" and settings.per_question > 1
    temperature = 0.7 if vote else 1.0 if draws else 0.0
    top_p = 0.9 if vote else 1.0
    return (
        settings.temperature if settings.temperature is not None else temperature,
        settings.top_p if settings.top_p is not None else top_p,
    )


def _check_questions(items: list[Item], task: Task, settings: EvalSettings) -> bool:
    """Whether the questions are open ones (no options), after refusing what the method
    and settings cannot score: open and multiple-choice mixed, a setting open questions
    do not take, more shots than the dev file has."""
    is_open = any(item.options is None for item in items)
    if is_open and (settings.method != "vote" or not all(i.options is None for i in items)):
        raise InputError(
            f"{task.source}: questions without options are open questions; only "
            "--method vote scores them, and a task cannot mix them with multiple choice"
        )
    default = EvalSettings()
    if is_open and (settings.weighted or settings.think_budget != default.think_budget):
        raise InputError(
            f"{task.source} has open questions: a vote samples their answers directly, with "
            "no reasoning and no letter probabilities; leave out --think-budget and --weighted"
        )
    if not is_open and settings.regex is not None:
        raise InputError(
            f"--regex {settings.regex!r} reads the answer of open questions; {task.source} "
            "is multiple choice (its answers are letters under a grammar): leave it out"
        )
    if settings.shots > len(task.shots):
        raise InputError(
            f"--shots {settings.shots}, but {task.source} has {len(task.shots)} dev questions "
            "(give a dev file with --dev, or NAME.dev.jsonl beside the task)"
        )
    return is_open


def _check_sizes(items: list[Item], task: Task) -> None:
    """Refuse a question longer than a prompt may be, naming its file and id (before
    the spec's own check, whose advice — raise prompt.max_chars — eval cannot follow)."""
    from muestra.experiments.spec import PromptSpec

    limit = PromptSpec.model_fields["max_chars"].default
    for item in items:
        size = len(item.question) + sum(len(o) for o in item.options or ())
        if size > limit:
            raise InputError(
                f"{task.source}: question {item.id!r} is {size:,} characters with its "
                f"options, over the limit of {limit:,} for one prompt; shorten it or "
                "leave it out"
            )


def _check_model(model: str) -> None:
    """A local path that does not exist, named as the MODEL argument it is."""
    from muestra.models.loading import resolve_model

    if model.startswith((".", "/", "~")) and not Path(model).expanduser().exists():
        resolve_model(model)  # raises ModelNotFoundError naming the path and the fix


def _loglik_prompt(
    items: list[Item], task: Task, settings: EvalSettings, lang: prompts.Language
) -> dict[str, Any]:
    fmt = settings.format
    rows = []
    for item in items:
        context = prompts.loglik_context(item, fmt, lang)  # type: ignore[arg-type]
        if settings.shots:
            context = prompts.with_shots(task.shots, settings.shots, context, fmt, lang)  # type: ignore[arg-type]
        rows.append(
            {
                "id": item.id,
                "group": item.category,
                "text": context,
                "answer": item.answer,
                "options": list(item.options or ()),
                # with a chat template the answer starts the assistant's turn: no space
                "continuations": prompts.continuations(item, fmt, "" if settings.chat else " "),  # type: ignore[arg-type]
            }
        )
    return {"user": "{text}", "raw": not settings.chat, "items": rows}


# ---- running ---------------------------------------------------------------------------


def evaluate(
    model: str,
    task: Task,
    settings: EvalSettings,
    store: Path,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    trust_remote_code: bool = False,
    model_options: Mapping[str, Any] | None = None,
) -> EvalResult:
    """Run (or resume) `task` scored by `settings.method` on `model` into `store`."""
    options, budget = split_budget(model_options)
    loaded = build_spec(model, task, settings, options)
    runner = Runner(
        loaded,
        Path(store),
        resume_any=True,
        on_note=on_note,
        trust_remote_code=trust_remote_code,
        model_options=budget,
        executor=LoglikScoring() if settings.method == "loglik" else None,
    )
    started = time.perf_counter()
    with runner:  # closes the store however it ends
        run_id = runner.open()
        assert runner.db is not None
        record_eval(runner.db, run_id, settings.method, task, dumps(asdict(settings)))
        with runner.tracking():
            runner.run(on_progress)
    result = read_result(Path(store), run_id, settings)
    result.seconds = time.perf_counter() - started
    return result


class LoglikScoring:
    """The runner's executor (experiments/executor.py) for `--method loglik`: each
    question scored by log-likelihood in place of generation, one stored "sample" per
    question, its answer the most likely option."""

    plans_memory = True  # it scores with the run's model: the runner plans its memory first

    def __init__(self) -> None:
        self.fits_checked = False

    def load(self, runner: RunnerView, model: Any) -> Any:
        return runner.load(model)

    def check_context(self, spec: Any, loaded: Any, encode: Any, question: Any) -> None:
        """Refuse, before any question is scored, one whose context and longest option
        do not fit the model's context (lm-eval would cut the context from the left and
        score a different question)."""
        from muestra.errors import ContextLengthError
        from muestra.evaluation.loglik import encode_pair

        limit = loaded.runtime.max_length
        self.fits_checked = True
        if limit is None:
            return
        for item in spec.spec.prompt.items:
            context, continuations = question(item)
            for letter, continuation in zip(LETTERS, continuations, strict=False):
                ids, cont = encode_pair(encode, context, continuation)
                if len(ids) + len(cont) > limit:
                    raise ContextLengthError(
                        f"{spec.path}: question {item.id!r} with option {letter} is "
                        f"{len(ids) + len(cont):,} tokens, over the model's context of "
                        f"{limit:,} (--method loglik); nothing was scored. Shorten the "
                        "question or leave it out (or keep the first questions: --n)"
                    )

    def run_batch(self, runner: RunnerView, loaded: Any, batch: Batch) -> list[dict[str, Any]]:
        import torch

        from muestra.answers.structured import StructuredSample
        from muestra.evaluation.loglik import loglikelihoods
        from muestra.experiments.prompts import messages_for
        from muestra.models.inspection import render_chat

        tokenizer = loaded.tokenizer
        chat = False

        def encode(text: str) -> list[int]:
            # raw text follows the tokenizer's own special-token rule (lm-eval's hf
            # backend does the same for Gemma's <bos>); a rendered chat template has its own
            return tokenizer(text, add_special_tokens=not chat)["input_ids"]

        def question(item: Any) -> tuple[str, list[str]]:
            nonlocal chat
            prompt = messages_for(runner.spec, item)
            if not isinstance(prompt, str):  # --chat: the rendered template, as text
                prompt = render_chat(tokenizer, prompt)[0]
                chat = True
            return prompt, item.variables["continuations"]

        if not self.fits_checked:  # every question, before the first is scored
            self.check_context(runner.spec, loaded, encode, question)
        questions = [question(unit.item) for unit, _ in batch]
        started = time.perf_counter()
        scored = loglikelihoods(loaded.runtime, encode, questions)
        seconds = time.perf_counter() - started
        rows = []
        for (unit, _), (context, conts), options in zip(batch, questions, scored, strict=True):
            letters = list(LETTERS[: len(conts)])
            logliks = [o.loglik for o in options]
            probs = torch.softmax(torch.tensor(logliks, dtype=torch.float64), 0).tolist()
            best = max(range(len(conts)), key=lambda i: logliks[i])
            chars = [len(c.lstrip(" ")) for c in conts]  # lm-eval: len() of the choice text
            norm = max(range(len(conts)), key=lambda i: logliks[i] / max(chars[i], 1))
            sample = StructuredSample(
                prompt_index=unit.prompt_index, sample=0, seed=runner.spec.spec.seed,
                text=letters[best], token_ids=[], finish_reason="stop", stop_reason=None,
                num_prompt_tokens=len(encode(context)), reasoning=None, think_tokens=0,
                budget_hit=False, answer_text=letters[best], answer=letters[best],
                field_probs={"answer": dict(zip(letters, probs, strict=True))}, error=None,
            )  # fmt: skip
            row = runner.row(unit, sample, None, seconds)
            row["scores_json"] = dumps(
                {
                    "logliks": dict(zip(letters, logliks, strict=True)),
                    "is_greedy": {x: o.is_greedy for x, o in zip(letters, options, strict=True)},
                    "tokens": {x: o.num_tokens for x, o in zip(letters, options, strict=True)},
                    "chars": dict(zip(letters, chars, strict=True)),
                    "acc_norm": letters[norm],
                }
            )
            rows.append(row)
        return rows


# ---- scoring from the store -------------------------------------------------------------


def normalize(text: str | None) -> str | None:
    """An open answer for counting: lower case, accents and punctuation dropped, spaces
    collapsed ("París." → "paris")."""
    if text is None:
        return None
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    words = re.sub(r"[^\w\s]", " ", plain)
    return " ".join(words.split()) or None


def extract(text: str, regex: str | None) -> str | None:
    if regex is None:
        return text
    found = re.search(regex, text)
    if found is None:
        return None
    return found.group(1) if found.groups() else found.group(0)


def read_result(
    store: Path, run_id: int | None = None, settings: EvalSettings | None = None
) -> EvalResult:
    """The scores of an evaluation run in `store` (the latest when `run_id` is None),
    scored with `settings` when given (the same samples can be voted with or without
    weights, or extracted with another regex), else with the run's own."""
    import json

    from muestra.experiments.results import samples_frame

    with connect(store, create=False) as db:
        row = eval_record(db, run_id)
        if row is None:
            raise InputError(f"{store} holds no evaluation run (`muestra eval` writes those)")
        frame = samples_frame(db, int(row["run_id"]))
        model = latest_model_ref(db, int(row["run_id"]))
        items = [
            (r["prompt_key"], r["group_name"], json.loads(r["variables_json"]))
            for r in prompt_rows(db, int(row["run_id"]))
        ]
    if settings is None:
        settings = EvalSettings(**json.loads(row["settings_json"]))
    scores = [_score(key, group, variables, frame, settings) for key, group, variables in items]
    done = [s for s in scores if s is not None]
    result = EvalResult(
        method=row["method"],
        model=model,
        task=row["task_name"],
        settings=settings,
        store=store,
        run_id=int(row["run_id"]),
        timing=json.loads(row["timing_json"]) if row["timing_json"] else None,
        items=done,
        accuracy=accuracy([s.correct for s in done]),
        by_category={
            c: accuracy([s.correct for s in done if s.category == c])
            for c in sorted({s.category for s in done if s.category is not None})
        },
    )
    if len(done) < len(items):
        result.notes.append(f"{len(items) - len(done)} of {len(items)} questions not run yet")
    probs = [s.p_correct for s in done]
    if done and all(p is not None for p in probs) and settings.method != "vote":
        result.expected = expected_accuracy(probs, seed=settings.seed)  # type: ignore[arg-type]
    if settings.method == "loglik":
        result.acc_norm = accuracy([s.answer == s.predicted_norm for s in done])
    if settings.method == "choice" and settings.per_question > 1:
        shares = [s.draws_correct for s in done if s.draws_correct is not None]
        result.draws = _draws(shares, settings.per_question, settings.seed)
    if settings.method == "vote":
        result.curve = _curve(frame, done, settings)
    invalid = sum(1 for s in done if s.error)
    if invalid:
        result.notes.append(f"{invalid} questions have an invalid answer (counted as wrong)")
    return result


def _draws(shares: list[float], per_question: int, seed: int) -> Accuracy:
    """Right sampled answers over all draws; the interval resamples questions (a
    question's draws are not independent of each other: pooling them as if they were
    would understate the uncertainty)."""
    from muestra.analysis.stats import bootstrap_mean

    low, high = bootstrap_mean(shares, seed=seed)
    hits = round(sum(shares) * per_question)
    return Accuracy(hits, len(shares) * per_question, low, high)


def _score(
    key: str, group: str | None, variables: dict[str, Any], frame: Any, settings: EvalSettings
) -> ItemScore | None:
    rows = frame[frame["prompt_id"] == key] if len(frame) else frame
    if len(rows) == 0:
        return None
    gold = variables.get("answer")
    records = rows.sort_values("sample").to_dict(orient="records")
    first = records[0]
    answers = [_answer(r) for r in records]
    errors = [r["error"] for r in records if r["error"]]
    score = ItemScore(key, group, gold, None, False, error=errors[0] if errors else None)
    if settings.method == "vote":
        is_open = "options" not in variables
        if is_open:
            votes = [normalize(extract(r["answer_text"], settings.regex)) for r in records]
            gold = normalize(gold)
            weights = None
        else:
            votes = answers
            weights = (
                [_prob(r, a) for r, a in zip(records, answers, strict=False)]
                if settings.weighted
                else None
            )
        score.predicted = majority(votes, weights)
        score.votes = dict(Counter(v for v in votes if v is not None).most_common())
        score.correct = gold is not None and score.predicted == gold
        score.error = score.error if score.predicted is None else None
        return score
    probs = (first.get("field_probs") or {}).get("answer")
    score.probs = probs
    if settings.method == "loglik":
        scores = first["scores"] or {}
        score.logliks = scores.get("logliks")
        score.predicted_norm = scores.get("acc_norm")
        score.predicted = answers[0]
    elif probs and settings.method == "choice":
        score.predicted = max(probs, key=lambda k: probs[k])
    elif settings.method == "choice":
        score.predicted = majority(answers)
    else:  # cot: the answer after the reasoning
        score.predicted = answers[0]
    if probs and gold is not None:
        score.p_correct = float(probs.get(gold, 0.0))
    if settings.method == "choice" and settings.per_question > 1:
        score.draws_correct = sum(a == gold for a in answers) / len(answers)
    score.correct = score.predicted is not None and score.predicted == gold
    return score


def _answer(record: dict[str, Any]) -> str | None:
    value = record.get("answer")
    if record.get("error") or value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


def _prob(record: dict[str, Any], answer: str | None) -> float:
    probs = (record.get("field_probs") or {}).get("answer") or {}
    return float(probs.get(answer, 0.0)) if answer is not None else 0.0


def _curve(frame: Any, done: list[ItemScore], settings: EvalSettings) -> list[tuple[int, Accuracy]]:
    votes, weights, golds = [], [], []
    for score in done:
        rows = frame[frame["prompt_id"] == score.id].sort_values("sample").to_dict("records")
        if "var_options" in frame.columns and isinstance(rows[0].get("var_options"), list):
            path_votes = [_answer(r) for r in rows]
            gold = score.answer
        else:
            path_votes = [normalize(extract(r["answer_text"], settings.regex)) for r in rows]
            gold = normalize(score.answer)
        votes.append(path_votes)
        weights.append([_prob(r, v) for r, v in zip(rows, path_votes, strict=False)])
        golds.append(gold)
    return vote_curve(votes, golds, weights if settings.weighted else None)


# ---- comparing two scorings of the same questions --------------------------------------


@dataclass(frozen=True)
class PairedComparison:
    a: str
    b: str
    questions: int
    agreement: float  # share of questions with the same predicted answer
    accuracy_a: float
    accuracy_b: float
    difference: tuple[float, float, float]  # a − b, low, high (paired bootstrap)
    mcnemar: McNemar


def compare_results(a: EvalResult, b: EvalResult, label_a: str, label_b: str) -> PairedComparison:
    """Paired comparison over the questions both results scored."""
    by_id = {s.id: s for s in b.items}
    pairs = [(s, by_id[s.id]) for s in a.items if s.id in by_id]
    if not pairs:
        raise InputError(f"{label_a} and {label_b} share no scored question")
    ca = [x.correct for x, _ in pairs]
    cb = [y.correct for _, y in pairs]
    return PairedComparison(
        label_a,
        label_b,
        len(pairs),
        sum(x.predicted == y.predicted for x, y in pairs) / len(pairs),
        sum(ca) / len(ca),
        sum(cb) / len(cb),
        paired_bootstrap(ca, cb, seed=a.settings.seed),
        mcnemar(ca, cb),
    )
