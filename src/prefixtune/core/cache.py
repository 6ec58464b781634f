"""The serving engine's KV-cache layout: the only place that reads or writes a cache's per-layer tensors.

The engine keeps one cache per running batch, a ``DynamicCache`` or a ``PreallocatedCache`` (see
``LAYOUTS``), left-padded to a common length, and places each row's prefix in that cache as P past
positions (the equivalence the tests check: a prefix is exactly a KV cache of P past tokens). Every
layer's keys / values are (B, kv_heads, L, head_dim), keys after RoPE. Like ``inject.py``, this module
touches ``transformers`` internals (``DynamicCache.layers``, ``cache_utils.DynamicLayer``, and the attention
interface for packed prefill).

Packed prefill. Joining requests are prefilled as ONE row: their prompts concatenated (T = the sum of
their lengths), each distinct prefix once in the row's past columns, position ids restarting per
request (P_r, P_r + 1, ...). Under ``packed_attention`` the model's attention runs per request (a
"varlen" attention written as a loop of ``sdpa`` calls): request r's queries see its own prefix's
columns and its own tokens, causally, and nothing else, so a prefill costs the sum of its prompts'
lengths (and each request's own attention). ``unpack_rows`` then lays each request's K/V out as a row of
the engine's left-padded layout.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

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


# ---------------------------------------------------------------------------------------------- packing
#: The attention implementation name under which ``packed_attention`` runs a packed row.
PACKED_ATTENTION = "prefixtune_packed"


@dataclass(frozen=True, slots=True)
class Segment:
    """One request of a packed row: its prefix at past columns [prefix_start, prefix_start + prefix_length),
    its tokens at row positions [start, start + length) (columns past + start ... of the row's cache)."""

    prefix_start: int
    prefix_length: int
    start: int
    length: int


_packing = threading.local()  # .segments (list[Segment]) and .masks while a packed forward runs


def _packed_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query (1, heads, T, d); key / value (1, kv_heads, past + T, d). Each segment's queries attend to its
    own prefix columns and, causally, its own tokens (``sdpa`` per segment). Returns (1, T, heads, d_v)."""
    segments: list[Segment] | None = getattr(_packing, "segments", None)
    if segments is None:
        raise RuntimeError(f"attention implementation {PACKED_ATTENTION!r} used outside packed_attention()")
    t = query.shape[2]
    past = key.shape[2] - t
    out = query.new_empty(query.shape[0], t, query.shape[1], value.shape[-1])
    for seg, mask in zip(segments, _packing.masks, strict=True):
        cols = slice(past + seg.start, past + seg.start + seg.length)
        k, v = key[:, :, cols], value[:, :, cols]
        if seg.prefix_length:
            pre = slice(seg.prefix_start, seg.prefix_start + seg.prefix_length)
            k, v = torch.cat([key[:, :, pre], k], dim=2), torch.cat([value[:, :, pre], v], dim=2)
        o, _ = sdpa_attention_forward(module, query[:, :, seg.start:seg.start + seg.length], k, v, mask, **kwargs)
        out[:, seg.start:seg.start + seg.length] = o
    return out, None


AttentionInterface.register(PACKED_ATTENTION, _packed_attention_forward)


def _segment_mask(seg: Segment, device: torch.device) -> torch.Tensor | None:
    """(1, 1, length, prefix_length + length) bool, True where attended: every prefix column, then causal.
    None without a prefix (sdpa's own causal mask)."""
    if not seg.prefix_length:
        return None
    causal = torch.ones(seg.length, seg.length, dtype=torch.bool, device=device).tril()
    prefix = torch.ones(seg.length, seg.prefix_length, dtype=torch.bool, device=device)
    return torch.cat([prefix, causal], dim=1)[None, None]


def _attention_configs(model: nn.Module) -> list[Any]:
    """Every distinct config of ``model``'s modules that names an attention implementation."""
    configs: dict[int, Any] = {}
    for sub in model.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and getattr(cfg, "_attn_implementation", None) is not None:
            configs[id(cfg)] = cfg
    return list(configs.values())


def packing_refused_now(model: nn.Module) -> str | None:
    """None if ``model`` runs plain ``sdpa`` attention now (what ``packed_attention`` wraps), else why not."""
    impls = {cfg._attn_implementation for cfg in _attention_configs(model)}
    return None if impls == {"sdpa"} else f"attention implementation {sorted(impls)}, not 'sdpa'"


@contextmanager
def packed_attention(model: nn.Module, segments: list[Segment]) -> Iterator[None]:
    """While the block runs, ``model``'s attention treats its (1, T) input as the packed ``segments``
    (the model must run ``sdpa``: ValueError otherwise). Not thread-safe for one model: the engine's
    thread is the only one calling it."""
    refused = packing_refused_now(model)
    if refused is not None:
        raise ValueError(f"packed prefill of {type(model).__name__}: {refused}")
    configs = _attention_configs(model)
    device = next(model.parameters()).device
    _packing.segments, _packing.masks = segments, [_segment_mask(s, device) for s in segments]
    for cfg in configs:
        cfg._attn_implementation_internal = PACKED_ATTENTION
    try:
        yield
    finally:
        for cfg in configs:
            cfg._attn_implementation_internal = "sdpa"
        _packing.segments = _packing.masks = None


def unpack_rows(packed: DynamicCache, segments: list[Segment], layout: Layout = "dynamic"
                ) -> tuple[DynamicCache, torch.Tensor]:
    """The engine's layout of a packed prefill: row r = [zeros, its prefix, its tokens], right-aligned.

    packed: the one-row cache after the packed forward, (1, kv_heads, past + T, head_dim) per layer.
    Returns a cache of (R, kv_heads, L, head_dim) per layer, L = max(prefix_length + length), and its
    (R, L) long mask (1 on each row's real columns)."""
    rows, length = len(segments), max(s.prefix_length + s.length for s in segments)
    layers = _layers(packed)
    past = cache_length(packed) - sum(s.length for s in segments)
    device = layers[0].keys.device
    mask = torch.zeros(rows, length, dtype=torch.long, device=device)
    for r, s in enumerate(segments):
        mask[r, length - s.prefix_length - s.length:] = 1
    cache = new_cache(layout)
    for i, layer in enumerate(layers):
        out = []
        for src in (layer.keys, layer.values):
            dst = src.new_zeros(rows, src.shape[1], length, src.shape[-1])
            for r, s in enumerate(segments):
                tokens = past + s.start
                dst[r, :, length - s.length:] = src[0, :, tokens:tokens + s.length]
                if s.prefix_length:
                    dst[r, :, length - s.length - s.prefix_length:length - s.length] = \
                        src[0, :, s.prefix_start:s.prefix_start + s.prefix_length]
            out.append(dst)
        cache.update(out[0], out[1], i)
    return cache, mask
