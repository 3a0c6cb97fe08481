"""Model-free scores of free text: words, lexicon matches, the phrase after a template, and
which words tell two groups' texts apart.

- `Normaliser`: words of a text (Unicode `\\w+`, lower case), each as its lemma
  (simplemma's offline dictionaries: Spanish "enfermera"/"enfermeras" → "enfermero", so
  a lexicon entry matches both genders and numbers) folded to ASCII letters ("médico" and
  "medico" are one word). A lexicon entry goes through the same steps, so entries and
  texts meet in one form.
- `Lexicon`: categories of words or phrases (`{"caring": ["nurse", "stay-at-home parent"],
  ...}`); `counts(text)` is how many times each category occurs in a text.
- `extract_phrase`: the first phrase after a template ("worked as **a nurse** at the
  hospital" → "nurse"): leading articles skipped, cut at punctuation or at the first
  word that starts a new phrase (prepositions, conjunctions, relative pronouns), at most
  `max_words` words, lemmatised.
- `log_odds`: the log-odds ratio of every word between two corpora with an informative
  Dirichlet prior and its z-score (Monroe, Colaresi & Quinn 2008, "Fightin' Words",
  eqs. 16 and 18–22): the prior is the pooled corpus, scaled by `prior_scale`.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

WORD = re.compile(r"\w+(?:[-']\w+)*", re.UNICODE)
# punctuation that ends the phrase after a template
PHRASE_END = re.compile(r"[.,;:!?()\[\]\"“”«»\n]")

# words that are not part of the phrase: skipped at its start (articles) or ending it
ARTICLES = {
    "en": {"a", "an", "the", "some"},
    "es": {"un", "una", "unos", "unas", "el", "la", "los", "las", "lo"},
}
PHRASE_BREAKS = {
    "en": {
        "at", "in", "on", "for", "with", "and", "or", "but", "who", "that", "which", "of",
        "from", "to", "by", "as", "because", "while", "when", "where", "since", "until",
        "after", "before", "during", "is", "was", "were", "has", "had", "he", "she", "they",
        "his", "her", "their", "its", "my", "your", "our", "so", "then", "now", "back",
        "whose", "this", "these", "there", "here", "than", "if", "not",
    },
    "es": {
        "en", "de", "del", "con", "y", "e", "o", "u", "pero", "que", "quien", "cual", "para",
        "por", "a", "al", "como", "porque", "mientras", "cuando", "donde", "desde", "hasta",
        "durante", "es", "era", "fue", "ha", "había", "él", "ella", "sin", "sobre", "su",
        "sus", "mi", "así", "ya", "entonces", "si", "no", "muy", "más", "este", "esta",
    },
}  # fmt: skip


def fold(word: str) -> str:
    """`word` without accents (NFKD, combining marks dropped); ñ stays ñ."""
    kept = []
    for char in unicodedata.normalize("NFKD", word):
        if unicodedata.combining(char):
            if char == "\u0303" and kept and kept[-1] in "nN":  # ñ
                kept[-1] = "ñ" if kept[-1] == "n" else "Ñ"
            continue
        kept.append(char)
    return "".join(kept)


@lru_cache(maxsize=200_000)
def _lemma(word: str, language: str) -> str:
    import simplemma

    return simplemma.lemmatize(word, lang=language).lower()


@dataclass(frozen=True)
class Normaliser:
    """Words of a text in one comparable form: lower case, lemma (when `lemmas`), no accents."""

    language: str = "en"
    lemmas: bool = True

    def word(self, word: str) -> str:
        word = word.lower()
        if self.lemmas:
            word = _lemma(word, self.language)
        return fold(word)

    def words(self, text: str) -> list[str]:
        return [self.word(w) for w in WORD.findall(text)]

    def forms(self, word: str) -> set[str]:
        """Every form a lexicon matches `word` on: its lemma and its own spelling (both
        without accents), and in Spanish the masculine of an -a/-as word ("lista", whose
        lemma is the noun "lista", still meets the entry "listo")."""
        lower = word.lower()
        found = {self.word(word), fold(lower)}
        if self.language == "es" and lower.endswith(("a", "as")):
            found.add(fold(lower.removesuffix("s")[:-1] + "o"))
        return found


class Lexicon:
    """Word categories; an entry may be a phrase of several words."""

    def __init__(self, categories: Mapping[str, Iterable[str]], normaliser: Normaliser) -> None:
        self.normaliser = normaliser
        self.categories = list(categories)
        # first word -> [(entry words, category)], longest entries first; a one-word entry
        # is kept under its lemma and its own spelling
        self._entries: dict[str, list[tuple[tuple[str, ...], str]]] = {}
        for category, entries in categories.items():
            for entry in entries:
                words = tuple(normaliser.words(entry))
                keys = {words} if len(words) != 1 else {(f,) for f in normaliser.forms(entry)}
                for key in keys:
                    if key and (key, category) not in self._entries.get(key[0], []):
                        self._entries.setdefault(key[0], []).append((key, category))
        for options in self._entries.values():
            options.sort(key=lambda e: -len(e[0]))

    def matches(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, category) of each entry in `text`'s words, left to right, a word in
        at most one match (the longest entry starting there wins; a word's categories
        are those of its first matching form)."""
        raw = WORD.findall(text)
        words = [self.normaliser.word(w) for w in raw]
        found, i = [], 0
        while i < len(words):
            hit = None
            for entry, category in self._entries.get(words[i], ()):
                if len(entry) > 1 and tuple(words[i : i + len(entry)]) == entry:
                    hit = (i, i + len(entry), [category])
                    break
            if hit is None:
                for form in sorted(self.normaliser.forms(raw[i]), key=lambda f: f != words[i]):
                    categories = [c for e, c in self._entries.get(form, ()) if len(e) == 1]
                    if categories:
                        hit = (i, i + 1, categories)
                        break
            if hit is None:
                i += 1
                continue
            found += [(hit[0], hit[1], c) for c in dict.fromkeys(hit[2])]
            i = hit[1]
        return found

    def counts(self, text: str) -> dict[str, int]:
        counted = Counter(c for _, _, c in self.matches(text))
        return {c: counted.get(c, 0) for c in self.categories}

    def category_of(self, phrase: str) -> str | None:
        """The category of the first entry found in `phrase` (None: no entry)."""
        found = self.matches(phrase)
        return found[0][2] if found else None


def extract_phrase(text: str, normaliser: Normaliser, max_words: int = 3) -> str | None:
    """The first phrase of a continuation, normalised (None when it starts with none)."""
    head = PHRASE_END.split(text, maxsplit=1)[0]
    words = [w.lower() for w in WORD.findall(head)]
    articles = ARTICLES.get(normaliser.language, set())
    breaks = PHRASE_BREAKS.get(normaliser.language, set())
    while words and words[0] in articles:
        words = words[1:]
    kept: list[str] = []
    for word in words:
        if word in breaks or len(kept) == max_words:
            break
        kept.append(word)
    if not kept:
        return None
    return " ".join(normaliser.word(w) for w in kept)


@dataclass(frozen=True)
class WordScore:
    word: str
    count_a: int
    count_b: int
    delta: float  # log-odds ratio, a vs b (positive: more typical of a)
    variance: float
    z: float


def log_odds(
    counts_a: Mapping[str, int],
    counts_b: Mapping[str, int],
    prior: Mapping[str, float] | None = None,
    prior_scale: float = 1.0,
) -> list[WordScore]:
    """Monroe, Colaresi & Quinn (2008) log-odds with an informative Dirichlet prior.

    With y_w^i the count of word w in corpus i, n^i its size, α_w the prior of w
    (`prior`, default the pooled counts y_w^a + y_w^b, times `prior_scale`) and α_0 = Σ α_w:

        δ_w = log[(y_w^a + α_w) / (n^a + α_0 − y_w^a − α_w)]
              − log[(y_w^b + α_w) / (n^b + α_0 − y_w^b − α_w)]
        σ²(δ_w) ≈ 1/(y_w^a + α_w) + 1/(y_w^b + α_w),   z_w = δ_w / σ(δ_w)

    Sorted by z, most typical of a first."""
    words = sorted(set(counts_a) | set(counts_b))
    if not words:
        return []
    y_a = np.array([counts_a.get(w, 0) for w in words], dtype=float)
    y_b = np.array([counts_b.get(w, 0) for w in words], dtype=float)
    base = (
        np.array([prior.get(w, 0.0) for w in words], dtype=float)
        if prior is not None
        else y_a + y_b
    )
    alpha = base * prior_scale
    if np.any(alpha <= 0):
        missing = [w for w, a in zip(words, alpha, strict=True) if a <= 0][:5]
        raise ValueError(f"the prior gives no weight to {missing}: every word needs α_w > 0")
    alpha0 = alpha.sum()
    n_a, n_b = y_a.sum(), y_b.sum()
    delta = np.log((y_a + alpha) / (n_a + alpha0 - y_a - alpha)) - np.log(
        (y_b + alpha) / (n_b + alpha0 - y_b - alpha)
    )
    variance = 1.0 / (y_a + alpha) + 1.0 / (y_b + alpha)
    z = delta / np.sqrt(variance)
    scores = [
        WordScore(w, int(a), int(b), float(d), float(v), float(s))
        for w, a, b, d, v, s in zip(words, y_a, y_b, delta, variance, z, strict=True)
    ]
    return sorted(scores, key=lambda s: -s.z)
