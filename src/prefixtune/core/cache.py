"""The serving engine's KV-cache layout: the only place that reads or writes a cache's per-layer tensors.

The engine keeps one ``DynamicCache`` for all running rows, left-padded to a common length, and places
each row's prefix in that cache as P past positions (the equivalence the tests check: a prefix is exactly
a KV cache of P past tokens). Every layer's keys / values are (B, kv_heads, L, head_dim), keys after RoPE.
Like ``inject.py``, this module touches ``transformers`` internals (``DynamicCache.layers``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache


def cache_from_prefixes(prefixes: list[torch.Tensor | None], device: torch.device, dtype: torch.dtype
                        ) -> tuple[DynamicCache, torch.Tensor]:
    """A cache holding each row's prefix, right-aligned, and its (R, P_max) long mask.

    prefixes: per row, (P_r, layers, 2, kv_heads, head_dim) or None (no prefix). Row r's prefix
    occupies the last P_r of P_max columns; the columns before it are zeros with mask 0.
    With P_max = 0 the cache is empty and the mask is (R, 0).
    """
    rows = len(prefixes)
    p_max = max((0 if p is None else p.shape[0]) for p in prefixes)
    mask = torch.zeros(rows, p_max, dtype=torch.long, device=device)
    cache = DynamicCache()
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
        keys = kv[:, :, layer, 0].transpose(1, 2).contiguous()  # (R, kv_heads, P_max, head_dim)
        values = kv[:, :, layer, 1].transpose(1, 2).contiguous()
        cache.update(keys, values, layer)
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
    merged = DynamicCache()
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
        layer.keys = layer.keys[rows, :, drop_left:].contiguous()
        layer.values = layer.values[rows, :, drop_left:].contiguous()
