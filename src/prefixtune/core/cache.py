"""The serving engine's KV-cache layout: the only place that reads or writes a cache's per-layer tensors.

The engine keeps one cache per running batch, a ``DynamicCache`` or a ``PreallocatedCache`` (see
``LAYOUTS``), left-padded to a common length, and places each row's prefix in that cache as P past
positions (the equivalence the tests check: a prefix is exactly a KV cache of P past tokens). Every
layer's keys / values are (B, kv_heads, L, head_dim), keys after RoPE. Like ``inject.py``, this module
touches ``transformers`` internals (``DynamicCache.layers``, ``cache_utils.DynamicLayer``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from prefixtune.core.kv import layer_kv

#: The engine's cache layouts: "dynamic" is transformers' ``DynamicCache`` (every appended token
#: concatenates, i.e. copies, the whole cache); "preallocated" keeps each layer in buffers with room to
#: grow and writes a new token's column in place (the whole cache is copied only when its capacity
#: doubles: amortized O(1) per token).
Layout = Literal["dynamic", "preallocated"]
LAYOUTS: tuple[str, ...] = ("dynamic", "preallocated")


class PreallocatedLayer(DynamicLayer):
    """A cache layer whose ``keys`` / ``values`` (B, kv_heads, n, head_dim) are views of the first n
    columns of buffers (B, kv_heads, capacity, head_dim); ``update`` writes the new columns in place."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.assign(key_states, value_states)
            return self.keys, self.values
        n, t = self.keys.shape[-2], key_states.shape[-2]
        if n + t > self._key_buffer.shape[-2]:
            self.assign(self.keys, self.values, room=n + t)
        self._key_buffer[:, :, n:n + t].copy_(key_states)
        self._value_buffer[:, :, n:n + t].copy_(value_states)
        self.keys = self._key_buffer[:, :, :n + t]
        self.values = self._value_buffer[:, :, :n + t]
        return self.keys, self.values

    def assign(self, keys: torch.Tensor, values: torch.Tensor, room: int = 0) -> None:
        """Hold ``keys`` / ``values`` (B, h, n, d) in fresh buffers of capacity max(2 · max(n, room), 64)."""
        n = keys.shape[-2]
        capacity = max(2 * max(n, room), 64)
        shape = (*keys.shape[:-2], capacity, keys.shape[-1])
        self._key_buffer = keys.new_zeros(shape)
        self._value_buffer = values.new_zeros(shape)
        self._key_buffer[:, :, :n].copy_(keys)
        self._value_buffer[:, :, :n].copy_(values)
        self.keys, self.values = self._key_buffer[:, :, :n], self._value_buffer[:, :, :n]


class PreallocatedCache(DynamicCache):
    """A ``DynamicCache`` (for every model that accepts one) whose layers are ``PreallocatedLayer``s."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=PreallocatedLayer)


def new_cache(layout: Layout) -> DynamicCache:
    """An empty cache of ``layout``."""
    if layout not in LAYOUTS:
        raise ValueError(f"cache layout must be one of {LAYOUTS}, got {layout!r}")
    return PreallocatedCache() if layout == "preallocated" else DynamicCache()


def _assign(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
    if isinstance(layer, PreallocatedLayer):
        layer.assign(keys, values)
    else:
        layer.keys, layer.values = keys, values


def layout_of(cache: DynamicCache) -> Layout:
    return "preallocated" if isinstance(cache, PreallocatedCache) else "dynamic"


def cache_from_prefixes(prefixes: list[torch.Tensor | None], device: torch.device, dtype: torch.dtype,
                        layout: Layout = "dynamic") -> tuple[DynamicCache, torch.Tensor]:
    """A cache holding each row's prefix, right-aligned, and its (R, P_max) long mask.

    prefixes: per row, (P_r, layers, 2, kv_heads, head_dim) or None (no prefix). Row r's prefix
    occupies the last P_r of P_max columns; the columns before it are zeros with mask 0.
    With P_max = 0 the cache is empty and the mask is (R, 0).
    """
    rows = len(prefixes)
    p_max = max((0 if p is None else p.shape[0]) for p in prefixes)
    mask = torch.zeros(rows, p_max, dtype=torch.long, device=device)
    cache = new_cache(layout)
    if p_max == 0:
        return cache, mask
    first = next(p for p in prefixes if p is not None and p.shape[0] > 0)
    _, layers, _, kv_heads, head_dim = first.shape
    kv = torch.zeros(rows, p_max, layers, 2, kv_heads, head_dim, dtype=dtype, device=device)
    for r, p in enumerate(prefixes):
        if p is not None and p.shape[0] > 0:
            kv[r, p_max - p.shape[0]:] = p
            mask[r, p_max - p.shape[0]:] = 1
    for layer in range(layers):
        keys, values = layer_kv(kv, layer)  # each (R, kv_heads, P_max, head_dim)
        cache.update(keys.contiguous(), values.contiguous(), layer)
    return cache, mask


def cache_length(cache: DynamicCache) -> int:
    """L, the number of cached columns (the same for every layer of the engine's caches)."""
    return int(cache.get_seq_length())


def _layers(cache: DynamicCache) -> list[Any]:
    return [layer for layer in cache.layers if layer.is_initialized and layer.keys is not None]


def merge_caches(a: DynamicCache, b: DynamicCache) -> DynamicCache:
    """Rows of ``a`` (B_a, ..., L_a, .) then rows of ``b`` (B_b, ..., L_b, .), both left-padded
    with zeros to max(L_a, L_b) columns: (B_a + B_b, kv_heads, L, head_dim) per layer.

    The callers pad their (B, L) masks the same way. Returns a new cache; the inputs are not kept.
    """
    la, lb = _layers(a), _layers(b)
    if len(la) != len(lb):
        raise ValueError(f"cannot merge caches with {len(la)} and {len(lb)} layers")
    length = max(cache_length(a), cache_length(b))
    merged = new_cache(layout_of(a))
    for i, (x, y) in enumerate(zip(la, lb, strict=True)):
        keys = torch.cat([_left_pad(x.keys, length), _left_pad(y.keys, length)], dim=0)
        values = torch.cat([_left_pad(x.values, length), _left_pad(y.values, length)], dim=0)
        merged.update(keys, values, i)
    return merged


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """(B, h, L, d) → (B, h, length, d) with zeros in front."""
    missing = length - t.shape[-2]
    return t if missing == 0 else torch.nn.functional.pad(t, (0, 0, missing, 0))


def keep_cache_rows(cache: DynamicCache, rows: torch.Tensor, drop_left: int = 0) -> None:
    """In place: keep only ``rows`` (K,) long of the batch and drop the first ``drop_left`` columns
    (columns that are padding in every kept row): (B, h, L, d) → (K, h, L - drop_left, d)."""
    for layer in _layers(cache):
        _assign(layer, layer.keys[rows, :, drop_left:].contiguous(), layer.values[rows, :, drop_left:].contiguous())
