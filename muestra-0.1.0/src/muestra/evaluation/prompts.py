"""How a question is put to the model, for each scoring method, in English or Spanish.

- `letters` (MMLU's log-likelihood format): `"{question}\\nA. {A}\\nB. {B}…\\nAnswer:"`,
  continuations `" A"`, `" B"`…;
- `cloze` (ARC's): `"Question: {question}\\nAnswer:"`, continuations `" {option text}"`;
- `chat_question`: the user message of the generative methods — the question, its
  lettered options and the instruction to answer with one letter (Spanish, as seed 001
  asks: "Indica con una sola letra la opción correcta.").

Few-shot examples precede the question as lm-eval writes them: each example's context,
a space and its answer, examples separated by a blank line. Spanish tasks get Spanish
labels ("Pregunta:", "Respuesta:").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from muestra.evaluation.tasks import LETTERS, Item, Task

Format = Literal["letters", "cloze"]


@dataclass(frozen=True)
class Language:
    code: str
    question: str
    answer: str
    choose: str  # the instruction of `choice`
    reason: str  # the text-mode think instruction of `cot` / `vote`


LANGUAGES = {
    "en": Language(
        "en",
        "Question:",
        "Answer:",
        "Answer with the letter of the correct option only.",
        "Think step by step about the question in plain text before answering. You will be "
        "asked for the letter of the correct option after your reasoning.",
    ),
    "es": Language(
        "es",
        "Pregunta:",
        "Respuesta:",
        "Indica con una sola letra la opción correcta.",
        "Piensa paso a paso sobre la pregunta, en texto plano, antes de responder. Después "
        "de tu razonamiento se te pedirá la letra de la opción correcta.",
    ),
}
SPANISH = re.compile(r"[¿¡ñáéíóú]", re.IGNORECASE)


def language_of(task: Task, wanted: str = "auto") -> Language:
    """`wanted` ("en", "es"), or for "auto" Spanish when the task's name ends in "-es" or
    most of its questions have Spanish marks (¿ ¡ ñ or an accented vowel)."""
    if wanted != "auto":
        return LANGUAGES[wanted]
    marked = sum(bool(SPANISH.search(item.question)) for item in task.items)
    spanish = task.name.endswith(("-es", "_es")) or marked > len(task.items) / 2
    return LANGUAGES["es" if spanish else "en"]


def option_lines(item: Item) -> str:
    return "\n".join(
        f"{letter}. {text}" for letter, text in zip(LETTERS, item.options or (), strict=False)
    )


def loglik_context(item: Item, fmt: Format, lang: Language) -> str:
    if fmt == "letters":
        return f"{item.question}\n{option_lines(item)}\n{lang.answer}"
    return f"{lang.question} {item.question}\n{lang.answer}"


def continuations(item: Item, fmt: Format, delimiter: str = " ") -> list[str]:
    if fmt == "letters":
        return [f"{delimiter}{letter}" for letter in item.letters]
    return [f"{delimiter}{text}" for text in item.options or ()]


def with_shots(shots: tuple[Item, ...], k: int, context: str, fmt: Format, lang: Language) -> str:
    """`context` after the first `k` dev examples, each answered."""
    if k > len(shots):
        raise ValueError(f"{k} shots asked for, but the dev set has {len(shots)} questions")
    examples = []
    for shot in shots[:k]:
        answer = shot.answer if fmt == "letters" else shot.answer_text
        examples.append(f"{loglik_context(shot, fmt, lang)} {answer}")
    return "\n\n".join([*examples, context])


def chat_question(item: Item, lang: Language, instruction: str | None, shots: str = "") -> str:
    """The user message of `choice`, `cot` and `vote`: examples, question, options, and
    the instruction (None: none)."""
    body = item.question if item.options is None else f"{item.question}\n\n{option_lines(item)}"
    parts = [shots, body, instruction or ""]
    return "\n\n".join(p for p in parts if p)


def chat_shots(shots: tuple[Item, ...], k: int, lang: Language) -> str:
    """Examples for a chat prompt, in the letters format, each with its answer letter."""
    if k > len(shots):
        raise ValueError(f"{k} shots asked for, but the dev set has {len(shots)} questions")
    return "\n\n".join(f"{loglik_context(s, 'letters', lang)} {s.answer}" for s in shots[:k])
