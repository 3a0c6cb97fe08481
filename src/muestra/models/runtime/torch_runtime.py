"""The torch runtime: a transformers causal LM computes the logits.

Rows live in one KV cache of shape `(rows, heads, columns, dim)` per layer, with an
attention mask `(rows, columns)` and each row's next position (`kv_cache.py` holds the
cache that grows in place). Prompts are prefilled left-padded, as HF `generate` does
(positions count only a row's real tokens). A ragged `feed` right-pads the rows to the
longest; the padding, and later a row's cropped positions, stay in the cache as masked
columns (holes), so no row waits for another and nothing is copied; when holes make up
most of the cache, the rows' real columns are gathered again (`_compact`). Leading
columns no row attends to any more are dropped when rows leave (`select`).

Caches of models with sliding-window or linear-attention layers cannot be cut or merged
(`supports_growing_cache`): such rows decode one token a forward and only whole batches
start together (`can_crop`, `can_merge` are False).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from muestra.models.runtime.base import Fed, LogitsWanted, check_cancelled
from muestra.models.runtime.kv_cache import (
    GrowingCache,
    gather_columns,
    merge_left_padded,
    supports_growing_cache,
    trim_left,
)
from muestra.models.runtime.threads import thread_wait_now


def premature_logits(
    model: Any, hidden_states: Sequence[torch.Tensor], layers: frozenset[int] | set[int]
) -> dict[int, torch.Tensor]:
    """DoLa: the output head on each layer's last position: layer → (R, V) float32."""
    head = model.get_output_embeddings()
    return {layer: head(hidden_states[layer][:, -1, :]).float() for layer in sorted(layers)}


class TorchRuntime:
    """A transformers causal LM (eval mode) as a runtime."""

    name = "torch"
    supports_dola = True

    def __init__(self, model: Any) -> None:
        self.model = model
        self.config = model.config
        self.device = next(model.parameters()).device
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        text = self.config.get_text_config() if hasattr(self.config, "get_text_config") else None
        self.num_layers = int((text or self.config).num_hidden_layers)
        self.max_length = _max_length(self.config)
        self.ragged = supports_growing_cache(self.config)
        self.weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def info(self) -> dict[str, Any]:
        parameter = next(self.model.parameters())
        return {
            "runtime": "torch",
            "torch": torch.__version__,
            "dtype": str(parameter.dtype).removeprefix("torch."),
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "thread_wait": thread_wait_now(),
        }

    def new_cache(self, capacity: int) -> Any:
        from transformers import DynamicCache

        if self.ragged:
            return GrowingCache(self.config.num_hidden_layers, capacity)
        return DynamicCache(config=self.config)

    @torch.inference_mode()
    def prefill(
        self,
        prompts: Sequence[Sequence[int]],
        room: int,
        logits: LogitsWanted = "last",
        layers: frozenset[int] = frozenset(),
    ) -> tuple[TorchSequences, Fed]:
        """Left-padded prefill of `prompts` into a cache with room for `room` more
        positions per row: the rows and the logits after each prompt."""
        check_cancelled()
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = torch.tensor(list(prompt))
            mask[i, width - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as HF generate
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=self.new_cache(width + room),
            use_cache=True,
            logits_to_keep=1 if logits == "last" else 0,
            output_hidden_states=bool(layers),
        )
        lengths = [len(p) for p in prompts]
        rows = TorchSequences(self, out.cache, mask, torch.tensor(lengths, device=self.device))
        all_logits = out.logits.float()
        ahead = None
        if logits == "all":
            ahead = [all_logits[i, width - n :] for i, n in enumerate(lengths)]
        premature = premature_logits(self.model, out.hidden_states, layers) if layers else {}
        return rows, Fed(all_logits[:, -1, :], ahead, premature)

    def resume(self, contexts: Sequence[Any], lengths: Sequence[int]) -> TorchSequences:
        """New rows, one per context, each holding a copy of its context's keys and values
        for its first `lengths[i]` positions (left-padded to the longest)."""
        from transformers import DynamicCache

        width = max(lengths)
        mask = torch.zeros(len(contexts), width, dtype=torch.long, device=self.device)
        cache = DynamicCache()
        first = contexts[0].keys_values
        for layer in range(len(first)):
            like = first[layer][0]
            keys = like.new_zeros(len(contexts), like.shape[1], width, like.shape[3])
            values = torch.zeros_like(keys)
            for r, (context, need) in enumerate(zip(contexts, lengths, strict=True)):
                k, v = context.keys_values[layer]
                keys[r, :, width - need :] = k[0, :, :need]
                values[r, :, width - need :] = v[0, :, :need]
            cache.update(keys, values, layer)
        for r, need in enumerate(lengths):
            mask[r, width - need :] = 1
        positions = torch.tensor(list(lengths), device=self.device)
        return TorchSequences(self, cache, mask, positions)


@dataclass
class TorchContext:
    """A copy of a row's keys and values per layer, (1, heads, length, dim) each."""

    keys_values: list[tuple[torch.Tensor, torch.Tensor]]
    length: int

    def release(self) -> None:
        self.keys_values = []


class TorchSequences:
    """Rows of one KV cache (see the module docstring)."""

    def __init__(
        self, runtime: TorchRuntime, cache: Any, mask: torch.Tensor, positions: torch.Tensor
    ) -> None:
        self.runtime = runtime
        self.cache = cache
        self.mask = mask  # (R, columns): 1 where a row attends
        self.positions = positions  # (R,): each row's next position = its real tokens

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    @property
    def lengths(self) -> list[int]:
        return [int(p) for p in self.positions.tolist()]

    @property
    def can_merge(self) -> bool:
        return self.cache is None or isinstance(self.cache, GrowingCache)

    @property
    def can_crop(self) -> bool:
        return isinstance(self.cache, GrowingCache)

    pads_ragged = True  # a ragged feed is right-padded: padding costs a forward's width

    @torch.inference_mode()
    def feed(
        self,
        tokens: Sequence[Sequence[int]],
        logits: LogitsWanted = "last",
        layers: frozenset[int] = frozenset(),
    ) -> Fed:
        """Append each row its tokens (possibly none), right-padded to the longest."""
        check_cancelled()
        device = self.runtime.device
        lengths = [len(t) for t in tokens]
        width = max(lengths)
        assert width > 0, "feed at least one token"
        assert not layers or width == 1, "premature layers are read one token a row"
        if width > 1:
            self._compact()
        if width == 1 and min(lengths) == 1:
            ids = torch.tensor([[t[0]] for t in tokens], device=device)
            fed = self.mask.new_ones(len(tokens), 1)
        else:
            ids = torch.zeros(len(tokens), width, dtype=torch.long)
            real = torch.zeros(len(tokens), width, dtype=torch.long)
            for i, row in enumerate(tokens):
                if row:
                    ids[i, : len(row)] = torch.tensor(list(row))
                    real[i, : len(row)] = 1
            ids, fed = ids.to(device), real.to(self.mask.device)
        self.mask = torch.cat([self.mask, fed], dim=1)
        offsets = torch.arange(width, device=device)
        out = self.runtime.model(
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=self.positions.unsqueeze(1) + offsets,
            cache=self.cache,
            use_cache=True,
            output_hidden_states=bool(layers),
        )
        self.cache = out.cache
        self.positions = self.positions + torch.tensor(lengths, device=device)
        model = self.runtime.model
        premature = premature_logits(model, out.hidden_states, layers) if layers else {}
        if width == 1 and logits == "last":
            return Fed(out.logits[:, -1, :].float(), None, premature)
        all_logits = out.logits.float()
        last_index = torch.tensor([max(n - 1, 0) for n in lengths], device=device)
        last = all_logits[torch.arange(len(tokens), device=device), last_index]
        ahead = [all_logits[i, :n] for i, n in enumerate(lengths)] if logits == "all" else None
        return Fed(last, ahead, premature)

    def select(self, index: Sequence[int], trim: bool = True) -> None:
        """Keep rows `index` in that order (a row may repeat: a copy). With `trim`,
        leading cache columns no remaining row attends to are dropped."""
        if list(index) == list(range(len(self))):
            return
        if not index:
            self.close()
            return
        where = torch.tensor(list(index), device=self.runtime.device)
        self.cache.batch_select_indices(where)
        self.mask, self.positions = self.mask[where], self.positions[where]
        unused = int(self.mask.any(dim=0).long().argmax())  # first column still attended
        if trim and unused and trim_left(self.cache, unused):
            self.mask = self.mask[:, unused:]

    def crop(self, row: int, length: int) -> None:
        """Row `row` forgets its positions from `length` on: their columns become holes."""
        held = int(self.positions[row])
        if length >= held:
            return
        columns = self.mask[row].nonzero().flatten()
        self.mask[row, columns[length:]] = 0
        self.positions[row] = length

    def clone(self, rows: Sequence[int]) -> TorchSequences:
        """A copy of rows `rows` that shares nothing with this batch."""
        where = torch.tensor(list(rows), device=self.runtime.device)
        cache = self.runtime.new_cache(self.mask.shape[1] + 64)
        if isinstance(cache, GrowingCache):
            for target, source in zip(cache.layers, self.cache.layers, strict=True):
                target.update(source.keys[where], source.values[where])
        else:
            for layer, source in enumerate(self.cache.layers):
                cache.update(source.keys[where], source.values[where], layer)
        return TorchSequences(self.runtime, cache, self.mask[where], self.positions[where])

    def merge(self, other: TorchSequences, room: int) -> None:  # type: ignore[override]
        """Append `other`'s rows; both caches are left-padded to the longer one."""
        if not (isinstance(self.cache, GrowingCache) and isinstance(other.cache, GrowingCache)):
            raise NotImplementedError("only a GrowingCache batch can take rows mid-run")
        self.cache = merge_left_padded(self.cache, other.cache, room)
        width = max(self.mask.shape[1], other.mask.shape[1])
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(other.mask, width)])
        self.positions = torch.cat([self.positions, other.positions])

    def shift(self, other: TorchSequences) -> int:
        """By how many columns this batch's cache moves right when `other` merges in."""
        return max(0, other.mask.shape[1] - self.mask.shape[1])

    def context(self, row: int, length: int) -> TorchContext | None:
        """A copy of row `row`'s keys and values for its first `length` positions, or
        None when the cache is not a plain growing one."""
        if not isinstance(self.cache, GrowingCache):
            return None
        columns = self.mask[row].nonzero().flatten()
        if len(columns) < length:
            return None
        columns = columns[:length]
        first, end = int(columns[0]), int(columns[-1]) + 1
        if end - first == length:
            kv = [
                (
                    layer.keys[row : row + 1, :, first:end].clone(),
                    layer.values[row : row + 1, :, first:end].clone(),
                )
                for layer in self.cache.layers
            ]
        else:
            kv = [
                (
                    layer.keys[row : row + 1].index_select(2, columns),
                    layer.values[row : row + 1].index_select(2, columns),
                )
                for layer in self.cache.layers
            ]
        return TorchContext(kv, length)

    def close(self) -> None:
        self.cache = None
        self.mask = self.mask[:0]
        self.positions = self.positions[:0]

    def _compact(self) -> None:
        """Gather each row's real columns again (left-padded) once holes make up half the
        cache."""
        real = self.mask.sum(dim=1)
        width = int(real.max())
        if self.mask.shape[1] < 2 * width + 64 or not isinstance(self.cache, GrowingCache):
            return
        index = torch.zeros(len(self), width, dtype=torch.long, device=self.mask.device)
        mask = torch.zeros_like(index)
        for i in range(len(self)):
            columns = self.mask[i].nonzero().flatten()
            index[i, width - len(columns) :] = columns
            mask[i, width - len(columns) :] = 1
        gather_columns(self.cache, index.to(self.runtime.device))
        self.mask = mask.to(self.mask.dtype)


def _pad_left(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(mask, (width - mask.shape[1], 0))


def _max_length(config: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def as_runtime(model: Any) -> Any:
    """`model` itself when it is a runtime already; a transformers model wrapped in the
    torch runtime (the engine and its tests may hand either)."""
    if hasattr(model, "prefill") and hasattr(model, "resume"):
        return model
    return TorchRuntime(model)
