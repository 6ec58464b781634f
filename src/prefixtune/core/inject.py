"""The only module that touches ``transformers`` internals.

How a prefix reaches attention: every prefix-carrying attention module is tagged with its
slot ``(stack, layer)`` and the model's attention implementation is switched to a registered
wrapper (``prefixtune_sdpa`` / ``prefixtune_eager``) around the one it had. A forward
pre-hook on the model (and on its encoder, which ``generate`` calls on its own) puts the
active ``PrefixBatch`` into the forward's keyword arguments, which ``transformers`` threads
down to every attention call; there the wrapper concatenates the slot's prefix keys and
values in front of the layer's own (after RoPE, exactly like a KV cache of P past tokens)
and extends the mask (and T5's position bias) to cover them.

Because the prefix travels as a keyword argument and never through the KV cache:
- ``generate`` (greedy, sampling, beam search, any cache) sees it on every step;
- gradient checkpointing recomputes layers with the same prefix;
- every row of a batch can carry its own prefix (mixed-task batching).

For decoder-only models, positions are shifted by each row's prefix length (the real tokens
sit where they would after P cached tokens), and computed from the attention mask, so that a
left-padded row gives the same result as the row alone.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from prefixtune.core.spec import ModelSpec

SLOT_ATTR = "_prefixtune_slot"
KWARG = "prefixtune"
BASE_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass
class PrefixBatch:
    """Prefix keys/values for one forward call, for R rows (R = 1 shares one prefix).

    Attributes:
        kv: stack name -> tensor (R, P, layers, 2, kv_heads, head_dim); [:, :, l, 0] are
            layer l's keys, [:, :, l, 1] its values.
        valid: (R, P) bool, which prefix positions are real for each row (rows with shorter
            or no prefix are padded); None means all.
        lengths: (R,) long, each row's prefix length, by which its positions are shifted.
        infix_start: (R,) long, infix mode only: the base position of the first token that
            sees the prefix (the tokens before it do not, and it shifts only the tokens after).
        query_visible: (B, q) bool, set per call for infix mode.
        collect: when a dict, attention records each slot's own (keys, values) there and
            adds no prefix.
    """

    kv: dict[str, torch.Tensor]
    valid: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    infix_start: torch.Tensor | None = None
    query_visible: torch.Tensor | None = None
    collect: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] | None = field(default=None)

    @property
    def rows(self) -> int:
        for t in self.kv.values():
            return t.shape[0]
        return 1

    def layer_kv(self, stack: str, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(keys, values) of one layer, each (R, kv_heads, P, head_dim), or None."""
        t = self.kv.get(stack)
        if t is None or t.shape[1] == 0:
            return None
        return t[:, :, layer, 0].transpose(1, 2), t[:, :, layer, 1].transpose(1, 2)


def rows_to(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Broadcast (1, ...) or repeat-interleave (R, ...) to (batch, ...) rows, as generate expands beams."""
    r = t.shape[0]
    if r == batch:
        return t
    if r == 1:
        return t.expand(batch, *t.shape[1:])
    if batch % r:
        raise ValueError(f"prefix batch has {r} rows, which does not divide the model batch of {batch} rows")
    return t.repeat_interleave(batch // r, dim=0)


# ----------------------------------------------------------------------------- attention


def _model_eager(module: nn.Module) -> Callable[..., Any]:
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"{type(module).__name__} has no eager attention function to wrap")
    return fn


def _extend_mask(
    mask: torch.Tensor | None,
    prefix_allowed: torch.Tensor,
    q_len: int,
    kv_len: int,
    is_causal: bool,
) -> torch.Tensor:
    """Prepend P prefix columns to an attention mask.

    mask: None, bool (True = attend) or additive float, broadcastable to (B, h, q, kv).
    prefix_allowed: (B, 1, q|1, P) bool. Returns a mask of the same kind, (B, h, q, P + kv).
    """
    device = prefix_allowed.device
    if mask is None:
        if is_causal:
            i = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
            mask = (torch.arange(kv_len, device=device)[None, :] <= i)[None, None]
        else:
            mask = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=device)
    b = max(mask.shape[0], prefix_allowed.shape[0])
    h = mask.shape[1]
    mask = mask.expand(b, h, q_len, mask.shape[-1])
    allowed = prefix_allowed.expand(b, h, q_len, prefix_allowed.shape[-1])
    if mask.dtype == torch.bool:
        return torch.cat([allowed, mask], dim=-1)
    blocked = torch.finfo(mask.dtype).min
    prefix_part = torch.zeros(allowed.shape, dtype=mask.dtype, device=device).masked_fill(~allowed, blocked)
    return torch.cat([prefix_part, mask], dim=-1)


def _make_attention(base: str) -> Callable[..., Any]:
    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # query: (B, heads, q, head_dim); key/value: (B, kv_heads, kv, head_dim)
        batch: PrefixBatch | None = kwargs.pop(KWARG, None)
        fn = _model_eager(module) if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]
        slot = getattr(module, SLOT_ATTR, None)
        if batch is None or slot is None:
            return fn(module, query, key, value, attention_mask, **kwargs)
        if batch.collect is not None:
            batch.collect[slot] = (key, value)
            return fn(module, query, key, value, attention_mask, **kwargs)
        kv = batch.layer_kv(*slot)
        if kv is None:
            return fn(module, query, key, value, attention_mask, **kwargs)
        bsz, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
        pk, pv = (rows_to(t, bsz).to(key.dtype) for t in kv)
        p = pk.shape[2]
        allowed = torch.ones(bsz, 1, 1, p, dtype=torch.bool, device=query.device)
        if batch.valid is not None:
            allowed = allowed & rows_to(batch.valid, bsz)[:, None, None, :]
        if batch.query_visible is not None and slot[0] == "decoder":
            allowed = allowed & batch.query_visible[:, None, -q_len:, None]
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = bool(getattr(module, "is_causal", False))
        attention_mask = _extend_mask(attention_mask, allowed, q_len, kv_len, is_causal)
        bias = kwargs.get("position_bias")
        if bias is not None:  # T5: the prefix is position-less, so its columns get no bias
            pad = torch.zeros(*bias.shape[:-1], p, dtype=bias.dtype, device=bias.device)
            kwargs["position_bias"] = torch.cat([pad, bias], dim=-1)
        key = torch.cat([pk, key], dim=2)
        value = torch.cat([pv, value], dim=2)
        return fn(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"prefixtune_{base}_attention"
    return attention


def register_attention() -> None:
    """Register ``prefixtune_<base>`` attention (and mask) functions with transformers (idempotent)."""
    for base in BASE_IMPLEMENTATIONS:
        name = f"prefixtune_{base}"
        if name not in ALL_ATTENTION_FUNCTIONS:
            AttentionInterface.register(name, _make_attention(base))
        if name not in ALL_MASK_ATTENTION_FUNCTIONS:
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])


# ----------------------------------------------------------------------------- positions


def _batch_and_length(args: tuple[Any, ...], kwargs: dict[str, Any], decoder: bool) -> tuple[int, int]:
    names = ("decoder_input_ids", "decoder_inputs_embeds") if decoder else ("input_ids", "inputs_embeds")
    for name in names:
        t = kwargs.get(name)
        if t is not None:
            return t.shape[0], t.shape[1]
    if args and isinstance(args[0], torch.Tensor):
        return args[0].shape[0], args[0].shape[1]
    raise ValueError("prefixtune could not find input_ids or inputs_embeds in the model call")


def _past_length(kwargs: dict[str, Any]) -> int:
    cache = kwargs.get("past_key_values")
    return int(cache.get_seq_length()) if cache is not None else 0


def shifted_positions(
    batch: PrefixBatch,
    bsz: int,
    q_len: int,
    past: int,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Positions of the q new tokens after the prefix, pad-aware; and infix visibility.

    Base positions are ``position_ids`` if given, else counted from ``attention_mask``
    (B, past + q) so padding takes no position. Returns position ids (B, q) and, in infix
    mode, which of the q tokens see the infix (B, q) bool.
    """
    if position_ids is None:
        if attention_mask is not None and attention_mask.ndim == 2:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
        else:
            position_ids = torch.arange(past, past + q_len, device=device)[None].expand(bsz, q_len)
    position_ids = position_ids.to(device).expand(bsz, q_len)
    if batch.lengths is None:
        return position_ids, None
    shift = rows_to(batch.lengths.to(device), bsz)[:, None]
    if batch.infix_start is None:
        return position_ids + shift, None
    visible = position_ids >= rows_to(batch.infix_start.to(device), bsz)[:, None]
    return position_ids + shift * visible, visible


# ----------------------------------------------------------------------------- installation


class Injection:
    """Handle on a model prepared for prefixes; ``active(batch)`` applies one for a block of calls."""

    def __init__(self, model: nn.Module, spec: ModelSpec) -> None:
        register_attention()
        self.model = model
        self.spec = spec
        self._active: PrefixBatch | None = None
        modules = dict(model.named_modules())
        self._tagged: list[nn.Module] = []
        configs: dict[int, Any] = {}
        for path, stack, layer in spec.slots:
            mod = modules[path]
            setattr(mod, SLOT_ATTR, (stack, layer))
            self._tagged.append(mod)
            cfg = getattr(mod, "config", None)
            if cfg is not None:
                configs[id(cfg)] = cfg
        for sub in model.modules():
            cfg = getattr(sub, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                configs[id(cfg)] = cfg
        self._saved_impl: list[tuple[Any, str]] = []
        for cfg in configs.values():
            impl = cfg._attn_implementation
            if impl.startswith("prefixtune_"):
                raise ValueError("this model already has prefixtune attached; detach() it first")
            if impl not in BASE_IMPLEMENTATIONS:
                raise ValueError(
                    f"{spec.architecture} uses attn_implementation={impl!r}; prefixtune supports "
                    f"{BASE_IMPLEMENTATIONS} (load the model with attn_implementation='sdpa')"
                )
            self._saved_impl.append((cfg, impl))
            cfg._attn_implementation_internal = f"prefixtune_{impl}"
        self._hooks = [model.register_forward_pre_hook(self._hook(decoder=spec.kind == "seq2seq"), with_kwargs=True)]
        if spec.kind == "seq2seq":
            encoder = model.get_encoder()
            self._hooks.append(encoder.register_forward_pre_hook(self._hook(decoder=False), with_kwargs=True))

    def _hook(self, decoder: bool) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            batch = self._active
            if batch is None or KWARG in kwargs:
                return None
            if self.spec.shift_positions:
                bsz, q_len = _batch_and_length(args, kwargs, decoder)
                past = _past_length(kwargs)
                mask = kwargs.get("attention_mask")
                ref = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
                device = ref.device if ref is not None else args[0].device
                pos, visible = shifted_positions(
                    batch, bsz, q_len, past, mask, kwargs.get("position_ids"), device
                )
                kwargs["position_ids"] = pos
                if mask is None:  # an explicit mask keeps transformers from reading the shift as packing
                    kwargs["attention_mask"] = torch.ones(bsz, past + q_len, dtype=torch.long, device=device)
                if visible is not None:
                    batch = replace(batch, query_visible=visible)
            kwargs[KWARG] = batch
            return args, kwargs

        return hook

    @contextmanager
    def active(self, batch: PrefixBatch | None) -> Iterator[None]:
        """Apply ``batch`` to every model call inside the block (None: the base model)."""
        previous, self._active = self._active, batch
        try:
            yield
        finally:
            self._active = previous

    def collect_kv(self, **inputs: Any) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
        """Run the model without a prefix and return every slot's own (keys, values).

        Each is (B, kv_heads, T, head_dim), keys after RoPE: what a KV cache would hold.
        """
        store: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        with self.active(PrefixBatch(kv={}, collect=store)):
            self.model(**inputs, use_cache=False)
        return store

    def remove(self) -> None:
        """Give the model back as it was (attention implementation, tags, hooks)."""
        for h in self._hooks:
            h.remove()
        for mod in self._tagged:
            if hasattr(mod, SLOT_ATTR):
                delattr(mod, SLOT_ATTR)
        for cfg, impl in self._saved_impl:
            cfg._attn_implementation_internal = impl
        self._hooks, self._tagged, self._saved_impl = [], [], []


def set_attention_implementation(model: nn.Module, base: str) -> None:
    """Switch a model (with or without an Injection) between 'sdpa' and 'eager' attention."""
    if base not in BASE_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {BASE_IMPLEMENTATIONS}, got {base!r}")
    for sub in model.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            prefixed = cfg._attn_implementation.startswith("prefixtune_")
            cfg._attn_implementation_internal = f"prefixtune_{base}" if prefixed else base
