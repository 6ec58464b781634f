"""The prefix K/V layout, written once.

One stack's prefix for R rows is a tensor (R, P, layers, 2, kv_heads, head_dim): ``[:, :, l, 0]`` are
layer l's keys and ``[:, :, l, 1]`` its values, keys after RoPE, exactly what a KV cache of P past tokens
holds (and PEFT's ``prompt_embeddings`` layout, flattened). A stack whose layers differ in their K/V shapes
(per-layer head dims, or key and value dims that differ, as in multi-head latent attention) stays flat,
(R, P, width), laid out layer by layer as [keys, values], and is cut with its ``StackSpec``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # spec.py reaches this module through inject.py (its probe); annotations only
    from prefixtune.core.spec import ModelSpec, StackSpec


def as_kv(flat: torch.Tensor, spec: ModelSpec, stack: str) -> torch.Tensor:
    """(P, width) → (1, P, layers, 2, kv_heads, head_dim); a stack whose layers differ stays (1, P, width)."""
    s = spec.stack(stack)
    if not s.uniform:
        return flat[None]
    return flat.view(1, flat.shape[0], s.num_layers, 2, s.num_kv_heads, s.head_dim)


def flatten_kv(keys_values: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Per-layer ((1, k_heads, P, k_dim) keys, (1, v_heads, P, v_dim) values) → (P, width), laid out
    layer by layer as [keys, values]: for equal shapes, (P, layers, 2, kv_heads, head_dim) flattened."""
    parts = []
    for k, v in keys_values:
        p = k.shape[2]
        parts += [k[0].transpose(0, 1).reshape(p, -1), v[0].transpose(0, 1).reshape(p, -1)]
    return torch.cat(parts, dim=-1)


def layer_kv(t: torch.Tensor, layer: int, layout: StackSpec | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of one layer, each (R, heads, P, dim), from (R, P, layers, 2, kv_heads, head_dim),
    or from a flat (R, P, width) prefix cut with its ``layout``."""
    if t.ndim == 6:
        return t[:, :, layer, 0].transpose(1, 2), t[:, :, layer, 1].transpose(1, 2)
    if layout is None:
        raise ValueError("a flat (R, P, width) prefix needs its StackSpec to be cut into layers")
    (ks, ke), (vs, ve), (kh, kd, vh, vd) = layout.layer_slices(layer)
    r, p = t.shape[:2]
    keys = t[:, :, ks:ke].reshape(r, p, kh, kd).transpose(1, 2)
    values = t[:, :, vs:ve].reshape(r, p, vh, vd).transpose(1, 2)
    return keys, values
