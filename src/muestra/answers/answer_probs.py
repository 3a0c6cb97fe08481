"""Exact answer distributions: how likely each allowed value was, where the model chose.

For every enum / boolean field of a JSON-Schema answer (nested objects included) and for
a whole choice answer, `AnswerProbabilities.score` returns
`{field: {value: probability}}` with the probabilities summing to 1.

How it is computed. Let the *decision point* be the answer step whose token first
reaches the value's first byte. From there, the probability of value `v` is the total
probability, under the model's own distribution (temperature 1, no top-k/top-p) masked
by the grammar, of every token path that spells `v` — every tokenization, not only the
canonical one. The paths form a tree: a token whose bytes already single out one value
ends its branch (the grammar then forces the rest of that value, so the rest of the
path has probability 1); a token shared by several values (e.g. the opening quote) is
expanded with one more forward step. Values are renormalised over the mass found; mass
on branches left unexpanded (below `min_branch` or beyond `max_expansions`) is reported
under the key `"<unresolved>"` only when it is not negligible.

What it costs: one forward pass over the sample's prompt + generated tokens (logits kept
only at the decision points), plus one batched forward step per tree level that needs
expanding (usually one: the opening quote of a string). No extra sampling.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from muestra.answers.grammar import GrammarSpec
from muestra.engine import Sample

UNRESOLVED = "<unresolved>"


# ---- where values sit ------------------------------------------------------------------


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    seen = 0
    while "$ref" in node and seen < 32:
        ref = node["$ref"]
        assert ref.startswith("#/"), f"only local $ref are supported, got {ref}"
        target: Any = schema
        for part in ref[2:].split("/"):
            target = target[part]
        node, seen = target, seen + 1
    return node


def categorical_fields(schema: dict[str, Any]) -> dict[str, list[Any]]:
    """`{"a.b": [allowed values]}` for enum and boolean properties of (nested) objects."""
    found: dict[str, list[Any]] = {}

    def walk(node: dict[str, Any], path: str) -> None:
        node = _resolve(schema, node)
        if "enum" in node:
            found[path] = list(node["enum"])
        elif node.get("type") == "boolean":
            found[path] = [True, False]
        elif node.get("type") == "object" or "properties" in node:
            for name, sub in node.get("properties", {}).items():
                walk(sub, f"{path}.{name}" if path else name)

    walk(schema, "")
    return {path: values for path, values in found.items() if path}


def value_spans(text: str) -> dict[str, tuple[int, int]]:
    """Character spans of every object member's value in a JSON text: `{"a.b": (start, end)}`."""
    decoder = json.JSONDecoder()
    spans: dict[str, tuple[int, int]] = {}

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def value(i: int, path: str) -> int:
        i = skip(i)
        if text[i] == "{":
            i = skip(i + 1)
            while text[i] != "}":
                key, i = decoder.raw_decode(text, i)
                i = skip(skip(i) + 1)  # past ':'
                start = i
                i = value(i, f"{path}.{key}" if path else key)
                spans[f"{path}.{key}" if path else key] = (start, i)
                i = skip(i)
                if text[i] == ",":
                    i = skip(i + 1)
            return i + 1
        if text[i] == "[":
            i, index = skip(i + 1), 0
            while text[i] != "]":
                i = skip(value(i, f"{path}[{index}]"))
                index += 1
                if text[i] == ",":
                    i = skip(i + 1)
            return i + 1
        _, end = decoder.raw_decode(text, i)
        return end

    value(0, "")
    return spans


# ---- the tree walk ---------------------------------------------------------------------


@dataclass
class _Branch:
    tokens: list[int]  # tokens after the decision point
    emitted: bytes  # answer bytes so far
    probability: float
    matcher: Any
    parent: int  # row of the previous level


@dataclass
class _Target:
    name: str
    token_index: int  # answer-token index of the decision point
    candidates: dict[str, bytes]  # value label -> full answer bytes up to the value's end


class AnswerProbabilities:
    def __init__(
        self,
        generator: Any,
        grammar: GrammarSpec,
        compiled: Any,
        min_branch: float = 1e-6,
        max_expansions: int = 64,
    ) -> None:
        self.generator = generator
        self.grammar = grammar
        self.compiled = compiled
        self.model = generator.loaded.model
        self.backend = generator.backend
        self.token_bytes = generator.text.token_bytes
        self.min_branch = min_branch
        self.max_expansions = max_expansions
        self.fields = categorical_fields(grammar.schema) if grammar.kind == "json_schema" else {}
        # the KV cache of the last prompt scored: samples of one prompt share its prefill
        self._prompt: tuple[tuple[int, ...], Any] | None = None

    def score(self, prompt_ids: Sequence[int], sample: Sample) -> dict[str, dict[str, float]]:
        state = sample.state
        answer_ids = sample.token_ids[state.answer_start :]
        if answer_ids and isinstance(sample.stop_reason, int):
            answer_ids = answer_ids[:-1]
        answer_bytes = b"".join(self.token_bytes[t] for t in answer_ids)
        targets = self._targets(answer_ids, answer_bytes)
        if not targets:
            return {}
        context = list(prompt_ids) + sample.token_ids[: state.answer_start]
        return self._walk(context, answer_ids, targets, len(prompt_ids))

    def _targets(self, answer_ids: list[int], answer_bytes: bytes) -> list[_Target]:
        text = answer_bytes.decode("utf-8", errors="replace")
        starts: list[tuple[str, int, list[bytes], list[str]]] = []
        if self.grammar.kind == "choice":
            options = self.grammar.choices or []
            starts.append(("answer", 0, [o.encode() for o in options], options))
        else:
            spans = value_spans(text)
            for name, values in self.fields.items():
                if name not in spans:
                    continue
                begin = len(text[: spans[name][0]].encode())
                encoded = [json.dumps(v, ensure_ascii=False).encode() for v in values]
                starts.append((name, begin, encoded, [_label(v) for v in values]))
        targets = []
        for name, begin, encoded, labels in starts:
            # the decision point: the first token whose bytes reach past `begin`
            offset, index = 0, 0
            while index < len(answer_ids):
                offset += len(self.token_bytes[answer_ids[index]])
                if offset > begin:
                    break
                index += 1
            candidates = {
                label: answer_bytes[:begin] + value
                for label, value in zip(labels, encoded, strict=True)
            }
            targets.append(_Target(name, index, candidates))
        return targets

    def _prompt_cache(self, prompt: tuple[int, ...]) -> Any:
        """A fresh cache holding `prompt`'s keys and values, prefilled once per prompt."""
        from transformers import DynamicCache

        if self._prompt is None or self._prompt[0] != prompt:
            device = next(self.model.parameters()).device
            out = self.model(
                input_ids=torch.tensor([prompt], device=device),
                use_cache=True,
                cache=DynamicCache(config=self.model.config),
                logits_to_keep=1,
            )
            self._prompt = (prompt, out.cache)
        cache = DynamicCache()
        for index, layer in enumerate(self._prompt[1].layers):
            cache.update(layer.keys, layer.values, index)
        return cache

    @torch.inference_mode()
    def _walk(
        self, context: list[int], answer_ids: list[int], targets: list[_Target], prompt_length: int
    ) -> dict[str, dict[str, float]]:
        device = next(self.model.parameters()).device
        # all but the prompt's last token come from the shared prefill, so that the rest
        # is never empty (the first decision point may follow the prompt at once)
        shared = max(prompt_length - 1, 0)
        sequence = torch.tensor([context[shared:] + answer_ids], device=device)
        positions = [len(context) - shared + t.token_index - 1 for t in targets]
        out = self.model(
            input_ids=sequence,
            use_cache=True,
            cache=self._prompt_cache(tuple(context[:shared])),
            logits_to_keep=torch.tensor(positions, device=device),
        )
        base_cache = out.cache
        result = {}
        for number, target in enumerate(targets):
            prefix = answer_ids[: target.token_index]
            matcher = self.backend.matcher(self.compiled)
            for token in prefix:
                assert matcher.accept_token(token)
            emitted = b"".join(self.token_bytes[t] for t in prefix)
            root = _Branch([], emitted, 1.0, matcher, 0)
            logits = out.logits[0, number].float().unsqueeze(0)
            cut = len(context) + target.token_index
            result[target.name] = self._tree(root, logits, base_cache, cut, target)
        return result

    def _tree(
        self, root: _Branch, logits: torch.Tensor, base_cache: Any, cut: int, target: _Target
    ) -> dict[str, float]:
        mass = dict.fromkeys(target.candidates, 0.0)
        unresolved = 0.0
        level = [root]
        cache = None
        expansions = 0
        while level:
            children: list[_Branch] = []
            for row, branch in enumerate(level):
                probs = self._masked_probs(logits[row : row + 1], branch.matcher)[0]
                allowed = (probs > 0).nonzero().flatten().tolist()
                for token in allowed:
                    p = branch.probability * float(probs[token])
                    emitted = branch.emitted + self.token_bytes[token]
                    matching = [
                        label
                        for label, full in target.candidates.items()
                        if full.startswith(emitted) or emitted.startswith(full)
                    ]
                    if len(matching) == 1:
                        mass[matching[0]] += p
                        continue
                    if not matching:
                        unresolved += p
                        continue
                    if p < self.min_branch or expansions >= self.max_expansions:
                        unresolved += p
                        continue
                    child_matcher = branch.matcher.fork()
                    assert child_matcher.accept_token(token)
                    children.append(
                        _Branch(branch.tokens + [token], emitted, p, child_matcher, row)
                    )
                    expansions += 1
            if not children:
                break
            logits, cache = self._step(children, level, base_cache, cache, cut)
            level = children
        total = sum(mass.values())
        if total <= 0:
            return {UNRESOLVED: 1.0}
        probabilities = {label: value / total for label, value in mass.items()}
        if unresolved / (total + unresolved) > 1e-3:
            probabilities[UNRESOLVED] = unresolved / (total + unresolved)
        return probabilities

    def _masked_probs(self, logits: torch.Tensor, matcher: Any) -> torch.Tensor:
        masked = logits.clone()
        self.backend.fill_and_apply(masked, [matcher], [0])
        return masked.softmax(dim=-1)

    def _step(
        self, children: list[_Branch], level: list[_Branch], base_cache: Any, cache: Any, cut: int
    ) -> tuple[torch.Tensor, Any]:
        from transformers import DynamicCache

        device = next(self.model.parameters()).device
        parents = torch.tensor([c.parent for c in children], device=device)
        if cache is None:  # first expansion: the base cache cut at the decision point
            cache = DynamicCache()
            for index, layer in enumerate(base_cache.layers):
                cache.update(layer.keys[:, :, :cut], layer.values[:, :, :cut], index)
        cache.batch_select_indices(parents)
        tokens = torch.tensor([[c.tokens[-1]] for c in children], device=device)
        length = cache.get_seq_length()
        positions = torch.full((len(children), 1), length, device=device)
        out = self.model(input_ids=tokens, position_ids=positions, cache=cache, use_cache=True)
        return out.logits[:, -1].float(), out.cache


def _label(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
