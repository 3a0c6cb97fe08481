"""A probe file's schema (pydantic, extra fields refused) and the loaded `Probe`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from muestra.analysis.text import Normaliser
from muestra.experiments.spec import (
    ModelSpec,
    Strict,
    fill,
)
from muestra.settings import SampledAnswer

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


class Decoding(SampledAnswer):  # type: ignore[misc,valid-type]
    """A probe's [decoding]: the answer's sampling (`settings.SampledAnswer`: temperature 1
    unless set), its length and stop strings."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

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
