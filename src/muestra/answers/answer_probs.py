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

Where it is computed. Inside the decoding loop (`StructuredGenerator.run`, the default):
the phase controller hands every answer step's grammar-masked logits to `record` (kept
sparse, only the allowed tokens), so the decision point's distribution and every level
of the tree along the sample's own path are already there when the row finishes. The
branches the sample did not take (a lone space before the value's quote, say) need the
model: `finish` copies the row's keys and values from the live cache, and every
`PENDING_ROWS` finished rows (and at the end of the run, `flush`) their branches are
expanded in one left-padded forward, each path fed together with the bytes every value
still consistent with it shares (its opening quote), so that the next level usually
comes from the same forward. On the real model's character experiment that is ~5–15%
more time than no `field_probs` at all (README, "Performance").

After the fact (`score`: beam answers, and any row the loop cannot score — a hybrid
model's cache cannot be cut, a decision point where too many tokens were allowed to
keep): one forward pass over the sample's prompt + generated tokens (logits kept only at
the decision points; samples of one prompt share its prefill), plus one batched forward
step per tree level that needs expanding. The two agree to float rounding (~1e-5; the
loop's logits come from the batch the row decoded in). No extra sampling either way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from muestra.answers.grammar import GrammarSpec
from muestra.engine import Sample

UNRESOLVED = "<unresolved>"
# at most this many allowed tokens for a step's logits to be kept inside the loop
RECORD_LIMIT = 2048
# finished rows whose untaken branches are expanded together, in one forward: the torch
# runtime copies each waiting row's keys and values, llama.cpp only tags its cells (so it
# waits for more rows: an expansion forward costs about a decoding step there); and at
# the latest when their wave of rows ends (`PhaseController.wave_done`), so never more
# than the rows at once (a memory plan counts them: experiments/planning.py)
PENDING_ROWS = {"torch": 8, "llamacpp": 64}


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
class _LiveRow:
    """A finished row being scored inside the loop."""

    answer_ids: list[int]
    recorded: list[Any]  # per answer step: (allowed ids, their masked logits) or None
    prompt_length: int
    answer_start: int
    # a copy of the row's KV state (the runtime's `Context`), while it waits
    context: Any = None


@dataclass(eq=False)
class _LiveTree:
    row: _LiveRow
    target: _Target
    steps: Generator[list[_Branch], torch.Tensor, dict[str, float]]
    children: list[_Branch] = field(default_factory=list)
    logits: torch.Tensor | None = None  # the children's logits, known rows filled
    unknown: list[int] = field(default_factory=list)  # children that need the model
    known: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)  # path → logits


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
        self.runtime = generator.loaded.runtime
        self.backend = generator.backend
        self.token_bytes = generator.text.token_bytes
        self.encode = generator.tokenizer.encode
        self.stop_ids = frozenset(generator.loaded.eos_token_ids)
        self.min_branch = min_branch
        self.max_expansions = max_expansions
        self.fields = categorical_fields(grammar.schema) if grammar.kind == "json_schema" else {}
        # the rows of the last prompt scored: samples of one prompt share its prefill
        self._prompt: tuple[tuple[int, ...], Any] | None = None
        # inside the loop: each answering row's masked logits per answer step, and the
        # results of the rows scored when they finished
        self._recorded: dict[tuple[int, int], list[Any]] = {}
        self.live: dict[tuple[int, int], dict[str, dict[str, float]]] = {}
        # finished rows whose untaken branches wait for `flush`: (key, result, trees)
        self._pending: list[tuple[tuple[int, int], dict[str, Any], list[_LiveTree]]] = []

    def close(self) -> None:
        """Release the KV state kept between samples (the last prompt's rows)."""
        if self._prompt is not None:
            self._prompt[1].close()
            self._prompt = None
        for _, _, waiting in self._pending:
            for tree in waiting:
                if tree.row.context is not None:
                    tree.row.context.release()
                    tree.row.context = None
        self._pending = []

    def score(self, prompt_ids: Sequence[int], sample: Sample) -> dict[str, dict[str, float]]:
        """The post-hoc computation: one forward over the sample's prompt and tokens."""
        state = sample.state
        answer_ids = _answer_ids(sample.token_ids, state.answer_start, sample.stop_reason)
        answer_bytes = b"".join(self.token_bytes[t] for t in answer_ids)
        targets = self._targets(answer_ids, answer_bytes)
        if not targets:
            return {}
        context = list(prompt_ids) + sample.token_ids[: state.answer_start]
        return self._walk(context, answer_ids, targets, len(prompt_ids))

    # ---- inside the decoding loop ------------------------------------------------------

    def record(
        self,
        logits: torch.Tensor,
        rows: Sequence[Any],
        indices: Sequence[int],
        allowed: torch.Tensor | None = None,
    ) -> None:
        """Keep the grammar-masked logits of answer rows `indices` at this step (called by
        the phase controller right after it masks them), sparse: only the allowed tokens,
        and only where at most `RECORD_LIMIT` are allowed (a free string's steps are
        never a decision point of an enum or boolean). `allowed` (len(indices), V) is the
        grammar's mask when the caller has it (it saves a pass over the logits)."""
        if allowed is None:
            allowed = torch.isfinite(logits[torch.tensor(indices, device=logits.device)])
        counts = allowed.sum(dim=1).tolist()
        for j, i in enumerate(indices):
            entries = self._recorded.setdefault(_key(rows[i]), [])
            if counts[j] > RECORD_LIMIT:
                entries.append(None)
                continue
            ids = allowed[j].nonzero().flatten()
            entries.append((ids, logits[i, ids]))

    @torch.inference_mode()
    def finish(self, row: Any, context: Callable[[int], Any]) -> None:
        """Score a row that just finished, from its recorded logits. Branches the sample
        did not take need the model: the row's keys and values before its decision
        points are copied from the live cache (`context(generated)`: its context before
        its generated token `generated`) and the row waits for `flush`. Results go to
        `live`. A row the loop cannot score (a decision point not recorded, a cache that
        cannot be cut) is left to `score`."""
        key = _key(row)
        recorded = self._recorded.pop(key, None)
        state = row.state
        if recorded is None or state.error is not None or state.matcher is None:
            return
        if not state.matcher.is_terminated():
            return
        answer_ids = _answer_ids(row.tokens, state.answer_start, row.stop_reason)
        answer_bytes = b"".join(self.token_bytes[t] for t in answer_ids)
        try:
            targets = self._targets(answer_ids, answer_bytes)
        except json.JSONDecodeError:  # the grammar let through what `json.loads` refuses
            return  # (a control character): the sample gets a parse error, no field_probs
        if any(t.token_index >= len(recorded) or recorded[t.token_index] is None for t in targets):
            return
        live = _LiveRow(answer_ids, recorded, row.prompt_length, state.answer_start)
        trees = []
        for target in targets:
            root, logits = self._root(answer_ids, target, recorded[target.token_index])
            trees.append(_LiveTree(live, target, self._tree(root, logits, target)))
        result: dict[str, dict[str, float]] = {}
        waiting = [tree for tree in trees if not self._advance(tree, None, result)]
        if waiting:
            kept = context(state.answer_start + max(t.target.token_index for t in waiting))
            if kept is None:
                return
            live.context = kept  # a copy that outlives the row
            self._pending.append((key, result, waiting))
            if len(self._pending) >= PENDING_ROWS.get(self.runtime.name, 8):
                self.flush()
            return
        self.live[key] = result

    @torch.inference_mode()
    def flush(self) -> None:
        """Expand the waiting branches of every pending row: one forward per tree level
        for all of them (their contexts left-padded to the longest)."""
        while self._pending:
            pending, self._pending = self._pending, []
            self._expand([tree for _, _, waiting in pending for tree in waiting])
            for key, result, waiting_before in pending:
                waiting = [
                    tree for tree in waiting_before if not self._advance(tree, tree.logits, result)
                ]
                if waiting:
                    self._pending.append((key, result, waiting))
                else:
                    self.live[key] = result
                    for tree in waiting_before:
                        if tree.row.context is not None:
                            tree.row.context.release()  # free the copied KV state
                            tree.row.context = None

    def _advance(
        self, tree: _LiveTree, logits: torch.Tensor | None, result: dict[str, Any]
    ) -> bool:
        """Run `tree` on until it needs the model (False) or ends (True, into `result`)."""
        live, start = tree.row, tree.target.token_index
        try:
            children = tree.steps.send(logits) if logits is not None else next(tree.steps)
            while True:
                logits = torch.empty(len(children), self._vocab())
                unknown = []
                for number, child in enumerate(children):
                    at = start + len(child.tokens)
                    own = live.answer_ids[start:at] == child.tokens
                    if own and at < len(live.recorded) and live.recorded[at] is not None:
                        logits[number] = self._dense(live.recorded[at], logits.shape[1])
                    elif tuple(child.tokens) in tree.known:
                        logits[number] = tree.known[tuple(child.tokens)]
                    else:
                        unknown.append(number)
                if unknown:
                    tree.logits, tree.unknown, tree.children = logits, unknown, children
                    return False
                children = tree.steps.send(logits)
        except StopIteration as stop:
            result[tree.target.name] = stop.value
            return True

    def _expand(self, trees: list[_LiveTree]) -> None:
        """One forward for every waiting child of `trees`, each over its row's context up
        to its tree's decision point (new rows resumed from the rows' kept contexts).
        Each path is extended by the tokens of the bytes that every value still
        consistent with it shares (usually the value's opening quote), so that the next
        level's logits come from the same forward. Fills each tree's `logits` and
        `known`."""
        jobs = [
            (tree, number, tree.children[number].tokens + self._shared(tree, number))
            for tree in trees
            for number in tree.unknown
        ]
        # context positions before each decision point: the prompt, then generated tokens
        needs = [
            t.row.prompt_length + t.row.answer_start + t.target.token_index for t, _, _ in jobs
        ]
        rows = self.runtime.resume([tree.row.context for tree, _, _ in jobs], needs)
        try:
            fed = rows.feed([path for _, _, path in jobs], "all")
        finally:
            rows.close()
        assert fed.ahead is not None
        for ahead, (tree, number, path) in zip(fed.ahead, jobs, strict=True):
            logits = ahead.cpu()
            base = len(tree.children[number].tokens)
            for size in range(base, len(path) + 1):
                tree.known[tuple(path[:size])] = logits[size - 1]
            assert tree.logits is not None
            tree.logits[number] = logits[base - 1]

    def _shared(self, tree: _LiveTree, number: int) -> list[int]:
        """Tokens of the bytes that follow child `number` in every value still consistent
        with it (a guess at the next level's path; a wrong guess costs nothing)."""
        emitted = tree.children[number].emitted
        rest = [
            full[len(emitted) :]
            for full in tree.target.candidates.values()
            if full.startswith(emitted)
        ]
        shared = os.path.commonprefix(rest) if len(rest) > 1 else b""
        text = shared.decode("utf-8", errors="ignore")
        return list(self.encode(text, add_special_tokens=False)) if text else []

    def _vocab(self) -> int:
        return self.runtime.vocab_size

    @staticmethod
    def _dense(entry: tuple[torch.Tensor, torch.Tensor], vocab: int) -> torch.Tensor:
        ids, values = entry
        full = torch.full((vocab,), float("-inf"))
        full[ids.cpu()] = values.cpu()
        return full

    def _root(
        self, answer_ids: list[int], target: _Target, entry: Any = None
    ) -> tuple[_Branch, torch.Tensor | None]:
        """The decision point's branch (its matcher replayed over the answer so far) and,
        given a recorded entry, its logits."""
        prefix = answer_ids[: target.token_index]
        matcher = self.backend.matcher(self.compiled)
        for token in prefix:
            assert matcher.accept_token(token)
        emitted = b"".join(self.token_bytes[t] for t in prefix)
        logits = None
        if entry is not None:
            logits = self._dense(entry, self._vocab()).unsqueeze(0)
        return _Branch([], emitted, 1.0, matcher, 0), logits

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

    def _prompt_rows(self, prompt: tuple[int, ...]) -> Any:
        """A fresh row holding `prompt`, prefilled once per prompt (then copied)."""
        if self._prompt is None or self._prompt[0] != prompt:
            if self._prompt is not None:
                self._prompt[1].close()
            rows, _ = self.runtime.prefill([list(prompt)], 64)
            self._prompt = (prompt, rows)
        return self._prompt[1].clone([0])

    @torch.inference_mode()
    def _walk(
        self, context: list[int], answer_ids: list[int], targets: list[_Target], prompt_length: int
    ) -> dict[str, dict[str, float]]:
        sequence = context + answer_ids
        # all but the prompt's last token come from the shared prefill, so that the rest
        # is never empty (the first decision point may follow the prompt at once)
        shared = max(prompt_length - 1, 0)
        first = None
        if shared:
            base = self._prompt_rows(tuple(context[:shared]))
        else:
            base, fed = self.runtime.prefill([sequence[:1]], len(sequence))
            first = fed.last[0]
        start = base.lengths[0]
        result = {}
        try:
            ahead = None
            if base.can_crop and len(sequence) > start:  # one forward for every target
                ahead = base.feed([sequence[start:]], "all").ahead[0]  # type: ignore[index]
            for target in targets:
                root, _ = self._root(answer_ids, target)
                cut = len(context) + target.token_index  # the decision point's position
                if base.can_crop:
                    branch = base.clone([0])
                    branch.crop(0, cut)
                    at = cut - 1 - start
                    logits = first if at < 0 else ahead[at]  # type: ignore[index]
                else:  # a cache that cannot be cut: this target's own prefix
                    branch = base.clone([0])
                    prefix = sequence[start:cut]
                    logits = branch.feed([prefix]).last[0] if prefix else first
                assert logits is not None
                try:
                    tree = self._tree(root, logits.float().unsqueeze(0), target)
                    result[target.name] = _drive(tree, _Expand(branch))
                finally:
                    branch.close()
        finally:
            base.close()
        return result

    def _tree(
        self,
        root: _Branch,
        logits: torch.Tensor,
        target: _Target,
    ) -> Generator[list[_Branch], torch.Tensor, dict[str, float]]:
        """The walk down the token tree of one decision point: yields each level's
        branches to expand and takes their logits back; returns the probabilities."""
        mass = dict.fromkeys(target.candidates, 0.0)
        unresolved = 0.0
        level = [root]
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
                    if token in self.stop_ids:  # the answer ends: only a value spelled out
                        matching = [m for m in matching if target.candidates[m] == emitted]
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
            logits = yield children
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


class _Expand:
    """Expansions of one tree, level by level, each child one token on top of its
    parent's row (rows copied where a parent has several children)."""

    def __init__(self, rows: Any) -> None:
        self.rows = rows

    def __call__(self, children: list[_Branch]) -> torch.Tensor:
        self.rows.select([c.parent for c in children])
        return self.rows.feed([[c.tokens[-1]] for c in children]).last.float()


def _drive(
    steps: Generator[list[_Branch], torch.Tensor, dict[str, float]],
    expand: Callable[[list[_Branch]], torch.Tensor],
) -> dict[str, float]:
    """Run a tree walk to its end, expanding each level with `expand`."""
    try:
        children = next(steps)
        while True:
            children = steps.send(expand(children))
    except StopIteration as stop:
        return stop.value


def _key(row: Any) -> tuple[int, int]:
    return row.request_index, row.sample_index


def _answer_ids(token_ids: list[int], answer_start: int, stop_reason: Any) -> list[int]:
    """The answer's tokens, without the end-of-turn token that stopped it."""
    answer_ids = token_ids[answer_start:]
    if answer_ids and isinstance(stop_reason, int):
        answer_ids = answer_ids[:-1]
    return answer_ids


def _label(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
