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
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from prefixtune.core.kv import layer_kv

if TYPE_CHECKING:
    from prefixtune.core.spec import StackSpec

#: The engine's cache layouts: "dynamic" is transformers' ``DynamicCache`` (every appended token
#: concatenates, i.e. copies, the whole cache; a join or a leave copies it too); "preallocated" keeps each
#: layer in buffers with room to grow in rows and columns: a decode step writes the new column in place, a
#: joining request is written into free rows, a leaving one is replaced by the last row (only that row is
#: copied), and columns left all padding are dropped by moving the window's start (no copy). The buffers
#: are copied only when they must grow (capacity doubled: amortized O(1) per token). "static" decodes in a
#: ``SlotCache`` of fixed shape (slots, kv_heads, capacity, head_dim) whose rows are slots, each row
#: left-aligned with its own write column: every decode step has the same shapes (what CUDA graphs and
#: ``torch.compile`` without dynamic shapes need), at the price of attending over the whole capacity; its
#: prefill caches are "preallocated" ones, copied into slots when their rows join.
Layout = Literal["dynamic", "preallocated", "static"]
LAYOUTS: tuple[str, ...] = ("dynamic", "preallocated", "static")


def _room(n: int) -> int:
    """Spare columns (or rows) kept when a buffer is (re)allocated for n: a quarter more, at least 64
    columns; growth by a constant factor keeps the copies amortized O(1) per appended token."""
    return max(n // 4, 64)


class PreallocatedLayer(DynamicLayer):
    """A cache layer whose ``keys`` / ``values`` (B, kv_heads, n, head_dim) are views
    ``buffer[:B, :, start:end]`` of buffers (rows ≥ B, kv_heads, capacity, head_dim);
    ``update`` writes the new columns in place after ``end``."""

    rows = start = end = 0
    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.assign(key_states, value_states)
            return self.keys, self.values
        if key_states.shape[0] != self.rows:
            raise ValueError(f"cache update of {key_states.shape[0]} rows into a cache of {self.rows} rows")
        t = key_states.shape[-2]
        self.reserve(self.rows, 0, t)
        self._key_buffer[:self.rows, :, self.end:self.end + t].copy_(key_states)
        self._value_buffer[:self.rows, :, self.end:self.end + t].copy_(value_states)
        self.end += t
        self._view()
        return self.keys, self.values

    def _view(self) -> None:
        self.keys = self._key_buffer[:self.rows, :, self.start:self.end]
        self.values = self._value_buffer[:self.rows, :, self.start:self.end]

    def assign(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold ``keys`` / ``values`` (B, h, n, d) in fresh buffers (B rows, n + spare columns)."""
        self._realloc(keys, values, keys.shape[0], 0, _room(keys.shape[-2]))

    def reserve(self, rows: int, left: int, right: int) -> None:
        """Make room for ``rows`` rows, ``left`` columns before ``start`` and ``right`` after ``end``;
        reallocates (with spare room) only if the buffers are too small."""
        buf = self._key_buffer
        if rows <= buf.shape[0] and left <= self.start and self.end + right <= buf.shape[-2]:
            return
        row_capacity = buf.shape[0] if rows <= buf.shape[0] else rows + rows // 2
        self._realloc(self.keys, self.values, row_capacity, left, right + _room(self.end - self.start + left))

    def _realloc(self, keys: torch.Tensor, values: torch.Tensor, row_capacity: int, left: int, right: int) -> None:
        """New zeroed buffers (row_capacity, h, left + n + right, d) holding ``keys`` / ``values`` (B, h, n, d)
        at rows [0, B), columns [left, left + n)."""
        b, n = keys.shape[0], keys.shape[-2]
        kb = keys.new_zeros(row_capacity, keys.shape[1], left + n + right, keys.shape[-1])
        vb = values.new_zeros(row_capacity, values.shape[1], left + n + right, values.shape[-1])
        kb[:b, :, left:left + n].copy_(keys)
        vb[:b, :, left:left + n].copy_(values)
        self._key_buffer, self._value_buffer = kb, vb
        self.rows, self.start, self.end = b, left, left + n
        self._view()


class PreallocatedCache(DynamicCache):
    """A ``DynamicCache`` (for every model that accepts one) whose layers are ``PreallocatedLayer``s."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=PreallocatedLayer)


def new_cache(layout: Layout) -> DynamicCache:
    """An empty (prefill) cache of ``layout`` ("static" prefills into a preallocated one)."""
    if layout not in LAYOUTS:
        raise ValueError(f"cache layout must be one of {LAYOUTS}, got {layout!r}")
    return DynamicCache() if layout == "dynamic" else PreallocatedCache()


class SlotLayer(DynamicLayer):
    """Fixed buffers (slots, kv_heads, capacity, head_dim); ``update`` with one new column per slot writes
    slot s's at column ``write[s]`` in place (a scatter: no Python integer changes from step to step) and
    returns the whole buffers."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, write: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.write, self.is_initialized = keys, values, write, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape[0] != self.keys.shape[0] or key_states.shape[-2] != 1:
            raise ValueError(f"a static cache takes one column per slot ({self.keys.shape[0]} slots), "
                             f"got keys {tuple(key_states.shape)}")
        self.keys.scatter_(2, self.write.view(-1, 1, 1, 1).expand_as(key_states), key_states)
        self.values.scatter_(2, self.write.view(-1, 1, 1, 1).expand_as(value_states), value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]


class SlotCache(DynamicCache):
    """The "static" layout's decode cache: every layer a ``SlotLayer`` sharing one (slots,) long ``write``
    tensor (each slot's next column); the caller advances ``write`` after each step and passes a 4-D mask
    over the whole capacity. Buffers are marked as static addresses (CUDA-graph replays reuse them)."""

    def __init__(self, like: DynamicCache, slots: int, capacity: int) -> None:
        """Zeroed buffers for ``slots`` rows of ``capacity`` columns, with ``like``'s layers' heads, head
        dims, dtype and device."""
        layers = _layers(like)
        self.write = torch.zeros(slots, dtype=torch.long, device=layers[0].keys.device)
        made = []
        for layer in layers:
            k, v = layer.keys, layer.values
            keys = k.new_zeros(slots, k.shape[1], capacity, k.shape[-1])
            values = v.new_zeros(slots, v.shape[1], capacity, v.shape[-1])
            for t in (keys, values):
                torch._dynamo.mark_static_address(t)
            made.append(SlotLayer(keys, values, self.write))
        torch._dynamo.mark_static_address(self.write)
        Cache.__init__(self, layers=made)

    @property
    def shape(self) -> tuple[int, int]:
        """(slots, capacity)."""
        keys = self.layers[0].keys
        return keys.shape[0], keys.shape[-2]

    def place(self, slot: int, source: DynamicCache, row: int, columns: torch.Tensor) -> None:
        """Copy ``source``'s row ``row``, its ``columns`` (n,) in order, into ``slot``'s first n columns;
        the slot's next column is then n."""
        for mine, theirs in zip(self.layers, _layers(source), strict=True):
            mine.keys[slot, :, :len(columns)] = theirs.keys[row, :, columns]
            mine.values[slot, :, :len(columns)] = theirs.values[row, :, columns]
        self.write[slot] = len(columns)

    def grown(self, slots: int, capacity: int) -> SlotCache:
        """A cache of at least this size holding this one's slots and columns (new buffers: new shapes)."""
        bigger = SlotCache(self, max(slots, self.shape[0]), max(capacity, self.shape[1]))
        s, c = self.shape
        for mine, theirs in zip(bigger.layers, self.layers, strict=True):
            mine.keys[:s, :, :c] = theirs.keys
            mine.values[:s, :, :c] = theirs.values
        bigger.write[:s] = self.write
        return bigger


def layout_of(cache: DynamicCache) -> Layout:
    return "preallocated" if isinstance(cache, PreallocatedCache) else "dynamic"


def cache_from_prefixes(prefixes: list[torch.Tensor | None], device: torch.device, dtype: torch.dtype,
                        layout: Layout = "dynamic", stack: StackSpec | None = None
                        ) -> tuple[DynamicCache, torch.Tensor]:
    """A cache holding each row's prefix, right-aligned, and its (R, P_max) long mask.

    prefixes: per row, (P_r, layers, 2, kv_heads, head_dim), or (P_r, width) for a stack whose layers differ
    in K/V shape (cut by ``stack``, its ``StackSpec``), or None (no prefix). Row r's prefix occupies the last
    P_r of P_max columns; the columns before it are zeros with mask 0. With P_max = 0 the cache is empty and
    the mask is (R, 0).
    """
    rows = len(prefixes)
    p_max = max((0 if p is None else p.shape[0]) for p in prefixes)
    mask = torch.zeros(rows, p_max, dtype=torch.long, device=device)
    cache = new_cache(layout)
    if p_max == 0:
        return cache, mask
    first = next(p for p in prefixes if p is not None and p.shape[0] > 0)
    if first.ndim == 2 and stack is None:
        raise ValueError("a flat (P, width) prefix needs its StackSpec to be cut into layers")
    layers = first.shape[1] if first.ndim == 5 else stack.num_layers  # type: ignore[union-attr]
    kv = torch.zeros(rows, p_max, *first.shape[1:], dtype=dtype, device=device)
    for r, p in enumerate(prefixes):
        if p is not None and p.shape[0] > 0:
            kv[r, p_max - p.shape[0]:] = p
            mask[r, p_max - p.shape[0]:] = 1
    for layer in range(layers):
        keys, values = layer_kv(kv, layer, stack)  # each (R, kv_heads, P_max, head_dim)
        cache.update(keys.contiguous(), values.contiguous(), layer)
    return cache, mask


def cache_length(cache: DynamicCache) -> int:
    """L, the number of cached columns (the same for every layer of the engine's caches)."""
    return int(cache.get_seq_length())


def _layers(cache: DynamicCache) -> list[Any]:
    return [layer for layer in cache.layers if layer.is_initialized and layer.keys is not None]


def merge_caches(a: DynamicCache, b: DynamicCache) -> DynamicCache:
    """Rows of ``a`` (B_a, ..., L_a, .) then rows of ``b`` (B_b, ..., L_b, .), both left-padded
    to max(L_a, L_b) columns: (B_a + B_b, kv_heads, L, head_dim) per layer.

    The callers pad their (B, L) masks the same way (padding columns are masked; a preallocated cache may
    hold stale finite values there). A preallocated ``a`` takes ``b``'s rows in place and is returned;
    a dynamic one is copied into a new cache."""
    la, lb = _layers(a), _layers(b)
    if len(la) != len(lb):
        raise ValueError(f"cannot merge caches with {len(la)} and {len(lb)} layers")
    length = max(cache_length(a), cache_length(b))
    if isinstance(a, PreallocatedCache):
        for x, y in zip(la, lb, strict=True):
            rows, n = x.rows, y.keys.shape[-2]
            x.reserve(rows + y.keys.shape[0], length - (x.end - x.start), 0)
            x.start = x.end - length
            x._key_buffer[rows:rows + y.keys.shape[0], :, x.end - n:x.end].copy_(y.keys)
            x._value_buffer[rows:rows + y.keys.shape[0], :, x.end - n:x.end].copy_(y.values)
            x.rows = rows + y.keys.shape[0]
            x._view()
        return a
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


def keep_cache_rows(cache: DynamicCache, rows: list[int], drop_left: int = 0) -> list[int]:
    """In place: keep only ``rows`` (increasing indices) of the batch and drop the first ``drop_left``
    columns (padding in every kept row): (B, h, L, d) → (K, h, L - drop_left, d).

    Returns the kept rows' old indices in their new order: ``rows`` for a dynamic cache (copied); a
    preallocated cache moves the last kept rows into the places of the dropped ones (only those rows are
    copied) and moves its window's start (no copy)."""
    if isinstance(cache, PreallocatedCache):
        k = len(rows)
        order = list(range(k))
        holes = [i for i in range(k) if i not in set(rows)]
        movers = [r for r in rows if r >= k]
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
        for layer in _layers(cache):
            for buf in (layer._key_buffer, layer._value_buffer):
                for hole, mover in zip(holes, movers, strict=True):
                    buf[hole, :, layer.start:layer.end].copy_(buf[mover, :, layer.start:layer.end])
            layer.rows, layer.start = k, layer.start + drop_left
            layer._view()
        return order
    index = torch.tensor(rows, dtype=torch.long, device=_layers(cache)[0].keys.device)
    for layer in _layers(cache):
        layer.keys = layer.keys[index, :, drop_left:].contiguous()
        layer.values = layer.values[index, :, drop_left:].contiguous()
    return list(rows)


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
    if _packing.dense is not None:  # a short row: one call with the block-diagonal mask costs less than a loop
        return sdpa_attention_forward(module, query, key, value, _packing.dense, **kwargs)
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


#: A packed row of at most this many tokens runs its attention as one call over the whole row with a
#: block-diagonal mask (the per-request loop's fixed cost per call dominates short rows).
DENSE_PACKED_TOKENS = 256


def _dense_mask(segments: list[Segment], device: torch.device) -> torch.Tensor | None:
    """(1, 1, T, past + T) bool for a row of at most ``DENSE_PACKED_TOKENS`` tokens: each token sees its
    request's prefix columns and its request's earlier tokens. None for longer rows (the loop)."""
    t = sum(s.length for s in segments)
    if t > DENSE_PACKED_TOKENS:
        return None
    past = max((s.prefix_start + s.prefix_length for s in segments), default=0)
    mask = torch.zeros(t, past + t, dtype=torch.bool, device=device)
    for s in segments:
        rows = slice(s.start, s.start + s.length)
        mask[rows, s.prefix_start:s.prefix_start + s.prefix_length] = True
        mask[rows, past + s.start:past + s.start + s.length] = torch.ones(s.length, s.length, dtype=torch.bool,
                                                                          device=device).tril()
    return mask[None, None]


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
    _packing.dense = _dense_mask(segments, device)
    for cfg in configs:
        cfg._attn_implementation_internal = PACKED_ATTENTION
    try:
        yield
    finally:
        for cfg in configs:
            cfg._attn_implementation_internal = "sdpa"
        _packing.segments = _packing.masks = _packing.dense = None


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
