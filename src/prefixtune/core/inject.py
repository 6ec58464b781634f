"""Attention injection: with ``cache.py`` and ``shims.py``, the only modules that touch ``transformers`` internals.

How a prefix reaches attention: every prefix-carrying attention module is tagged with its
slot ``(stack, layer)`` and the model's attention implementation is switched to a registered
wrapper (``prefixtune_sdpa`` / ``prefixtune_eager`` / ``prefixtune_flex_attention``) around the one it
had. A forward pre-hook on the model (and on its encoder, which ``generate`` calls on its own) puts the
active ``PrefixBatch`` into the forward's keyword arguments, which ``transformers`` threads
down to every attention call; there the wrapper concatenates the slot's prefix keys and
values in front of the layer's own (after RoPE, exactly like a KV cache of P past tokens)
and extends the mask (and T5's position bias) to cover them.

flex_attention (decoder-only models): the wrapper builds a BlockMask over P + kv keys whose prefix columns
follow each row's prefix and whose real columns keep the model's own mask_mod (causal, padding, sliding
window), once per model call and mask. Its cost differs by device:
- CPU: the prefixed attention calls run flex_attention *unfused* (``torch.compiler.set_stance("force_eager")``:
  the full (B, heads, q, P + kv) score matrix is materialized, as eager attention does; no compile). A 2-layer,
  width-128 Llama, 2 x 256 tokens, P = 16, one thread: 131 ms a forward, BlockMask included, against 47 (sdpa)
  and 57 (eager). The compiled CPU kernel is not usable: PyTorch 2.13's CPU inductor template
  (``cpp_flex_attention_template.py``) renames its kv block-size symbol by string replacement, so a mask_mod
  that indexes a tensor whose size is dynamic (the prefix-validity table, once ``generate`` has made shapes
  dynamic) is compiled to C++ naming an undeclared ``cur_kvSplitSize4`` (``CppCompileError``). The calls
  without a prefix stay as transformers runs them. Training needs another device: PyTorch 2.13 has no
  flex_attention backward on CPU, fused or not.
- other devices: transformers' compiled flex_attention, unchanged, with the extended BlockMask.
Building the extended BlockMask evaluates its mask_mod over B x q x (P + kv) (``create_block_mask``,
uncompiled) once per model call, shared by the layers that share the model's mask.

Attention computed inside a module of its own (OpenAI GPT, XLM, RemBERT, MPNet, DeBERTa-v2, ...) gets a shim
while attached (``core/shims.py``): one method is replaced by the same arithmetic through the interface, so the
wrapper above reaches it too (and the probe of ``read_spec`` sees it).

Because the prefix travels as a keyword argument and never through the KV cache:
- ``generate`` (greedy, sampling, beam search, any cache) sees it on every step;
- gradient checkpointing recomputes layers with the same prefix;
- every row of a batch can carry its own prefix (mixed-task batching).

For decoder-only models, positions are shifted by each row's prefix length (the real tokens
sit where they would after P cached tokens), and computed from the attention mask, so that a
left-padded row gives the same result as the row alone.

Size: ~800 lines, kept in one module on purpose: with ``cache.py`` and ``shims.py``, it is where ours
reaches into transformers' attention internals, and its parts (the registered attention wrapper, the probe
that ``read_spec`` runs through that same wrapper, positions, the installation and its cache route) share
the registered functions and the probe's state; split, they would import each other.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
from transformers.utils import ModelOutput

from prefixtune.core.kv import layer_kv
from prefixtune.core.shims import install_shims, remove_shims, self_attention_cache

if TYPE_CHECKING:  # spec.py imports this module (its probe), so only for annotations
    from prefixtune.core.spec import ModelSpec, StackSpec

SLOT_ATTR = "_prefixtune_slot"
OWNER_ATTR = "_prefixtune_injection"
ATTACHED_ATTR = "_prefixtune_attached"
KWARG = "prefixtune"
UNWRAPPED_ATTR = "_prefixtune_unwrapped"  # on a layer's checkpoint function that we wrapped: the one it wraps
BASE_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")


@dataclass
class PrefixBatch:
    """Prefix keys/values for one forward call, for R rows (R = 1 shares one prefix).

    Attributes:
        kv: stack name -> tensor (R, P, layers, 2, kv_heads, head_dim); [:, :, l, 0] are
            layer l's keys, [:, :, l, 1] its values. A stack whose layers differ in K/V heads or
            head dims (MLA, per-layer head_dim) is flat instead, (R, P, width), cut by ``layouts``.
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
    layouts: dict[str, StackSpec] | None = None

    @classmethod
    def from_rows(cls, rows: Sequence[torch.Tensor | None], device: torch.device, dtype: torch.dtype
                  ) -> PrefixBatch:
        """One decoder prefix per row (mixed-task batches): each (P_r, layers, 2, kv_heads, head_dim), as
        ``load_prefix_kv`` or ``PrefixModel.decoder_kv`` give it, or None for the bare base model.

        Row r's prefix takes the last P_r of P_max positions (the padding in front is masked), and its
        real tokens are shifted by P_r: each row computes what it would alone with its own prefix.
        """
        shapes = {tuple(t.shape[1:]) for t in rows if t is not None}
        if len(shapes) > 1:
            raise ValueError(f"row prefixes have different per-position shapes {sorted(shapes)}: another base model")
        if not shapes:
            raise ValueError("row_prefixes holds no prefix (every row is None); call the base model instead")
        p_max = max(0 if t is None else t.shape[0] for t in rows)
        kv = torch.zeros(len(rows), p_max, *shapes.pop(), device=device, dtype=dtype)
        valid = torch.zeros(len(rows), p_max, dtype=torch.bool, device=device)
        for r, t in enumerate(rows):
            if t is not None and t.shape[0]:
                kv[r, p_max - t.shape[0]:] = t.to(device=device, dtype=dtype)
                valid[r, p_max - t.shape[0]:] = True
        return cls(kv={"decoder": kv}, valid=valid, lengths=valid.sum(-1))

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
        try:
            return layer_kv(t, layer, (self.layouts or {}).get(stack))
        except ValueError as exc:
            raise ValueError(f"'{stack}' prefix: {exc} (PrefixBatch.layouts)") from exc


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
    """The eager attention function of ``module``'s modeling file (the default its forward passes)."""
    namespace = vars(sys.modules[type(module).__module__])
    fn = namespace.get("eager_attention_forward")
    if fn is None:  # a few files name it after the family, e.g. ``<family>_eager_attention_forward``
        fn = next((f for n, f in namespace.items() if n.endswith("eager_attention_forward") and callable(f)), None)
    if fn is None:
        raise RuntimeError(f"{type(module).__name__} has no eager attention function to wrap")
    return fn


def _extend_mask(
    mask: torch.Tensor | None,
    prefix_allowed: torch.Tensor,
    q_len: int,
    kv_len: int,
    is_causal: bool,
    additive: torch.dtype | None,
    prefix_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prepend P prefix columns to an attention mask.

    mask: None, bool (True = attend) or additive float, broadcastable to (B, h, q, kv).
    prefix_allowed: (B, 1, q|1, P) bool. Returns (B, h, q, P + kv): bool, or additive of dtype
    ``additive`` when given (eager functions add the mask to the scores, so a bool would add +1/+0).
    prefix_bias: (B, h, 1, P) added to the allowed prefix columns of an additive mask (Doge's dynamic mask).

    With no mask, the real columns get what the base function would do without one: sdpa's
    ``is_causal`` for q > 1, which is aligned top-left (query i sees keys 0..i: a prefill, also of
    a static cache whose kv_len is its capacity, not its filled length); eager: everything.
    """
    device = prefix_allowed.device
    if mask is None:
        if is_causal and q_len > 1:
            mask = (torch.arange(kv_len, device=device)[None, :] <= torch.arange(q_len, device=device)[:, None])
            mask = mask[None, None]
        else:
            mask = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=device)
    b = max(mask.shape[0], prefix_allowed.shape[0])
    h = mask.shape[1]
    mask = mask.expand(b, h, q_len, mask.shape[-1])
    allowed = prefix_allowed.expand(b, h, q_len, prefix_allowed.shape[-1])
    if mask.dtype == torch.bool:
        if additive is None:
            return torch.cat([allowed, mask], dim=-1)
        both = torch.cat([allowed, mask], dim=-1)
        return torch.zeros(both.shape, dtype=additive, device=device).masked_fill(~both, torch.finfo(additive).min)
    blocked = torch.finfo(mask.dtype).min
    prefix_part = torch.zeros(allowed.shape, dtype=mask.dtype, device=device)
    if prefix_bias is not None:
        prefix_part = prefix_part + prefix_bias.to(mask.dtype)
    prefix_part = prefix_part.masked_fill(~allowed, blocked)
    return torch.cat([prefix_part, mask], dim=-1)


def _dynamic_mask_bias(module: nn.Module, pv: torch.Tensor, heads: int, kv_len: int) -> torch.Tensor | None:
    """Doge's dynamic mask attention adds a per-key bias computed from each key's value,
    exp(A · softplus(dt_proj(v))): the prefix keys get theirs from the prefix values, as cached
    values would. pv: (B, kv_heads, P, head_dim); returns (B, heads, 1, P), or None for other modules."""
    if not (hasattr(module, "prepare_dynamic_mask") and hasattr(module, "dt_proj") and hasattr(module, "A")):
        return None
    b, kvh, p, d = pv.shape
    window = int(getattr(module, "keep_window_size", 0) or 0)
    if window and p + kv_len > window:
        raise ValueError(f"{type(module).__name__} keeps only the top keep_window_size={window} keys of each query; "
                         f"with the prefix that is {p} + {kv_len} keys, and its selection (made over its own keys "
                         "before the prefix is added) would differ from that over real past tokens")
    dt = module.dt_proj(pv.transpose(1, 2).reshape(b, p, kvh * d))  # (B, P, kv_heads)
    dt = torch.exp(module.A * nn.functional.softplus(dt)).transpose(-1, -2)  # (B, kv_heads, P)
    return dt.repeat_interleave(heads // dt.shape[1], dim=1)[:, :, None, :]


def _extend_block_mask(block_mask: Any, allowed: torch.Tensor, q_len: int, kv_len: int) -> Any:
    """flex_attention: the model's BlockMask over (q, kv) with P prefix columns in front, (B, q, P + kv).

    allowed: (B, 1, 1, P) bool, which prefix columns each row sees (shorter prefixes are padded in front).
    The real columns keep the model's own mask_mod (causal, padding, sliding window), read at kv - P; with
    no block mask (None) they are all visible, as flex_attention without one attends everything.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    bsz, p = allowed.shape[0], allowed.shape[-1]
    if allowed.shape[2] != 1:
        raise ValueError("flex_attention: prefix columns that differ by query (infix mode) are not supported; "
                         "load the model with attn_implementation='sdpa'")
    prefix_ok = allowed[:, 0, 0].contiguous()  # (B, P)
    own = getattr(block_mask, "mask_mod", None)

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        seen = prefix_ok[b, kv.clamp(min=0, max=p - 1)]
        real = own(b, h, q, (kv - p).clamp(min=0)) if own is not None else kv >= p
        return torch.where(kv < p, seen, real)

    return create_block_mask(mask_mod, B=bsz, H=None, Q_LEN=q_len, KV_LEN=p + kv_len, device=allowed.device)


@contextmanager
def _flex_stance(device: torch.device) -> Iterator[None]:
    """Run the flex_attention calls inside the block unfused on CPU (see the module docstring), as they are
    elsewhere; inside a ``torch.compile`` of the whole model, the caller's compile decides."""
    if device.type != "cpu" or torch.compiler.is_compiling():
        yield
        return
    with torch.compiler.set_stance("force_eager"):
        yield


class SharedSlots(tuple):
    """The slots of one attention module that the model calls once per layer (ALBERT), in call order."""

    def next(self, module: nn.Module, calls: dict[int, int]) -> tuple[str, int]:
        """The slot of this call of ``module`` in the model call in progress (``calls`` counts them)."""
        i = calls.get(id(module), 0)
        if i >= len(self):
            raise ValueError(f"{type(module).__name__}, shared by {len(self)} layers, was called {i + 1} times in one "
                             "forward (a recomputation, as gradient checkpointing does?); its per-layer prefixes "
                             "follow the call order, so this is refused")
        calls[id(module)] = i + 1
        return self[i]


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
        if batch is None and hasattr(module, OWNER_ATTR):  # a layer that does not pass **kwargs down (StableLM,
            batch = getattr(module, OWNER_ATTR).current  # Nemotron); gradient checkpointing restores it to recompute
        fn = _model_eager(module) if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]
        if _PROBE is not None:
            _PROBE.append(_record(module, query, key, value, attention_mask, kwargs))
        slot = getattr(module, SLOT_ATTR, None)
        if isinstance(slot, SharedSlots) and batch is not None:
            slot = slot.next(module, getattr(module, OWNER_ATTR).shared_calls)
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
        if base == "flex_attention" and not isinstance(attention_mask, torch.Tensor):  # a BlockMask, or None
            owner = getattr(module, OWNER_ATTR, None)
            masks = owner.flex_masks if owner is not None else {}
            held = masks.get(id(attention_mask))
            if held is None or held[0] is not attention_mask or held[1].shape[-2:] != (q_len, p + kv_len):
                held = masks[id(attention_mask)] = (attention_mask, _extend_block_mask(attention_mask, allowed,
                                                                                      q_len, kv_len))
            with _flex_stance(query.device):
                return fn(module, query, torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2), held[1],
                          **kwargs)
        is_causal = kwargs.get("is_causal")
        if is_causal is None:  # sdpa_attention_forward's own default
            is_causal = bool(getattr(module, "is_causal", True))
        if base == "eager" and attention_mask is None:
            is_causal = False  # eager functions apply no causal mask of their own
        additive = query.dtype if base in ("eager", "flex_attention") else None  # flex adds a tensor mask too
        dynamic = None if attention_mask is None else _dynamic_mask_bias(module, pv, query.shape[1], kv_len)
        attention_mask = _extend_mask(attention_mask, allowed, q_len, kv_len, is_causal, additive, dynamic)
        bias = kwargs.get("position_bias")
        if bias is not None:  # T5: the prefix is position-less, so its columns get no bias
            pad = torch.zeros(*bias.shape[:-1], p, dtype=bias.dtype, device=bias.device)
            kwargs["position_bias"] = torch.cat([pad, bias], dim=-1)
        key = torch.cat([pk, key], dim=2)
        value = torch.cat([pv, value], dim=2)
        with _flex_stance(query.device) if base == "flex_attention" else nullcontext():
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


# ----------------------------------------------------------------------------- probing


@dataclass(frozen=True)
class AttentionCall:
    """One call of transformers' attention interface, as ``read_spec`` sees it.

    k_heads/k_dim and v_heads/v_dim are the key and value tensors' (heads, head_dim) as the
    module hands them over (after its projections, norms and RoPE); causal says whether the
    first query was kept from the last key.
    """

    module: nn.Module
    q_len: int
    kv_len: int
    k_heads: int
    k_dim: int
    v_heads: int
    v_dim: int
    causal: bool


_PROBE: list[AttentionCall] | None = None


def _record(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            mask: torch.Tensor | None, kwargs: dict[str, Any]) -> AttentionCall:
    q_len, kv_len = query.shape[2], key.shape[2]
    if kwargs.get("is_causal") is False:  # said so (the shims' encoder attention, whose masks are local)
        causal = False
    elif mask is None:
        flag = kwargs.get("is_causal")
        causal = q_len > 1 and bool(getattr(module, "is_causal", True) if flag is None else flag)
    elif mask.shape[-2] == 1 or mask.shape[-1] != kv_len:
        causal = False
    else:
        corner = mask[0, 0, 0, -1]
        causal = bool(~corner) if corner.dtype == torch.bool else bool(corner < -1.0)
    return AttentionCall(module, q_len, kv_len, key.shape[1], key.shape[3], value.shape[1], value.shape[3], causal)


@torch.no_grad()
def record_attention_calls(model: nn.Module, **inputs: Any) -> list[AttentionCall]:
    """Run ``model(**inputs)`` once and return every call it made to the attention interface, in order.

    Attention that does not go through ``ALL_ATTENTION_FUNCTIONS`` (Bloom, MPT, ...) is not seen.
    The model's attention implementation and training mode are restored afterwards.
    """
    global _PROBE
    register_attention()
    saved: list[tuple[Any, str]] = []
    for sub in model.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and all(cfg is not c for c, _ in saved):
            impl = cfg._attn_implementation
            saved.append((cfg, impl))
            base = (impl or "sdpa").removeprefix("prefixtune_")
            base = "eager" if base == "flex_attention" else base  # read as eager (softcap): no compile to probe
            cfg._attn_implementation_internal = f"prefixtune_{base if base in ('sdpa', 'eager') else 'sdpa'}"
    was_training, calls = model.training, []
    model.eval()
    _PROBE = calls
    shimmed = install_shims(model)
    try:
        model(**inputs, use_cache=False)
    finally:
        _PROBE = None
        remove_shims(shimmed)
        model.train(was_training)
        for cfg, impl in saved:
            cfg._attn_implementation_internal = impl
    return calls


@torch.no_grad()
def record_cache_shapes(model: nn.Module, **inputs: Any) -> list[tuple[int, int, int, int]]:
    """Run ``model(**inputs, use_cache=True)`` once; each cached layer's (key heads, key dim, value heads, value dim).

    The second route (``route="cache"``) puts the prefix in this cache, as PEFT does; [] when the model
    keeps no standard per-layer cache.
    """
    was_training = model.training
    model.eval()
    try:
        out = model(**inputs, use_cache=True)
    finally:
        model.train(was_training)
    cache = getattr(out, "past_key_values", None)
    if isinstance(cache, EncoderDecoderCache) and cache.cross_attention_cache.get_seq_length() == 0:
        cache = self_attention_cache(cache)  # a BERT-style decoder (RemBERT, MegatronBERT) without an encoder
    if not isinstance(cache, DynamicCache):
        return []
    layers = [layer for layer in cache.layers if getattr(layer, "keys", None) is not None]
    if len(layers) != len(cache.layers) or any(layer.keys.ndim != 4 for layer in layers):
        return []
    return [(la.keys.shape[1], la.keys.shape[3], la.values.shape[1], la.values.shape[3]) for la in layers]


@torch.no_grad()
def padding_moves_cached_positions(model: nn.Module, ids: torch.Tensor, position_ids: bool) -> bool:
    """Whether one left pad between a cache and the next tokens changes those tokens' logits.

    ids: (1, 3) ordinary tokens; the first is cached, the other two follow with and without a masked pad in
    front of them (``position_ids``: given from the mask, as the cache route gives them). True for models that
    number key positions by index (MPT's ALiBi, RoFormer's rotary, BART's learned positions), where the pads of
    a left-padded row would sit between a cached prefix and the row's tokens; False where positions follow the
    attention mask (Bloom's ALiBi, RoBERTa-like ids, position_ids).
    """
    was_training = model.training
    model.eval()
    pad = getattr(model.config, "pad_token_id", None)
    pad = pad if isinstance(pad, int) else 0
    try:
        logits = []
        for pads in (0, 1):
            cache = model(input_ids=ids[:, :1], use_cache=True).past_key_values
            rest = torch.cat([torch.full((1, pads), pad, dtype=ids.dtype, device=ids.device), ids[:, 1:]], dim=1)
            mask = torch.ones(1, 1 + rest.shape[1], dtype=torch.long, device=ids.device)
            mask[:, 1:1 + pads] = 0
            extra = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)[:, 1:]} if position_ids else {}
            out = model(input_ids=rest, past_key_values=cache, attention_mask=mask, use_cache=True, **extra)
            logits.append(out.logits[:, pads:].float())
    finally:
        model.train(was_training)
    scale = max(1.0, float(logits[0].abs().max()))
    return not torch.allclose(logits[0], logits[1], atol=1e-4 * scale, rtol=0)


def stateful_cache_layers(model: nn.Module) -> list[str]:
    """Class names of the layers of the model's own cache (``DynamicCache(config=...)``) that keep a
    convolution or recurrent state besides keys and values (e.g. Zaya's attention); [] when there are none."""
    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # a config the cache cannot read layer types from: it keeps keys and values alone
        return []
    stateful = (layer for layer in cache.layers if hasattr(layer, "conv_states") or hasattr(layer, "recurrent_states"))
    return sorted({type(layer).__name__ for layer in stateful})


def _fill_cache(cache: DynamicCache, batch: PrefixBatch, bsz: int) -> None:
    """Write every layer's prefix keys/values (rows_to ``bsz``) into an empty cache, as P past positions."""
    spec = (batch.layouts or {}).get("decoder")
    layers = spec.num_layers if spec is not None else batch.kv["decoder"].shape[2]
    for layer in range(layers):
        kv = batch.layer_kv("decoder", layer)
        if kv is None:
            return
        keys, values = (rows_to(t, bsz) for t in kv)
        cache.update(keys.contiguous(), values.contiguous(), layer)


# ----------------------------------------------------------------------------- positions


def _batch_and_length(args: tuple[Any, ...], kwargs: dict[str, Any], decoder: bool
                      ) -> tuple[int, int, torch.device]:
    """(batch, new tokens, device) of a model call, from its ids or embeddings (whichever is given)."""
    names = ("decoder_input_ids", "decoder_inputs_embeds") if decoder else ("input_ids", "inputs_embeds")
    for name in names:
        t = kwargs.get(name)
        if t is not None:
            return t.shape[0], t.shape[1], t.device
    if args and isinstance(args[0], torch.Tensor):
        return args[0].shape[0], args[0].shape[1], args[0].device
    raise ValueError(f"prefixtune could not find {' or '.join(names)} in the model call")


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


def _unsupported_implementation(architecture: str, impl: str) -> str:
    why = ""
    if "flash" in impl:
        why = (" (FlashAttention aligns its causal mask bottom-right, which is the prefix layout, but the package "
               "is on none of the machines this project tests on, so it is refused rather than shipped untested)")
    return (f"{architecture} uses attn_implementation={impl!r}; prefixtune supports {BASE_IMPLEMENTATIONS}{why} "
            f"(load the model with attn_implementation='sdpa')")


class Injection:
    """Handle on a model prepared for prefixes; ``active(batch)`` applies one for a block of calls."""

    def __init__(self, model: nn.Module, spec: ModelSpec) -> None:
        register_attention()
        self.model = model
        self.spec = spec
        self._active: PrefixBatch | None = None
        # The batch of the model call in progress, for layers that do not thread the keyword argument down
        # (the keyword stays the primary way: it survives gradient checkpointing's recomputation).
        self.current: PrefixBatch | None = None
        # flex_attention: id(the model's BlockMask) -> (it, it extended by the prefix columns), for the call in
        # progress (emptied by each model call), so that the layers sharing a block mask extend it once
        self.flex_masks: dict[int, tuple[Any, Any]] = {}
        self.shared_calls: dict[int, int] = {}  # calls of each shared module (SharedSlots) in this model call
        if getattr(model, ATTACHED_ATTR, False):  # the cache route renames no implementation: this tells it
            raise ValueError("this model already has prefixtune attached; detach() it first")
        self._requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        for sub in model.modules():  # refuse before changing anything
            impl = getattr(getattr(sub, "config", None), "_attn_implementation", None)
            if impl is not None and impl.startswith("prefixtune_"):
                raise ValueError("this model already has prefixtune attached; detach() it first")
            if impl is not None and impl not in BASE_IMPLEMENTATIONS:
                raise ValueError(_unsupported_implementation(spec.architecture, impl))
            if impl == "flex_attention" and (spec.kind != "causal" or spec.route != "attention"):
                raise ValueError(
                    f"{spec.architecture} uses attn_implementation='flex_attention'; prefixtune extends flex block "
                    "masks for decoder-only models whose attention carries the prefix (encoder, cross-attention and "
                    "KV-cache-route prefixes through flex are untested): load it with attn_implementation='sdpa'")
        modules = dict(model.named_modules())
        self._tagged: list[nn.Module] = []
        configs: dict[int, Any] = {}
        by_path: dict[str, list[tuple[str, int]]] = {}
        for path, stack, layer in spec.slots:
            by_path.setdefault(path, []).append((stack, layer))
        for path, slots in by_path.items():
            mod = modules[path]
            # a module called once per layer (ALBERT's shared layer): one slot per call, in call order
            setattr(mod, SLOT_ATTR, slots[0] if len(slots) == 1 else SharedSlots(slots))
            setattr(mod, OWNER_ATTR, self)
            self._tagged.append(mod)
            cfg = getattr(mod, "config", None)
            if cfg is not None:
                configs[id(cfg)] = cfg
        for sub in model.modules():
            cfg = getattr(sub, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                configs[id(cfg)] = cfg
        if spec.route == "cache":  # no attention call carries the prefix; the model's own code reads its
            configs = {}  # implementation's name (Falcon: == "sdpa", else eager that adds the mask), so keep it
        self._saved_impl: list[tuple[Any, str]] = []
        for cfg in configs.values():
            impl = cfg._attn_implementation
            if impl is None:
                continue
            self._saved_impl.append((cfg, impl))
            cfg._attn_implementation_internal = f"prefixtune_{impl}"
        setattr(model, ATTACHED_ATTR, True)
        self._hooks = [model.register_forward_pre_hook(self._hook(decoder=spec.kind == "seq2seq"), with_kwargs=True)]
        self._scratch_cache: DynamicCache | None = None
        self._checkpointed = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        self._shimmed = install_shims(model)  # legacy attention modules, through the interface while attached
        if spec.route == "cache":
            self._hooks.append(model.register_forward_hook(self._drop_scratch_cache))
        if spec.kind == "seq2seq":
            encoder = model.get_encoder()
            self._hooks.append(encoder.register_forward_pre_hook(self._hook(decoder=False), with_kwargs=True))

    def _hook(self, decoder: bool) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            batch = self._active
            if batch is None or KWARG in kwargs:
                return None
            if batch.layouts is None and batch.collect is None:
                batch = replace(batch, layouts={s.name: s for s in self.spec.stacks})
            if self.spec.route == "cache":
                return (args, kwargs) if batch.collect is not None else (args, self._through_cache(batch, args, kwargs))
            if self.spec.shift_positions:
                bsz, q_len, device = _batch_and_length(args, kwargs, decoder)
                past = _past_length(kwargs)
                mask = kwargs.get("attention_mask")
                pos, visible = shifted_positions(
                    batch, bsz, q_len, past, mask, kwargs.get("position_ids"), device
                )
                kwargs["position_ids"] = pos
                if mask is None:  # an explicit mask keeps transformers from reading the shift as packing
                    kwargs["attention_mask"] = torch.ones(bsz, past + q_len, dtype=torch.long, device=device)
                if visible is not None:
                    batch = replace(batch, query_visible=visible)
            kwargs[KWARG] = self.current = batch
            self.flex_masks = {}
            self.shared_calls = {}
            self._wrap_checkpointing()
            return args, kwargs

        return hook

    def _wrap_checkpointing(self) -> None:
        """Wrap each layer's checkpoint function (set by ``gradient_checkpointing_enable``, at any time) so that the
        recomputation of a layer in the backward pass sees the prefix as its forward did (``_checkpoint_with``)."""
        for layer in self._checkpointed:
            fn = layer.__dict__.get("_gradient_checkpointing_func")
            if fn is not None and not hasattr(fn, UNWRAPPED_ATTR):
                layer._gradient_checkpointing_func = self._checkpoint_with(fn)

    def _checkpoint_with(self, checkpoint: Callable[..., Any]) -> Callable[..., Any]:
        """``checkpoint(function, *args)`` that hands the call's prefix to the layer, forward and recomputation:

        - the prefix tensors that need gradients are inputs of the checkpoint, so that reentrant checkpointing
          returns their gradients to the graph outside (else it backpropagates through the reparametrization MLP
          once per layer and finds its graph freed after the first);
        - ``current`` is restored while the layer runs, for layers that do not pass the keyword arguments down
          to attention (StableLM, Nemotron), which read it instead.
        """
        def wrapped(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            batch = self.current
            if batch is None or batch.collect is not None:
                return checkpoint(function, *args, **kwargs)
            names = [k for k, t in batch.kv.items() if t.requires_grad]
            n = len(args)

            def run(*inputs: Any) -> Any:  # the forward, and again the recomputation
                own = replace(batch, kv={**batch.kv, **dict(zip(names, inputs[n:], strict=True))}) if names else batch
                layer = function
                if isinstance(function, partial) and function.keywords.get(KWARG) is batch:
                    layer = partial(function.func, *function.args, **{**function.keywords, KWARG: own})
                previous, self.current = self.current, own
                try:
                    return layer(*inputs[:n])
                finally:
                    self.current = previous

            return checkpoint(run, *args, *(batch.kv[k] for k in names), **kwargs)

        setattr(wrapped, UNWRAPPED_ATTR, checkpoint)
        return wrapped

    def _through_cache(self, batch: PrefixBatch, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The second route: the prefix as the first P positions of the model's own KV cache (PEFT's way).

        On the first call (empty or no cache) the cache is filled; on every call P prefix columns are put in
        front of the attention mask (unless it already covers them) and given position_ids are shifted.
        """
        if batch.infix_start is not None:
            raise ValueError(f"{self.spec.architecture} carries its prefix in the KV cache; infix mode is not possible")
        dropping = [type(m).__name__ for m in self._checkpointed
                    if m.gradient_checkpointing and m.training and not m._can_checkpoint_with_cache]
        if dropping:
            raise ValueError(
                f"{self.spec.architecture} carries its prefix in the KV cache, and under gradient checkpointing in "
                f"training transformers hands each {dropping[0]} no cache (past_key_values=None, so that the "
                "recomputation does not write it twice): the prefix would not reach attention. Train it without "
                "gradient checkpointing (gradient_checkpointing_disable())")
        bsz, q_len, device = _batch_and_length(args, kwargs, decoder=False)
        p = batch.kv["decoder"].shape[1]
        cache = kwargs.get("past_key_values")
        if cache is None or int(cache.get_seq_length()) == 0:
            if cache is not None and not isinstance(self_attention_cache(cache), DynamicCache):
                raise ValueError(f"{self.spec.architecture} carries its prefix in the KV cache; "
                                 f"{type(cache).__name__} is not supported there (use the default DynamicCache)")
            wanted = kwargs.get("use_cache")
            if cache is None and not (getattr(self.model.config, "use_cache", True) if wanted is None else wanted):
                self._scratch_cache = cache = DynamicCache()  # the call keeps no cache: it is not returned (MPT's
                # generate feeds the whole sequence each step and would otherwise get the prefix's cache back)
            cache = cache if cache is not None else DynamicCache()
            _fill_cache(self_attention_cache(cache), batch, bsz)
            kwargs["past_key_values"] = cache
            kwargs["use_cache"] = True
        past = int(cache.get_seq_length())
        valid = torch.ones(bsz, p, dtype=torch.long, device=device)
        if batch.valid is not None:
            valid = rows_to(batch.valid.to(device), bsz).long()
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(bsz, past - p + q_len, dtype=torch.long, device=device)
        if mask.ndim == 2 and not self.spec.left_padding_exact:
            real = mask[:, -(past - p + q_len):].bool()
            if bool((~real[:, :-1] & real[:, 1:]).any()):  # a pad in front of a real token
                raise ValueError(
                    f"{self.spec.architecture} numbers key positions by index, not by the attention mask: in a "
                    "left-padded row the padding sits between the prefix (the first P cache positions) and the row's "
                    "tokens and moves them apart, so the row would not compute what it does alone; pass unpadded "
                    "rows (e.g. one per call) or right-padded ones (forward, training)")
        if mask.ndim == 2 and mask.shape[1] == past - p + q_len:
            kwargs["attention_mask"] = torch.cat([valid.to(mask.dtype), mask], dim=1)
        if kwargs.get("position_ids") is None and self.spec.cache_position_ids and mask.ndim == 2:
            kwargs["position_ids"] = (mask[:, -(past - p + q_len):].long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
        if kwargs.get("position_ids") is not None and batch.lengths is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + rows_to(batch.lengths.to(device), bsz)[:, None]
        return kwargs

    def _drop_scratch_cache(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        """Cache route, a call made without a cache: the cache that carried the prefix is not handed back."""
        cache, self._scratch_cache = self._scratch_cache, None
        if cache is None:
            return None
        if isinstance(output, ModelOutput):
            return type(output)(**{k: v for k, v in output.items() if v is not cache})
        if isinstance(output, tuple):
            return tuple(v for v in output if v is not cache)
        return None

    @contextmanager
    def active(self, batch: PrefixBatch | None) -> Iterator[None]:
        """Apply ``batch`` to every model call inside the block (None: the base model)."""
        previous, self._active = self._active, batch
        try:
            yield
        finally:
            self._active = previous
            self.current = None

    def collect_kv(self, **inputs: Any) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
        """Run the model without a prefix and return every slot's own (keys, values).

        Each is (B, kv_heads, T, head_dim), keys after RoPE: what a KV cache would hold.
        """
        store: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        if self.spec.route == "cache":
            out = self.model(**inputs, use_cache=True)
            layers = self_attention_cache(out.past_key_values).layers
            return {("decoder", i): (layer.keys, layer.values) for i, layer in enumerate(layers)}
        with self.active(PrefixBatch(kv={}, collect=store)):
            self.model(**inputs, use_cache=False)
        return store

    def remove(self) -> None:
        """Give the model back as it was (attention implementation, tags, hooks)."""
        for h in self._hooks:
            h.remove()
        if self._hooks and hasattr(self.model, ATTACHED_ATTR):
            delattr(self.model, ATTACHED_ATTR)
        for mod in self._tagged:
            for attr in (SLOT_ATTR, OWNER_ATTR):
                if hasattr(mod, attr):
                    delattr(mod, attr)
        for cfg, impl in self._saved_impl:
            cfg._attn_implementation_internal = impl
        for layer in self._checkpointed:
            fn = layer.__dict__.get("_gradient_checkpointing_func")
            if fn is not None and hasattr(fn, UNWRAPPED_ATTR):
                layer._gradient_checkpointing_func = getattr(fn, UNWRAPPED_ATTR)
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)
        remove_shims(getattr(self, "_shimmed", []))
        self._shimmed = []
        self._hooks, self._tagged, self._saved_impl, self._requires_grad, self._checkpointed = [], [], [], [], []


def set_attention_implementation(model: nn.Module, base: str) -> None:
    """Switch a model (with or without an Injection) between 'sdpa' and 'eager' attention."""
    if base not in BASE_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {BASE_IMPLEMENTATIONS}, got {base!r}")
    for sub in model.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            prefixed = cfg._attn_implementation.startswith("prefixtune_")
            cfg._attn_implementation_internal = f"prefixtune_{base}" if prefixed else base
