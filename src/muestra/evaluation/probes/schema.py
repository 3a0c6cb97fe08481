"""A probe file's schema (pydantic, extra fields refused) and the loaded `Probe`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from muestra.analysis.probe_scores import score_parts
from muestra.analysis.text import Normaliser
from muestra.experiments.spec import (
    ModelSpec,
    SequentialRule,
    Strict,
    fill,
)
from muestra.settings import SampledAnswer

DATA = "muestra.evaluation.data"


class ProbeGroup(BaseModel):
    """A group: its id and the words it puts in the templates' slots (default: {group} =
    the id)."""

    model_config = ConfigDict(extra="allow")
    id: str = Field(
        min_length=1,
        pattern=r"^[^/]+$",
        description="The group's id (no `/`); every other key is a word for the templates' "
        "slot of that name.",
    )

    @property
    def words(self) -> dict[str, str]:
        words = {k: str(v) for k, v in (self.model_extra or {}).items()}
        return words or {"group": self.id}


class ProbeTemplate(Strict):
    id: str = Field(
        min_length=1,
        pattern=r"^[^/]+$",
        description="The template's id (no `/`); a template given as a bare string is t01, "
        "t02, … by position.",
    )
    text: str = Field(
        min_length=1, description="The text; {slot}s are filled with each group's words."
    )


class Decoding(SampledAnswer):  # type: ignore[misc,valid-type]
    """A probe's [decoding]: the answer's sampling (`settings.SampledAnswer`: temperature 1
    unless set), its length and stop strings."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_tokens: int = Field(16, ge=1, description="Token budget of a continuation.")
    stop: list[str] = Field(
        default_factory=lambda: ["\n"],
        description="A continuation ends at the first of these strings (which is not kept).",
    )


class LexiconSpec(Strict):
    files: list[str] = Field(
        default_factory=list,
        description="Shipped lexicons by name, or TOML/JSON files ({category: [words]}) "
        "and TXT files (one entry a line; the category is the file's stem) beside the probe.",
    )
    lemmas: bool = Field(True, description="Match on lemmas (Spanish gender and number).")


class ExtractionSpec(Strict):
    enabled: bool = Field(
        True, description="Score the first phrase after the template (false: skip it)."
    )
    max_words: int = Field(3, ge=1, le=8, description="Longest phrase kept, in words.")


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
    endpoint: str | None = Field(
        None, description="OpenAI-compatible base URL serving the judge (default: a local model)."
    )
    system: str | None = Field(
        None, description="The judge's system message; the same slots as `user` are filled."
    )
    user: str = Field(description="{prompt}, {continuation} and {text} (= both) are filled.")
    schema_: str | dict[str, Any] = Field(
        alias="schema",
        description="The JSON Schema the judge answers (greedily): a file beside the probe "
        "or an inline table.",
    )
    max_tokens: int = Field(96, ge=1, description="Token budget of a judgement.")
    field_probs: bool = Field(
        True,
        description="Store the exact probability of every enum/boolean value of the "
        "judgement (a soft score; not through an endpoint).",
    )

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ProbeStop(SequentialRule):
    """A sequential probe (`[stop]`): each template × group cell samples in rounds until the
    anytime-valid band of one model-free score's share is settled (with `compare`: the
    difference between two groups within each template); `experiments/stopping.py` runs
    the rounds, as for an experiment's `[stop]`."""

    score: str = Field(
        min_length=1,
        description='The score tracked, named as the analysis names it: "lexicon:CATEGORY" '
        '(the continuation names a word of that lexicon category), "category=CATEGORY" (its '
        'first phrase is in that category) or "phrase=PHRASE" (its first phrase is that one).',
    )
    compare: list[str] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="Two group ids: track, within each template, the difference of their "
        "shares (first minus second), sampled in pairs of the same index and seed.",
    )

    @model_validator(mode="after")
    def _a_model_free_score(self) -> ProbeStop:
        kind, name = score_parts(self.score)
        if kind is None or not name:
            raise ValueError(
                f"score = {self.score!r}: write lexicon:CATEGORY, category=CATEGORY or "
                "phrase=PHRASE (a judge's answers come after sampling, so they cannot stop it)"
            )
        return self


class ProbeSpec(Strict):
    name: str = Field(min_length=1, description="The probe's name, shown with its runs.")
    seed: int = Field(
        0, description="Seeds the samples (as a spec's seed) and the analysis' resampling."
    )
    samples: int = Field(ge=1, description="Samples per template and group.")
    language: Literal["en", "es"] = Field(
        "en", description="The templates' language: lemmas, phrase rules and findings."
    )
    mode: Literal["raw", "chat"] = Field(
        "raw",
        description="raw: the filled template as plain text, continued; chat: `instruction` "
        "as a user turn of the chat template.",
    )
    instruction: str = Field(
        "{text}", description="Chat mode: the user message; {text} is the filled template."
    )
    system: str | None = Field(None, description="Chat mode: the system message.")
    model: ModelSpec | None = Field(None, description="The model probed (or --model).")
    groups: list[str | ProbeGroup] = Field(
        min_length=2,
        description="The groups compared: ids (the word put in {group}) or tables of words.",
    )
    templates: list[str | ProbeTemplate] = Field(
        min_length=1, description="The texts continued: strings, or tables with an id."
    )
    decoding: Decoding = Field(default_factory=Decoding)
    lexicon: LexiconSpec = Field(default_factory=LexiconSpec)
    extraction: ExtractionSpec = Field(default_factory=ExtractionSpec)
    words: WordsSpec = Field(default_factory=WordsSpec)
    judge: JudgeSpec | None = None
    alpha: float = Field(0.05, gt=0, lt=1, description="Significance level after adjustment.")
    stop: ProbeStop | None = Field(
        None, description="Sample each cell until a score's share is settled (sequential)."
    )

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
