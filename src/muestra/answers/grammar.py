"""Answer grammars: what an answer must look like, compiled once with xgrammar.

A `GrammarSpec` names a grammar — a JSON Schema (dict, file or Pydantic class), a
regex, a choice list or EBNF — and gives it a stable key. A `GrammarBackend` holds the
xgrammar view of one tokenizer (sized by the *model's* vocabulary, with every EOS id as
a stop token), compiles specs once and keeps the most recently used ones in memory, up to
a byte budget, and knows which added tokens (`<think>`, `<|im_start|>`,
`<tool_call>`…) must never appear inside an answer, since xgrammar lets their literal
text into JSON strings.

xgrammar silently ignores some JSON Schema keywords. `check_schema` refuses them by
name and path before any model work, so no answer is passed off as valid when the
grammar could not enforce the schema; it also checks the schema against its metaschema
and refuses `$ref`s that leave the document. Every parsed answer is also validated with
`jsonschema` afterwards. `GrammarSpec.check_compiles` builds the grammar without a
tokenizer, so a spec's bad regex, EBNF or schema is refused before a model loads.

There is no disk cache. With xgrammar 0.2.9, reading a serialized grammar back costs as
much as compiling it or far more (measured on the Qwen3 vocabulary: the character schema
compiles in 30 ms and deserializes in 18 ms; an object of 400 required properties compiles
in 19 ms, serializes in 1.4 s to 35 MB and deserializes in 0.67 s; serialization grows
quadratically, 226 MB for 1,000 properties), so a disk cache only cost time and disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from muestra.errors import InputError

if TYPE_CHECKING:  # the backend computes with torch; reading a spec or schema needs none
    import torch

GrammarKind = Literal["json_schema", "regex", "choice", "ebnf"]

MAX_NESTING = 64  # deeper specs and schemas are refused: no real one nests this far
DEFAULT_GRAMMAR_MEMORY_BYTES = 256 * 2**20  # compiled grammars kept in memory, LRU

# Keywords xgrammar 0.2 accepts but does not enforce.
UNENFORCED_KEYWORDS = (
    "not", "if", "then", "else", "allOf", "dependentRequired", "dependentSchemas",
    "contains", "minContains", "maxContains", "propertyNames", "patternProperties",
    "unevaluatedProperties", "unevaluatedItems", "uniqueItems", "multipleOf",
)  # fmt: skip


@dataclass(frozen=True)
class GrammarSpec:
    kind: GrammarKind
    source: str  # canonical text: JSON (sorted keys) for schemas, JSON list for choices
    any_whitespace: bool = False

    @property
    def key(self) -> str:
        text = f"{self.kind}\0{self.any_whitespace}\0{self.source}"
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def schema(self) -> dict[str, Any] | None:
        return json.loads(self.source) if self.kind == "json_schema" else None

    @property
    def choices(self) -> list[str] | None:
        return json.loads(self.source) if self.kind == "choice" else None

    # ---- builders ----------------------------------------------------------------------

    @classmethod
    def from_options(
        cls,
        *,
        schema: Any = None,
        regex: str | None = None,
        choice: list[str] | None = None,
        ebnf: str | Path | None = None,
        source: str = "",
    ) -> GrammarSpec | None:
        """The one grammar among the given options (None when none is given)."""
        given = {
            name: value
            for name, value in (
                ("schema", schema),
                ("regex", regex),
                ("choice", choice),
                ("grammar", ebnf),
            )
            if value is not None
        }
        if len(given) > 1:
            names = " and ".join(given)
            raise InputError(f"{source}give at most one answer grammar, got {names}")
        if schema is not None:
            return cls.json_schema(schema)
        if regex is not None:
            return cls.regex(regex)
        if choice is not None:
            return cls.choice(list(choice))
        if ebnf is not None:
            return cls.ebnf(ebnf)
        return None

    @classmethod
    def json_schema(cls, schema: Any, source: str = "schema") -> GrammarSpec:
        """From a dict, a JSON string, a path to a .json file, or a Pydantic model class."""
        if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
            schema = schema.model_json_schema()
        elif isinstance(schema, Path) or (isinstance(schema, str) and schema.endswith(".json")):
            path = Path(schema)
            source = str(path)
            schema = _parse_json(read_text_file(path, "schema file"), source, f"{path} ")
        elif isinstance(schema, str):
            schema = _parse_json(schema, source, f"{source}: ")
        if not isinstance(schema, dict):
            raise InputError(
                f"{source}: a JSON Schema must be an object, got {type(schema).__name__}"
            )
        check_schema(schema, source)
        # key order is kept: xgrammar generates properties in the order the schema lists them
        return cls("json_schema", json.dumps(schema, ensure_ascii=False))

    @classmethod
    def regex(cls, pattern: str, source: str = "--regex") -> GrammarSpec:
        if not pattern:
            raise InputError(f"{source}: the pattern is empty; give a regular expression")
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: list[str], source: str = "--choice") -> GrammarSpec:
        options = list(options)
        if any(not isinstance(o, str) for o in options):
            raise InputError(f"{source}: every option must be a string, got {options!r}")
        if len(options) < 2 or any(not o for o in options) or len(set(options)) != len(options):
            # one option is no choice: the answer would be fixed before sampling
            raise InputError(
                f"{source} needs at least two distinct, non-empty options, got {options!r}; "
                "add options, or drop the choice and read the answer as free text"
            )
        return cls("choice", json.dumps(options, ensure_ascii=False))

    @classmethod
    def ebnf(cls, grammar: str | Path) -> GrammarSpec:
        if isinstance(grammar, Path) or str(grammar).endswith((".ebnf", ".gbnf")):
            grammar = read_text_file(Path(grammar), "grammar file")
        return cls("ebnf", str(grammar))

    def check_compiles(self, source: str) -> None:
        """Build the grammar without a tokenizer: what would not compile is refused now."""
        import xgrammar as xgr

        try:
            if self.kind == "json_schema":
                xgr.Grammar.from_json_schema(
                    self.source, any_whitespace=self.any_whitespace, strict_mode=True
                )
            elif self.kind == "regex":
                xgr.Grammar.from_regex(self.source)
            elif self.kind == "choice":
                xgr.Grammar.from_ebnf(_choice_ebnf(self.choices or []))
            else:
                xgr.Grammar.from_ebnf(self.source)
        except Exception as err:  # xgrammar raises RuntimeError/ValueError with its reason
            raise InputError(
                f"{source}: the {self.kind} grammar does not compile: {xgrammar_reason(err)}; "
                "fix it"
            ) from err


def xgrammar_reason(err: Exception) -> str:
    """xgrammar's message without its `[time] file.cc:line:` prefix."""
    lines = [_XGRAMMAR_PREFIX.sub("", line).strip() for line in str(err).splitlines()]
    return next((line for line in lines if line), type(err).__name__)


_XGRAMMAR_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:[0-9]+: ")


def read_text_file(path: Path, what: str) -> str:
    """A user's text file as UTF-8 (a leading BOM is dropped), or an InputError saying why not."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise InputError(f"{what} {path} does not exist") from err
    except IsADirectoryError as err:
        raise InputError(f"{what} {path} is a folder; give the path of a file") from err
    except OSError as err:
        raise InputError(f"{what} {path} cannot be read ({err.strerror}); check it") from err
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        found = (
            "it starts with a UTF-16 byte order mark"
            if data.startswith((b"\xff\xfe", b"\xfe\xff"))
            else f"byte 0x{data[err.start]:02x} at offset {err.start} is not UTF-8"
        )
        raise InputError(f"{what} {path} is not UTF-8 text ({found}); save it as UTF-8") from err


def _parse_json(text: str, source: str, where: str) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{where}line {err.lineno}: invalid JSON ({err.msg}); fix it") from err
    except RecursionError as err:
        raise InputError(
            f"{source}: JSON nested too deeply to read; keep it under {MAX_NESTING} levels"
        ) from err
    check_nesting(value, source)
    return value


def check_nesting(value: Any, source: str, path: str = "$", depth: int = 0) -> None:
    """Refuse objects and arrays nested more than MAX_NESTING levels, naming where."""
    if depth > MAX_NESTING:
        raise InputError(
            f"{source}: {path} is nested more than {MAX_NESTING} levels deep; flatten it"
        )
    if isinstance(value, dict):
        for key, sub in value.items():
            check_nesting(sub, source, f"{path}.{key}", depth + 1)
    elif isinstance(value, list):
        for index, sub in enumerate(value):
            check_nesting(sub, source, f"{path}[{index}]", depth + 1)


def check_schema(schema: dict[str, Any], source: str = "schema") -> None:
    """Refuse a schema its metaschema rejects, or that xgrammar would not fully enforce."""
    from jsonschema import SchemaError, validators

    check_nesting(schema, source)
    _check_keywords(schema, source, "$")
    try:
        validators.validator_for(schema).check_schema(schema)
    except SchemaError as err:
        where = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.path)
        raise InputError(
            f"{source}: not a valid JSON Schema at {where}: {err.message}; fix the value"
        ) from err


def _check_keywords(schema: Any, source: str, path: str) -> None:
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            raise InputError(
                f"{source}: $ref {ref!r} at {path} points outside the schema; muestra reads "
                "no other file or URL: copy the definition into $defs and use '#/$defs/…'"
            )
        if schema.get("type") == []:
            raise InputError(f"{source}: type [] at {path} allows no value; name at least one type")
        for key, value in schema.items():
            if key in UNENFORCED_KEYWORDS:
                raise InputError(
                    f"{source}: keyword {key!r} at {path} cannot be enforced by the grammar "
                    "(xgrammar ignores it); remove it or check the value after generation"
                )
            if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
                for name, sub in value.items():
                    _check_keywords(sub, source, f"{path}.{key}.{name}")
            else:
                _check_keywords(value, source, f"{path}.{key}")
    elif isinstance(schema, list):
        for index, item in enumerate(schema):
            _check_keywords(item, source, f"{path}[{index}]")


def _choice_ebnf(options: list[str]) -> str:
    return "root ::= " + " | ".join(json.dumps(o, ensure_ascii=False) for o in options)


class GrammarBackend:
    """xgrammar for one tokenizer: compile with caches, masks, matchers."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: list[int],
        memory_limit_bytes: int = DEFAULT_GRAMMAR_MEMORY_BYTES,
    ) -> None:
        import torch
        import xgrammar as xgr

        self.xgr = xgr
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=self.stop_token_ids
        )
        # xgrammar's own cache is unbounded by default; this class keeps the one cache
        self.compiler = xgr.GrammarCompiler(
            self.info, max_threads=os.cpu_count() or 2, cache_enabled=False
        )
        self.batch_matcher = xgr.BatchGrammarMatcher()
        self.memory_limit_bytes = memory_limit_bytes
        self._memory: OrderedDict[str, Any] = OrderedDict()  # least recently used first
        self._memory_bytes = 0
        self._lock = threading.Lock()  # the server compiles in worker threads
        self.stats = {"hits": 0, "compiles": 0, "evictions": 0}
        forbidden = torch.zeros(vocab_size, dtype=torch.bool)
        for token_id in tokenizer.added_tokens_decoder:
            if int(token_id) < vocab_size and int(token_id) not in self.stop_token_ids:
                forbidden[int(token_id)] = True
        forbidden[len(tokenizer) :] = True
        self.forbidden = forbidden  # (V,) added tokens that may never appear in an answer
        self._forbidden_ids = forbidden.nonzero().flatten()

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the cached grammars (xgrammar's own estimate)."""
        return self._memory_bytes

    def cached(self, spec: GrammarSpec) -> bool:
        return spec.key in self._memory

    def compile(self, spec: GrammarSpec) -> Any:
        with self._lock:
            compiled = self._memory.get(spec.key)
            if compiled is not None:
                self._memory.move_to_end(spec.key)
                self.stats["hits"] += 1
                return compiled
        compiled = self._compile(spec)
        with self._lock:
            self.stats["compiles"] += 1
            if spec.key not in self._memory:
                self._memory[spec.key] = compiled
                self._memory_bytes += compiled.memory_size_bytes
            # evict least recently used; the newest stays even when alone above the limit
            while self._memory_bytes > self.memory_limit_bytes and len(self._memory) > 1:
                _, old = self._memory.popitem(last=False)
                self._memory_bytes -= old.memory_size_bytes
                self.stats["evictions"] += 1
        return compiled

    def _compile(self, spec: GrammarSpec) -> Any:
        try:
            if spec.kind == "json_schema":
                return self.compiler.compile_json_schema(
                    spec.source, any_whitespace=spec.any_whitespace, strict_mode=True
                )
            if spec.kind == "regex":
                return self.compiler.compile_regex(spec.source)
            if spec.kind == "choice":
                return self.compiler.compile_grammar(_choice_ebnf(spec.choices or []))
            return self.compiler.compile_grammar(spec.source)
        except Exception as err:  # xgrammar raises RuntimeError/ValueError with its reason
            raise InputError(f"the {spec.kind} grammar does not compile: {err}") from err

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled, override_stop_tokens=self.stop_token_ids)

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        return self.xgr.allocate_token_bitmask(rows, self.vocab_size)

    def fill_and_apply(
        self, logits: torch.Tensor, matchers: list[Any], indices: list[int]
    ) -> torch.Tensor:
        """Mask `logits` rows `indices` (in place) by their matchers, all rows at once, and
        return the mask: `(len(indices), V)`, True where a row's matcher allows the token.

        xgrammar fills the packed bitmask for every row in one call. Applying it is done
        here with a byte lookup table instead of xgrammar's CPU kernel, whose cost grows with
        the number of *disallowed* tokens: at batch 32 on a 151,936-token vocabulary with
        few tokens allowed (the usual case inside JSON) it measured ~30 ms a step against
        ~10 ms for the table. Added tokens are then masked too.
        """
        import torch

        bitmask = self.allocate_bitmask(len(indices))
        self.batch_matcher.batch_fill_next_token_bitmask(matchers, bitmask)
        bits = _byte_bits()[bitmask.view(torch.uint8).long()]  # (R, V/8, 8)
        allowed = bits.flatten(1)[:, : self.vocab_size].to(logits.device)  # (R, V)
        allowed[:, self.forbidden_ids(allowed.device)] = False
        if indices == list(range(logits.shape[0])):
            logits.masked_fill_(~allowed, float("-inf"))
        else:
            rows = torch.tensor(indices, device=logits.device)
            logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
        return allowed

    def forbidden_ids(self, device: torch.device) -> torch.Tensor:
        if self._forbidden_ids.device != device:
            self._forbidden_ids = self._forbidden_ids.to(device)
        return self._forbidden_ids


@lru_cache(maxsize=1)
def _byte_bits() -> torch.Tensor:
    """Bit j of byte b, for every byte value: unpacks xgrammar's little-endian int32
    bitmask."""
    import torch

    return ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool()  # (256, 8)
