"""A KV cache that grows in place instead of concatenating at every step.

HF's `DynamicLayer.update` does `torch.cat([keys, new])` each step: every decode step
copies the whole cache of every layer (for 32 rows × 330 tokens of Qwen3-0.6B in bf16
that is ~1.2 GB a step, as much as the weights). `GrowingLayer` keeps a buffer with
room for `capacity` positions (the engine passes prompt + token budget), writes new
keys and values into it, and exposes the filled part as a view. Rows still leave the
batch with `batch_select_indices`.

Continuous batching needs two more operations: `merge_left_padded` puts the rows of two
caches in one (the shorter one left-padded; the engine masks the padding), and
`trim_left` drops leading positions no remaining row attends to (a view, no copy).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer


class GrowingLayer(DynamicLayer):
    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def _grow(self, like: torch.Tensor, needed: int) -> None:
        capacity = max(needed, self.capacity, 2 * self.length)
        batch, heads, _, dim = like.shape
        keys = like.new_empty(batch, heads, capacity, dim)
        values = like.new_empty(batch, heads, capacity, dim)
        if self.key_buffer is not None and self.value_buffer is not None:
            keys[:, :, : self.length] = self.key_buffer[:, :, : self.length]
            values[:, :, : self.length] = self.value_buffer[:, :, : self.length]
        self.key_buffer, self.value_buffer, self.capacity = keys, values, capacity

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        needed = self.length + key_states.shape[-2]
        if self.key_buffer is None or needed > self.key_buffer.shape[-2]:
            self._grow(key_states, needed)
        assert self.key_buffer is not None and self.value_buffer is not None
        self.key_buffer[:, :, self.length : needed] = key_states
        self.value_buffer[:, :, self.length : needed] = value_states
        self.length = needed
        self.keys = self.key_buffer[:, :, :needed]
        self.values = self.value_buffer[:, :, :needed]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.key_buffer is None or self.value_buffer is None:
            return
        self.key_buffer = self.key_buffer[indices]
        self.value_buffer = self.value_buffer[indices]
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def trim_left(self, count: int) -> None:
        if self.key_buffer is None or self.value_buffer is None:
            return
        self.key_buffer = self.key_buffer[:, :, count:]
        self.value_buffer = self.value_buffer[:, :, count:]
        self.length -= count
        self.capacity = self.key_buffer.shape[-2]
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("the engine expands rows with batch_select_indices")

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` positions (transformers v5's convention: a
        negative count); prompt lookup drops rejected draft tokens with it."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of positions to remove")
        if tokens_to_remove == 0 or self.key_buffer is None or self.value_buffer is None:
            return
        self.length -= abs(tokens_to_remove)
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def reset(self) -> None:
        super().reset()
        self.length = 0
        self.key_buffer = self.value_buffer = None


def supports_growing_cache(config: Any) -> bool:
    """Only plain full-attention decoders (no sliding windows, no linear attention)."""
    layer_types = getattr(config, "layer_types", None)
    return layer_types is None or all(t == "full_attention" for t in layer_types)


class GrowingCache(Cache):
    def __init__(self, num_layers: int, capacity: int) -> None:
        super().__init__(layers=[GrowingLayer(capacity) for _ in range(num_layers)])


def trim_left(cache: Any, count: int) -> bool:
    """Drop the first `count` positions of every layer; False (nothing done) when the
    cache is not a `GrowingCache`."""
    if not isinstance(cache, GrowingCache):
        return False
    for layer in cache.layers:
        layer.trim_left(count)
    return True


def merge_left_padded(first: GrowingCache, second: GrowingCache, room: int) -> GrowingCache:
    """One cache with the rows of `first` then `second`, each left-padded with zeros to the
    longer length, with space for `room` more positions."""
    length = max(first.layers[0].length, second.layers[0].length)
    merged = GrowingCache(len(first.layers), length + room)
    for target, a, b in zip(merged.layers, first.layers, second.layers, strict=True):
        assert a.key_buffer is not None and b.key_buffer is not None
        assert a.value_buffer is not None and b.value_buffer is not None
        rows_a, heads, _, dim = a.key_buffer.shape
        rows_b = b.key_buffer.shape[0]
        for name in ("key_buffer", "value_buffer"):
            left, right = getattr(a, name), getattr(b, name)
            buffer = left.new_zeros(rows_a + rows_b, heads, length + room, dim)
            buffer[:rows_a, :, length - a.length : length] = left[:, :, : a.length]
            buffer[rows_a:, :, length - b.length : length] = right[:, :, : b.length]
            setattr(target, name, buffer)
        target.lazy_initialization(target.key_buffer, target.value_buffer)
        target.length = length
        target.keys = target.key_buffer[:, :, :length]
        target.values = target.value_buffer[:, :, :length]
    return merged


def gather_columns(cache: GrowingCache, index: torch.Tensor) -> None:
    """Rebuild every layer with, for row `r`, the positions `index[r]` (R, W) in order:
    speculative decoding's compaction of the masked holes rejected drafts leave."""
    for layer in cache.layers:
        assert isinstance(layer, GrowingLayer)
        if layer.key_buffer is None or layer.value_buffer is None:
            continue
        rows, heads, _, dim = layer.key_buffer.shape
        at = index[:, None, :, None].expand(rows, heads, index.shape[1], dim)
        keys = layer.key_buffer[:, :, : layer.length].gather(2, at)
        values = layer.value_buffer[:, :, : layer.length].gather(2, at)
        layer.key_buffer, layer.value_buffer = keys, values
        layer.length = layer.capacity = index.shape[1]
        layer.keys, layer.values = keys, values
